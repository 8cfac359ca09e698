"""The chain: up -> data -> teacher (+ top-k cache) -> distill -> compress -> promote -> serve
-> loadtest -> report. Every stage is fingerprinted and skipped when its outputs exist."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import load_config, schema_for
from cluster.config.pipeline import PipelineConfig, StageSpec
from cluster.errors import JobFailed, RetortError
from cluster.pipeline.runner import REPO, StageRun, execute, fmt_duration, retort_cmd
from cluster.pipeline.state import PipelineState, fingerprint


@dataclass
class Stage:
    name: str
    kind: str | None  # config kind (None: no config of its own)
    spec: StageSpec | None
    run: Callable[[Pipeline, list[str]], dict[str, Any]]
    wire: Callable[[Pipeline], list[str]] = lambda p: []
    check: Callable[[Pipeline, dict[str, Any]], bool] = lambda p, out: True
    feeds_later: bool = True  # later stages consume what it makes: when it runs, they run too


class Pipeline:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.dir = (REPO / cfg.runs_dir / cfg.name).resolve()
        self.logs = self.dir / "logs"
        self.state = PipelineState(self.dir / "state.json")
        self.outputs: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, dict[str, Any]] = {}
        from cluster.registry import open_registry

        self.registry = open_registry(cfg.registry)

    # --- helpers --------------------------------------------------------------------------
    def resolved(self, stage: Stage, wired: list[str]) -> dict[str, Any]:
        assert stage.spec is not None and stage.kind is not None
        cfg = load_config(REPO / stage.spec.config, schema_for(stage.kind), [*stage.spec.overrides, *wired])
        return cfg.model_dump(mode="json")

    def job(
        self,
        stage: Stage,
        wired: list[str],
        *extra: str,
        subcommand: str | None = None,
        ok_codes: tuple[int, ...] = (0,),
    ) -> str:
        assert stage.spec is not None
        args = [
            *(subcommand or stage.name).split(),
            "-c",
            stage.spec.config,
            *stage.spec.overrides,
            *wired,
            *extra,
        ]
        if self.cfg.local_jobs and stage.kind not in ("serve", "loadtest", "cluster"):
            args.append("--local")
        run = StageRun(stage.name, retort_cmd(*args), self.logs / f"{stage.name}.log")
        last, _ = execute(run, self.index, self.total, ok_codes)
        return last

    def new_versions(self, name: str, before: set[str]) -> list[dict[str, Any]]:
        try:
            rows = self.registry.list(name)
        except RetortError:
            return []
        return [r for r in rows if r["ref"] not in before]

    def refs_of(self, name: str) -> set[str]:
        try:
            return {r["ref"] for r in self.registry.list(name)}
        except RetortError:
            return set()

    def ref_ok(self, ref: str) -> bool:
        try:
            self.registry.verify(ref)
            return True
        except RetortError:
            return False

    # --- the run -------------------------------------------------------------------------
    def run(self, stages: list[Stage]) -> Path:
        self.total = len(stages)
        t_all = time.monotonic()
        upstream_ran = (
            False  # refs like teacher:1 repeat across fresh registries: a re-run upstream means new inputs
        )
        for self.index, stage in enumerate(stages, start=1):
            if stage.spec is not None and not stage.spec.enabled:
                print(f"– [{self.index}/{self.total}] {stage.name:<9} disabled in config", flush=True)
                continue
            wired = stage.wire(self)
            payload = {
                "stage": stage.name,
                "wired": wired,
                "config": self.resolved(stage, wired) if stage.kind else None,
            }
            fp = fingerprint(payload)
            prev = self.state.get(stage.name)
            if prev and prev["fingerprint"] == fp and not upstream_ran and stage.check(self, prev["outputs"]):
                self.outputs[stage.name] = prev["outputs"]
                self.timings[stage.name] = {"seconds": prev["seconds"], "skipped": True}
                print(
                    f"↷ [{self.index}/{self.total}] {stage.name:<9} up to date ({_summary(prev['outputs'])})",
                    flush=True,
                )
                continue
            t0 = time.monotonic()
            out = stage.run(self, wired)
            seconds = time.monotonic() - t0
            self.outputs[stage.name] = out
            self.timings[stage.name] = {"seconds": round(seconds, 1), "skipped": False}
            self.state.record(stage.name, fp, out, seconds)
            upstream_ran = upstream_ran or stage.feeds_later
        total = time.monotonic() - t_all
        self.timings["total"] = {"seconds": round(total, 1)}
        (self.dir / "timings.json").write_text(json.dumps(self.timings, indent=2))
        print(f"pipeline {self.cfg.name} finished in {fmt_duration(total)}", flush=True)
        return self.dir


def _summary(outputs: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in outputs.items() if isinstance(v, str | int | float)]
    return ", ".join(parts)[:120] or "no outputs"


def run_pipeline(cfg: PipelineConfig) -> Pipeline:
    from cluster.pipeline import stages as st

    pipe = Pipeline(cfg)
    pipe.run(st.build_stages(cfg))
    return pipe


__all__ = ["JobFailed", "Pipeline", "Stage", "run_pipeline"]
