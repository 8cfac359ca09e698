"""The distillation job on a real Ray cluster: ZeRO 1/2/3 and a 2-stage pipeline on 2 CPU workers match a
single-process run step by step; a worker that really dies mid-run is restarted by Ray Train and resumes
exactly; bad inputs fail before any worker starts; the CLI's ``--local`` path publishes a student.

One tiny teacher (trained here for a few seconds) in a temporary registry, its top-k cache, and the
session Ray head (``ray_cluster``) are shared by every test. Runs are 12 steps of 8 x 64 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
TINY_DATA = dict(
    sources=["stdlib"], include_tests=False, max_bytes=2_500_000, val_fraction=0.1, vocab_size=512
)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_cluster):
    """Data, a quickly trained tiny teacher published to a temp registry, its top-k cache, and Ray."""
    import numpy as np
    import ray
    import torch

    from cluster.config.data import DataConfig
    from cluster.config.model import preset
    from cluster.model import Transformer
    from cluster.registry import open_registry
    from train.data import load_split, prepare
    from train.data.loader import packed_batches
    from train.topk import build_topk_cache, weights_sha256

    root = tmp_path_factory.mktemp("distill")
    reg_root = root / "registry"
    old_reg = os.environ.get("RETORT_REGISTRY")
    os.environ["RETORT_REGISTRY"] = str(reg_root)
    data = prepare(DataConfig(**TINY_DATA))
    tokens = load_split(data.dir, "train")
    torch.manual_seed(0)
    teacher = Transformer(preset("tiny")).init_weights(0)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _, xy in packed_batches(
        tokens, 64, 8, seed=1, max_steps=30
    ):  # a few seconds: a teacher that knows something
        loss = torch.nn.functional.cross_entropy(teacher(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tdir = root / "teacher"
    teacher.save_pretrained(tdir)
    for f in Path(data.tokenizer_dir).iterdir():
        shutil.copy2(f, tdir / f.name)
    reg = open_registry()
    ref = reg.publish("tteacher", tdir, lineage={}, metrics={})
    teacher.eval()
    cache = root / "topk"
    build_topk_cache(
        teacher,
        np.asarray(tokens),
        64,
        8,
        cache,
        32,
        vocab_size=data.vocab_size,
        teacher=str(ref),
        teacher_sha256=weights_sha256(tdir),
        data_fingerprint=data.fingerprint,
        max_windows=512,
        progress=False,
    )
    ray.init(address=ray_cluster.gcs_address)
    try:
        yield {"root": root, "teacher_dir": tdir, "ref": str(ref), "cache": cache, "data": data}
    finally:
        ray.shutdown()
        if old_reg is None:
            os.environ.pop("RETORT_REGISTRY", None)
        else:
            os.environ["RETORT_REGISTRY"] = old_reg


def make_cfg(world, name: str, **kw):
    from cluster.config.distill import DistillConfig

    base = dict(
        data=TINY_DATA,
        teacher="tteacher",
        student_preset="tiny",
        steps=STEPS,
        seq_len=64,
        micro_batch_size=4,
        grad_accum=1,
        num_workers=2,
        zero_stage=1,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=4,
        log_every=100,
        eval={"batch_size": 16, "max_tokens": 2048, "teacher": False},
        publish=False,
        max_failures=2,
        run_dir=str(world["root"] / "runs" / name),
        topk={"dir": str(world["cache"])},
    )
    base.update(kw)
    return DistillConfig.model_validate(base)


def losses(cfg) -> dict[int, dict]:
    """Per-step metrics from the run's JSONL (a resumed run re-logs redone steps: the last entry wins)."""
    rows: dict[int, dict] = {}
    for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r
    return rows


_RUNS: dict[str, dict] = {}


def run_once(world, name: str, **kw) -> tuple[dict, dict]:
    """Run (once per module) and return (final metrics, per-step rows)."""
    from train.distill.job import run

    if name not in _RUNS:
        cfg = make_cfg(world, name, **kw)
        final = run(cfg)
        _RUNS[name] = {"final": final, "rows": losses(cfg)}
    return _RUNS[name]["final"], _RUNS[name]["rows"]


