"""The compression job: source model -> variants (prune / quantize) -> measure -> gate -> publish.

    python -m train.compress -c configs/compress/small.yaml
    ray job submit --working-dir . -- python -m train.compress -c configs/compress/small.yaml

Every variant is built from a fresh copy of the source, written as a self-describing checkpoint
(``quantization_config`` / ``pruning`` in config.json), loaded back through
``Transformer.from_pretrained`` (the path the server takes) and measured against the source.
Only variants that pass their gate are published, with lineage ``{parents: [source ref]}`` and
their measurements; if any fails and ``fail_on_gate`` is set, the job exits 1 after printing the
table that says why.

With ``recovery.enabled`` (Minitron: prune, then distill), every structurally pruned variant is
also distilled from the unpruned source: the distillation job (``train.distill.job.run``, Ray
Train + DeepSpeed) runs as a sub-step with ``teacher`` = the source and ``student_init`` = the
pruned checkpoint. A prune-only variant ``X`` then gets a second row ``X-recovered`` next to
``X``; a variant that prunes and quantizes is quantized from the recovered weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.config.base import dump_yaml
from cluster.config.compress import CompressConfig, VariantConfig, recovers
from cluster.config.data import DataConfig
from cluster.errors import JobFailed, RetortError
from cluster.model import Transformer
from cluster.tokenizer import copy_tokenizer_files
from train.compress.gate import apply_gate, evaluate
from train.compress.prune import prune_model
from train.compress.quantize import bitwidth_mse, quantize
from train.compress.table import bitwidth_table, optimization_table


@dataclass
class Source:
    path: Path
    ref: str  # "name:3", or the directory for a local source
    name: str


@dataclass
class Recovered:
    """A structurally pruned model after recovery distillation."""

    dir: Path  # the distilled student (checkpoint + tokenizer)
    pruning: dict[str, Any]  # the prune step's record
    record: dict[str, Any]  # teacher, schedule, distillation run dir and metrics


@dataclass
class Outcome:
    name: str
    dir: Path
    metrics: dict[str, Any]
    passed: bool = True
    reasons: list[str] = field(default_factory=list)
    published: str | None = None
    variant: VariantConfig | None = None
    recovery: dict[str, Any] | None = None  # set when built from recovered weights


def resolve_source(cfg: CompressConfig) -> Source:
    local = Path(cfg.source).expanduser()
    if local.is_dir():
        return Source(local.resolve(), str(local.resolve()), local.resolve().name)
    from cluster.registry import open_registry

    reg = open_registry(cfg.registry)
    ref = reg.ref(cfg.source)
    return Source(reg.resolve(ref), str(ref), ref.name)


def load_tokens(cfg: CompressConfig, need_train: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(val tokens, train tokens or None, tokenizer vocab size) from the prepared data."""
    from train.data import load_manifest, load_split, prepare

    manifest = load_manifest(Path(cfg.data_dir).expanduser()) if cfg.data_dir else prepare(cfg.data)
    val = load_split(manifest.dir, "val")
    train = load_split(manifest.dir, "train") if need_train else None
    return val, train, manifest.vocab_size


def build_variant(
    src: Source,
    v: VariantConfig,
    cfg: CompressConfig,
    train_tokens: np.ndarray | None,
    out: Path,
    recovered: Recovered | None = None,
) -> Path:
    """Prune and/or quantize a fresh copy of the source into ``out`` (a checkpoint directory).

    With ``recovered``, start from its weights instead: the source pruned ``v``'s way, then distilled.
    """
    model = Transformer.from_pretrained(src.path if recovered is None else recovered.dir)
    extra: dict[str, Any] = {}
    if getattr(model, "quantization_config", None):
        raise RetortError(
            f"source {src.ref} is already quantized ({model.quantization_config['scheme']}); "
            "compress a floating-point model"
        )
    if recovered is not None:
        extra["pruning"], extra["recovery"] = recovered.pruning, recovered.record
    elif v.prune is not None:
        model, extra["pruning"] = prune_model(model, v.prune)
    if v.quant is not None:
        model, record = quantize(
            model, v.quant, train_tokens, cfg.eval.calib_tokens, cfg.eval.seq_len, cfg.seed
        )
        extra["quantization_config"] = {**model.quantization_config, **record}
    extra["retort_compress"] = {
        "variant": v.model_dump(mode="json"),
        "source": src.ref,
        "recovered": recovered is not None,
    }
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, extra_config=extra)
    if (src.path / "tokenizer.json").is_file():  # variants serve with their source's tokenizer
        copy_tokenizer_files(src.path, out)
    return out


