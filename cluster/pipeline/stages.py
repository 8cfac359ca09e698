"""The stages of ``retort pipeline`` and how each one's outputs feed the next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.checkpoint import weights_sha256
from cluster.config import load_config, schema_for
from cluster.config.pipeline import PipelineConfig
from cluster.errors import JobFailed, RetortError
from cluster.pipeline.orchestrator import Pipeline, Stage
from cluster.pipeline.runner import REPO, StageRun, execute, retort_cmd


def _cfg(p: Pipeline | PipelineConfig, stage: str, wired: list[str] | None = None, kind: str | None = None):
    """The resolved config of ``stage`` (its file, its overrides, then what earlier stages wired in)."""
    pcfg = p if isinstance(p, PipelineConfig) else p.cfg
    spec = getattr(pcfg, stage)
    return load_config(REPO / spec.config, schema_for(kind or stage), [*spec.overrides, *(wired or [])])


# --- up ---------------------------------------------------------------------------------------
def run_up(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    spec = p.cfg.cluster
    execute(
        StageRun("up", retort_cmd("up", "-c", spec.config, *spec.overrides), p.logs / "up.log"),
        p.index,
        p.total,
    )
    from cluster.local_cluster import dashboard_url

    return {"dashboard": dashboard_url()}


def cluster_alive(p: Pipeline, out: dict[str, Any]) -> bool:
    from cluster.local_cluster import dashboard_url

    return dashboard_url() is not None


# --- data -------------------------------------------------------------------------------------
def run_data(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    stage = Stage("data", "data", p.cfg.data, run_data)
    manifest = p.job(stage, wired)
    if not Path(manifest).is_file():
        raise JobFailed(f"data stage did not print a manifest path (last line: {manifest!r})")
    m = json.loads(Path(manifest).read_text())
    return {"manifest": manifest, "fingerprint": m.get("fingerprint"), "n_tokens": m.get("n_tokens")}


def file_exists(key: str):
    return lambda p, out: bool(out.get(key)) and Path(out[key]).exists()


def topk_cache_current(p: Pipeline, out: dict[str, Any]) -> bool:
    """The cache exists and was built by the teacher this run has: a teacher trained again under the
    same ref (a fresh registry numbers it v1 again) has other weights, and needs a new cache."""
    manifest = Path(out.get("dir", "")) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        built_by = json.loads(manifest.read_text()).get("teacher_sha256")
        return built_by == weights_sha256(p.registry.resolve(p.outputs["teacher"]["ref"]))
    except (OSError, ValueError, RetortError):
        return False


# --- teacher (+ its top-k cache when the distillation reads one) -----------------------------
def run_teacher(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    cfg = _cfg(p, "teacher", wired)
    before = p.refs_of(cfg.name)
    p.job(Stage("teacher", "teacher", p.cfg.teacher, run_teacher), wired)
    new = p.new_versions(cfg.name, before)
    if not new:
        raise JobFailed(f"teacher stage published no new version of {cfg.name!r}")
    return {"ref": new[-1]["ref"], "metrics": new[-1]["metrics"]}


def refs_ok(p: Pipeline, out: dict[str, Any]) -> bool:
    refs = [out["ref"]] if "ref" in out else [v["ref"] for v in out.get("variants", [])]
    return bool(refs) and all(p.ref_ok(r) for r in refs)


def distill_reads_topk(cfg: PipelineConfig) -> bool:
    d = _cfg(cfg, "distill")
    return d.teacher_source == "topk" or d.mode == "pipeline"


def topk_windows(cfg: PipelineConfig) -> int:
    """Windows the distillation stages draw: ``steps x global_batch`` of each one that reads the cache.

    A distill job reads ``tokens[:cache.token_limit]`` (``n_windows * seq_len + 1`` tokens), so its
    loader draws a permutation of exactly the cached windows; with ``n_windows = steps x global_batch``
    one epoch is the whole run and every cached window is read once (a longer run starts another epoch
    over the same windows, never an uncached one).
    """
    specs = [s for s in ("distill", "baseline") if getattr(cfg, s).enabled]
    return max(
        d.steps * d.global_batch
        for d in (_cfg(cfg, s, kind="distill") for s in specs)
        if d.teacher_source == "topk" or d.mode == "pipeline"
    )


def wire_topk(p: Pipeline) -> list[str]:
    from cluster.registry import parse_ref

    d, t = _cfg(p, "distill"), _cfg(p, "teacher")
    windows = topk_windows(p.cfg)
    if t.topk.max_windows is not None:
        windows = min(windows, t.topk.max_windows)
    ref = parse_ref(p.outputs["teacher"]["ref"])
    # in this run's folder: a fresh registry numbers its teacher v1 again, and a shared
    # <data dir>/topk/teacher-v1-... of another registry's teacher would be refused
    name = f"{ref.name}-v{ref.version}-L{d.seq_len}-k{t.topk.k}-w{windows}{'-bf16' if t.topk.bf16 else ''}"
    return [
        f"topk.teacher={p.outputs['teacher']['ref']}",
        f"topk.seq_len={d.seq_len}",
        f"topk.max_windows={windows}",
        f"topk.dir={p.dir / 'topk' / name}",
    ]


def run_topk(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    last = p.job(Stage("topk", "teacher", p.cfg.teacher, run_topk), wired, "--topk", subcommand="teacher")
    if not Path(last).is_dir():
        raise JobFailed(f"top-k stage did not print its cache directory (last line: {last!r})")
    return {"dir": last}


# --- distill ----------------------------------------------------------------------------------
def wire_distill(p: Pipeline) -> list[str]:
    wired = [f"teacher={p.outputs['teacher']['ref']}"]
    if "topk" in p.outputs:
        wired.append(f"topk.dir={p.outputs['topk']['dir']}")
    return wired


def distill_runner(stage_name: str):
    def run(p: Pipeline, wired: list[str]) -> dict[str, Any]:
        spec = getattr(p.cfg, stage_name)
        cfg = _cfg(p, stage_name, wired, kind="distill")
        before = p.refs_of(cfg.publish_name)
        p.job(Stage(stage_name, "distill", spec, run), wired, subcommand="distill")
        new = p.new_versions(cfg.publish_name, before)
        if not new:
            raise JobFailed(f"{stage_name} stage published no new version of {cfg.publish_name!r}")
        return {"ref": new[-1]["ref"], "metrics": new[-1]["metrics"]}

    return run


# --- compress + promote -----------------------------------------------------------------------
def wire_compress(p: Pipeline) -> list[str]:
    return [f"source={p.outputs['distill']['ref']}"]


def run_compress(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    cfg = _cfg(p, "compress", wired)
    names = sorted(set(compress_publish_names(cfg)))
    before = {n: p.refs_of(n) for n in names}
    p.job(Stage("compress", "compress", p.cfg.compress, run_compress), wired)
    variants = [
        dict(ref=r["ref"], metrics=r["metrics"], quantization=r["quantization"], sparsity=r["sparsity"])
        for n in names
        for r in p.new_versions(n, before[n])
    ]
    if not variants:
        raise JobFailed("compress stage published no variant (every variant failed the gate)")
    return {"variants": variants}


def compress_publish_names(cfg) -> list[str]:
    """Registry names the compress job publishes under: ``<publish_prefix or source name>-<variant>``."""
    from cluster.registry import parse_ref

    prefix = cfg.publish_prefix or parse_ref(cfg.source).name
    return [f"{prefix}-{v.name}" for v in cfg.variants if v.publish]


def run_promote(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    suffixes = tuple(f"-{c}" for c in p.cfg.promote_candidates)
    variants = [v for v in p.outputs["compress"]["variants"] if v["ref"].split(":")[0].endswith(suffixes)]
    if not variants:
        raise JobFailed(
            f"no published variant is a promotion candidate ({', '.join(p.cfg.promote_candidates)})"
        )
    key = p.cfg.promote_by

    def score(v: dict[str, Any]) -> float:
        value = v["metrics"].get(key)
        return float(value) if isinstance(value, int | float) else float("-inf")

    best = max(variants, key=score)
    name, _, version = best["ref"].partition(":")
    p.registry.promote(name, int(version), p.cfg.promote_alias)
    ref = f"{name}@{p.cfg.promote_alias}"
    print(
        f"✔ [{p.index}/{p.total}] promote   {best['ref']} -> {ref} (best {key}={best['metrics'].get(key)})",
        flush=True,
    )
    return {"ref": best["ref"], "alias_ref": ref}


def promoted(p: Pipeline, out: dict[str, Any]) -> bool:
    try:
        return p.registry.ref(out["alias_ref"]) == p.registry.ref(out["ref"])
    except RetortError:
        return False


# --- serve + loadtest -------------------------------------------------------------------------
def wire_serve(p: Pipeline) -> list[str]:
    return [f"model.ref={p.outputs['promote']['ref']}"]


def run_serve(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    cfg = _cfg(p, "serve", wired)
    last = p.job(Stage("serve", "serve", p.cfg.serve, run_serve), wired, subcommand="serve deploy")
    url = last if last.startswith("http") else f"http://{cfg.http.host}:{cfg.http.port}"
    return {"url": url.rstrip("/"), "ref": p.outputs["promote"]["ref"], "app": cfg.app_name}


def serving(p: Pipeline, out: dict[str, Any]) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(out["url"] + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wire_loadtest(p: Pipeline) -> list[str]:
    return [f"target.base_url={p.outputs['serve']['url']}"]


def run_loadtest(p: Pipeline, wired: list[str]) -> dict[str, Any]:
    # exit 1 = an SLO was broken: the run still produced its summary, which the report shows
    last = p.job(Stage("loadtest", "loadtest", p.cfg.loadtest, run_loadtest), wired, ok_codes=(0, 1))
    if not Path(last).is_file():
        raise JobFailed(f"load test did not print its summary path (last line: {last!r})")
    return {"summary": last}


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    stages = [
        Stage(
            "up", "cluster", cfg.cluster, run_up, check=cluster_alive, feeds_later=False
        ),  # a restart changes no data
        Stage("data", "data", cfg.data, run_data, check=file_exists("manifest")),
        Stage("teacher", "teacher", cfg.teacher, run_teacher, check=refs_ok),
    ]
    if distill_reads_topk(cfg):
        stages.append(
            Stage("topk", "teacher", cfg.teacher, run_topk, wire=wire_topk, check=topk_cache_current)
        )
    stages += [
        Stage("distill", "distill", cfg.distill, distill_runner("distill"), wire=wire_distill, check=refs_ok),
        Stage(
            "baseline", "distill", cfg.baseline, distill_runner("baseline"), wire=wire_distill, check=refs_ok
        ),
        Stage("compress", "compress", cfg.compress, run_compress, wire=wire_compress, check=refs_ok),
        Stage("promote", None, None, run_promote, check=promoted),
        Stage("serve", "serve", cfg.serve, run_serve, wire=wire_serve, check=serving),
        Stage(
            "loadtest",
            "loadtest",
            cfg.loadtest,
            run_loadtest,
            wire=wire_loadtest,
            check=file_exists("summary"),
        ),
    ]
    return stages