def assert_curves_match(a: dict, b: dict, rtol: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        for k in ("loss", "kd", "ce"):
            assert a[s][k] == pytest.approx(b[s][k], rel=rtol), (s, k, a[s][k], b[s][k])
    assert a[STEPS]["loss"] < a[1]["loss"], "the loss must go down"


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_workers_match_single_process(world, stage):
    _, ref = run_once(world, "single", num_workers=1, micro_batch_size=8, zero_stage=0)
    final, rows = run_once(world, f"zero{stage}", zero_stage=stage)
    assert_curves_match(rows, ref, rtol=2e-3)
    assert final["step"] == STEPS and final["val_ppl"] > 1
    assert rows[STEPS]["workers"] == 2
    student = Path(make_cfg(world, f"zero{stage}").run_dir) / "student"
    assert (student / "model.safetensors").is_file() and (student / "tokenizer.json").is_file()


def test_pipeline_two_stages_matches_single_process(world):
    _, ref = run_once(
        world, "single-topk", num_workers=1, micro_batch_size=8, zero_stage=0, teacher_source="topk"
    )
    final, rows = run_once(
        world,
        "pipe",
        mode="pipeline",
        pipeline_stages=2,
        teacher_source="topk",
        micro_batch_size=2,
        grad_accum=4,
    )
    assert_curves_match(rows, ref, rtol=2e-3)
    # the exported student (gathered from both stages) scores like the pipeline's own last loss implies
    assert final["val_ppl"] == pytest.approx(run_once(world, "single-topk")[0]["val_ppl"], rel=1e-2)


# ---------------------------------------------------------------------------------------------- fault tolerance


def test_worker_crash_resumes_exactly(world, monkeypatch):
    marker = world["root"] / "crashed"
    monkeypatch.setenv("RETORT_DISTILL_FAULT", f"6:1:{marker}")  # rank 1 os._exit(1)s before step 7
    final, rows = run_once(world, "fault", zero_stage=1)
    assert marker.is_file(), "the fault was not injected"
    _, clean = run_once(world, "zero1", zero_stage=1)
    assert final["step"] == STEPS and sorted(rows) == list(range(1, STEPS + 1))
    assert final["steps_this_attempt"] == STEPS - 4, "must resume from the step-4 checkpoint, not from 0"
    assert rows[STEPS]["loss"] == pytest.approx(clean[STEPS]["loss"], rel=0.02)
    assert rows[STEPS]["loss"] == pytest.approx(clean[STEPS]["loss"], rel=1e-4)  # exact resume in fact


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_workers(world, tmp_path):
    from cluster.errors import RetortError
    from cluster.registry import open_registry
    from cluster.tokenizer import train_tokenizer
    from train.distill.job import make_plan

    # a teacher whose tokenizer differs from the data's
    other = tmp_path / "other"
    shutil.copytree(world["teacher_dir"], other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(["def f(x):\n    return x + 1\n" * 50, "class A: pass\n" * 50], 300, other)
    open_registry().publish("tteacher-other", other, lineage={}, metrics={})
    with pytest.raises(RetortError, match="tokenizer"):
        make_plan(make_cfg(world, "bad-tok", teacher="tteacher-other"), "test")
    # missing and corrupt top-k shards
    for damage, match in (("missing", "missing"), ("corrupt", "corrupt")):
        bad = tmp_path / f"cache-{damage}"
        shutil.copytree(world["cache"], bad)
        shard = sorted(bad.glob("shard-*.safetensors"))[0]
        if damage == "missing":
            shard.unlink()
        else:
            with open(shard, "r+b") as f:
                f.seek(shard.stat().st_size // 2)
                f.write(b"\xff" * 64)
        with pytest.raises(RetortError, match=match):
            make_plan(make_cfg(world, f"bad-{damage}", teacher_source="topk", topk={"dir": str(bad)}), "test")
    # resuming a run dir (which holds checkpoints) with a changed training config
    run_once(world, "zero1", zero_stage=1)
    with pytest.raises(RetortError, match="different training config"):
        make_plan(make_cfg(world, "zero1", zero_stage=1, lr=1e-3), "test")


def test_cli_rejects_bad_config_with_exit_2(world):
    env = {**os.environ, "RETORT_REGISTRY": os.environ["RETORT_REGISTRY"]}
    for override in ("mode=pipeline zero_stage=2 teacher_source=topk", "global_batch_size=7"):
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "cluster.cli",
                "distill",
                "-c",
                "configs/distill/tiny.yaml",
                "--local",
                *override.split(),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.count("\n") <= 2, p.stderr


# ---------------------------------------------------------------------------------------------- CLI --local


def test_cli_local_publishes_student(world):
    run_dir = world["root"] / "runs" / "cli"
    env = {**os.environ, "RETORT_REGISTRY": os.environ["RETORT_REGISTRY"]}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "distill",
            "-c",
            "configs/distill/tiny.yaml",
            "--local",
            "teacher=tteacher",
            "student_preset=tiny",
            "student=null",
            "steps=4",
            "checkpoint_every=2",
            f"run_dir={run_dir}",
            "eval.max_tokens=2048",
            "publish_name=tstudent",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "tstudent:1"
    from cluster.registry import open_registry

    man = open_registry().show("tstudent:1")
    assert man["lineage"]["parents"] == [world["ref"]]
    assert man["lineage"]["dataset_fingerprint"] == world["data"].fingerprint
    assert man["metrics"]["val_ppl"] > 1 and man["metrics"]["retention"] > 0


# ---------------------------------------------------------------------------------------------- ray job submit


@pytest.mark.slow
def test_ray_job_submit_entrypoint(world, ray_cluster):
    """``ray job submit --working-dir . -- python -m train.distill -c configs/distill/tiny.yaml`` on a running head."""
    run_dir = world["root"] / "runs" / "job"
    env = ray_cluster.subprocess_env()
    runtime_env = json.dumps({"env_vars": {"RETORT_REGISTRY": os.environ["RETORT_REGISTRY"]}})
    p = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            ray_cluster.dashboard_url,
            "--working-dir",
            ".",
            "--runtime-env-json",
            runtime_env,
            "--",
            sys.executable,
            "-m",
            "train.distill",
            "-c",
            "configs/distill/tiny.yaml",
            "teacher=tteacher",
            "student_preset=tiny",
            "student=null",
            "steps=4",
            "checkpoint_every=2",
            f"run_dir={run_dir}",
            "eval.max_tokens=2048",
            "publish_name=tstudent-job",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "tstudent-job:1" in p.stdout
    assert (run_dir / "student" / "model.safetensors").is_file()