def data_config(cfg: CompressConfig) -> DataConfig:
    """The data section the recovery distillation prepares (that of ``data_dir`` when one is given)."""
    if not cfg.data_dir:
        return cfg.data
    from train.data import load_manifest

    m = load_manifest(Path(cfg.data_dir).expanduser())
    return DataConfig.model_validate({**m.raw["config"], "out_dir": str(m.dir.parent)})


def recover(cfg: CompressConfig, src: Source, v: VariantConfig, out: Path) -> Recovered:
    """Prune the source ``v``'s way, then distill the pruned model from the unpruned source.

    Runs the distillation job itself (``train.distill.job.run``: Ray Train + DeepSpeed, checked
    like any distillation: tokenizer, registry sha256), unpublished; its run dir is ``out/distill``.
    """
    from train.distill.job import run as distill

    init = build_variant(src, VariantConfig(name=v.name, prune=v.prune), cfg, None, out / "init")
    pruning = json.loads((init / "config.json").read_text())["pruning"]
    try:
        dcfg = cfg.recovery_distill(
            teacher=src.ref, student_init=str(init), data=data_config(cfg), run_dir=str(out / "distill")
        )
    except ValueError as e:
        raise RetortError(str(e)) from None
    t = time.perf_counter()
    metrics = distill(dcfg)
    record = {
        "teacher": src.ref,
        "method": "distill",
        "steps": dcfg.steps,
        "lr": dcfg.lr,
        "tokens": dcfg.steps * dcfg.global_batch * dcfg.seq_len,
        "loss": dcfg.loss.model_dump(mode="json"),
        "run_dir": str(out / "distill"),
        "seconds": round(time.perf_counter() - t, 1),
        "distill_metrics": {k: metrics[k] for k in ("val_ppl", "train_tokens_per_s") if k in metrics},
    }
    return Recovered(out / "distill" / "student", pruning, record)


def _measure(name: str, path: Path, val: np.ndarray, cfg: CompressConfig, vocab: int) -> dict[str, Any]:
    t = time.perf_counter()
    model = Transformer.from_pretrained(path)
    m = evaluate(path, model, val, cfg.eval, vocab_size=vocab)
    print(
        f"[compress] {name}: ppl {m['ppl']:.3f}, {m['bytes'] / 1e6:.2f} MB, "
        f"{', '.join(f'{k}={v}' for k, v in m.items() if k.startswith('tok_s'))} ({time.perf_counter() - t:.0f}s)",
        flush=True,
    )
    return m


def publish(cfg: CompressConfig, src: Source, o: Outcome, derived: dict[str, float]) -> str:
    from cluster.registry import open_registry

    reg = open_registry(cfg.registry)
    name = f"{cfg.publish_prefix or src.name}-{o.name}"
    lineage = {
        "parents": [src.ref],
        "job": "compress",
        "variant": o.name,
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
    }
    if o.recovery is not None:
        lineage["recovery"] = o.recovery
    return str(reg.publish(name, o.dir, lineage=lineage, metrics={**o.metrics, **derived}))


class Progress:
    """``[compress] (k/N) what``: which step of the job runs now."""

    def __init__(self, cfg: CompressConfig) -> None:
        recoveries = (
            len(
                {
                    json.dumps(v.prune.model_dump(mode="json"), sort_keys=True)
                    for v in cfg.variants
                    if recovers(v)
                }
            )
            if cfg.recovery.enabled
            else 0
        )
        extra_rows = sum(recovers(v) and v.quant is None for v in cfg.variants) if cfg.recovery.enabled else 0
        self.k, self.n = 0, 1 + len(cfg.variants) + recoveries + extra_rows

    def __call__(self, what: str) -> None:
        self.k += 1
        print(f"[compress] ({self.k}/{self.n}) {what}", flush=True)


