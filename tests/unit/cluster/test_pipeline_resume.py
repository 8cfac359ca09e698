"""The pipeline skips stages that are up to date, and re-runs everything after a stage that ran."""

from __future__ import annotations

from cluster.config import load_config, schema_for
from cluster.pipeline.orchestrator import Pipeline, Stage


def test_a_stage_that_runs_makes_the_later_ones_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RETORT_REGISTRY", str(tmp_path / "registry"))
    cfg = load_config(
        "configs/pipeline/small.yaml", schema_for("pipeline"), [f"runs_dir={tmp_path}", "name=t"]
    )
    ran: list[str] = []
    valid = {"up": True, "teacher": True, "serve": True, "loadtest": True}

    def stage(name: str, feeds_later: bool = True) -> Stage:
        def run(p, wired):
            ran.append(name)
            valid[name] = True
            return {"n": len(ran)}

        return Stage(name, None, None, run, check=lambda p, out: valid[name], feeds_later=feeds_later)

    stages = [stage("up", feeds_later=False), stage("teacher"), stage("serve"), stage("loadtest")]
    Pipeline(cfg).run(stages)
    assert ran == ["up", "teacher", "serve", "loadtest"]
    ran.clear()
    Pipeline(cfg).run(stages)
    assert ran == []  # all up to date
    valid["up"] = False  # the cluster was stopped: restarting it changes no stage's inputs
    Pipeline(cfg).run(stages)
    assert ran == ["up"]
    ran.clear()
    valid["teacher"] = False  # e.g. a fresh registry: the teacher is trained again, as teacher:1 again
    Pipeline(cfg).run(stages)
    assert ran == ["teacher", "serve", "loadtest"]  # their fingerprints match, but their inputs are new