def run(cfg: CompressConfig, publish_results: bool = True) -> list[Outcome]:
    torch.manual_seed(cfg.seed)
    src = resolve_source(cfg)
    if cfg.recovery.enabled and Path(src.ref).is_absolute():
        raise RetortError(
            f"recovery distills from the source as teacher, which must be a registry ref; "
            f"source {src.ref} is a directory: publish it first (retort registry publish)"
        )
    out_root = Path(cfg.out_dir).expanduser() / f"{src.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "config.yaml").write_text(dump_yaml(cfg))
    need_train = any(v.quant is not None and v.quant.calibration != "rtn" for v in cfg.variants)
    val, train_tokens, vocab = load_tokens(cfg, need_train)
    print(f"[compress] source {src.ref} ({src.path}); {len(cfg.variants)} variants -> {out_root}", flush=True)
    step = Progress(cfg)
    step("measure baseline")
    base = Outcome("baseline", src.path, _measure("baseline", src.path, val, cfg, vocab))
    outcomes: list[Outcome] = []
    recovered: dict[str, Recovered] = {}  # one recovery per distinct structured prune config

    def add(v: VariantConfig, name: str, rec: Recovered | None) -> None:
        step(f"build and measure {name}" + (" (from recovered weights)" if rec is not None else ""))
        path = build_variant(src, v, cfg, train_tokens, out_root / name, rec)
        o = Outcome(
            name,
            path,
            _measure(name, path, val, cfg, vocab),
            variant=v,
            recovery=rec.record if rec is not None else None,
        )
        res = apply_gate(o.metrics, base.metrics, v.gate or cfg.gate)
        o.passed, o.reasons = res.passed, res.reasons
        o.metrics.update(res.derived)
        outcomes.append(o)

    for v in cfg.variants:
        rec = None
        if cfg.recovery.enabled and recovers(v):
            key = json.dumps(v.prune.model_dump(mode="json"), sort_keys=True)
            if key not in recovered:
                step(
                    f"recovery of {v.name}: distill the pruned model from {src.ref} ({cfg.recovery.steps} steps)"
                )
                recovered[key] = recover(cfg, src, v, out_root / f"recovery-{len(recovered)}")
            rec = recovered[key]
        if rec is None or v.quant is None:  # the plain pruned row stays, next to the recovered one
            add(v, v.name, None)
        if rec is not None:
            add(v, v.name if v.quant is not None else f"{v.name}-recovered", rec)
    for o in outcomes:  # publish only after every variant is measured and gated
        v = o.variant
        if o.passed and v.publish and publish_results:
            o.published = publish(cfg, src, o, {})
            print(f"[compress] published {o.published}", flush=True)
    report = write_report(out_root, base, outcomes, cfg)
    print(report, flush=True)
    failed = [o for o in outcomes if not o.passed]
    if failed and cfg.fail_on_gate and publish_results:
        raise JobFailed(
            "gate refused "
            + ", ".join(f"{o.name} ({'; '.join(o.reasons)})" for o in failed)
            + f"; nothing published for them (table: {out_root / 'report.md'})"
        )
    return outcomes


def write_report(out_root: Path, base: Outcome, outcomes: list[Outcome], cfg: CompressConfig) -> str:
    rows = [{"name": "baseline", **base.metrics, "gate": "source"}]
    for o in outcomes:
        gate = ("pass -> " + o.published) if o.published else ("pass" if o.passed else "FAIL")
        name = (
            f"{o.name} (recovered)"
            if o.recovery is not None and not o.name.endswith("-recovered")
            else o.name
        )
        rows.append({"name": name, **o.metrics, "gate": gate, "reasons": o.reasons})
    table = optimization_table(rows, cfg.eval.decode_batches)
    mse = bitwidth_table(bitwidth_mse(Transformer.from_pretrained(base.dir)))
    text = f"# Compression of {base.dir}\n\n{table}\n\nPer-bit-width weight quantization error (RTN, per channel):\n\n{mse}\n"
    (out_root / "report.md").write_text(text)
    (out_root / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    return text
