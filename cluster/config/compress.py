"""The compression job: prune and/or quantize a registered model, evaluate, gate, publish.

``python -m train.compress -c configs/compress/small.yaml`` builds every variant listed here
from the same source model, measures it against that source, and publishes only the variants
that pass the gate (each with lineage and its measurements in the registry manifest).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cluster.config.base import StrictModel, deep_merge
from cluster.config.data import DataConfig
from cluster.config.distill import DistillConfig
from cluster.config.losses import KDLossConfig
from cluster.config.registry import RegistryConfig

GROUP_SIZES = (32, 64, 128)


class PruneConfig(StrictModel):
    method: Literal["magnitude", "2:4", "structured"] = Field(
        "magnitude",
        description="magnitude: zero the smallest |w| (unstructured); 2:4: keep the 2 largest of every 4 "
        "consecutive input weights; structured: remove attention heads and MLP channels (smaller matrices "
        "and a smaller config).",
    )
    sparsity: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Fraction removed: of the weights (magnitude), of the MLP channels (structured); "
        "fixed at 0.5 for 2:4.",
    )
    scope: Literal["global", "per_layer"] = Field(
        "global", description="magnitude: one threshold over all linear layers, or the same fraction in each."
    )
    head_sparsity: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="structured: fraction of query heads removed in every layer (uniformly per KV group, "
        "so every layer keeps the same shape and the config stays valid).",
    )
    channel_multiple: int = Field(
        32, ge=1, description="structured: the kept MLP width is rounded to a multiple of this (int4 groups)."
    )
    include_lm_head: bool = Field(False, description="magnitude/2:4: also prune lm_head (never when tied).")


class QuantSettings(StrictModel):
    scheme: Literal["int8", "int4", "w8a8", "w4a8"] = Field(
        "int8",
        description="int8 weight-only, int4 weight-only (group-wise), w8a8 (dynamic int8 activations), "
        "or w4a8 (int4 group-wise storage computed with int8 kernels and dynamic int8 activations).",
    )
    group_size: int = Field(
        128, description=f"int4/w4a8 group size along the input dimension, one of {GROUP_SIZES}."
    )
    symmetric: bool | None = Field(
        None,
        description="Symmetric quantization (no zero offset); default: true for int8/w8a8, false for int4/w4a8.",
    )
    calibration: Literal["rtn", "awq"] = Field(
        "rtn",
        description="rtn: round to nearest; awq: activation-aware per-channel scaling searched on "
        "calibration batches, then round to nearest.",
    )
    awq_grid: int = Field(20, ge=2, le=100, description="awq: points of the scaling-exponent grid in [0, 1].")
    modules_not_converted: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Module names (or dotted name parts) left in floating point.",
    )

    @model_validator(mode="after")
    def _check(self) -> QuantSettings:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} (got {self.group_size})")
        if self.scheme == "w8a8" and self.symmetric is False:
            raise ValueError("w8a8 needs symmetric weights (symmetric: true)")
        return self


class GateConfig(StrictModel):
    max_ppl_increase_pct: float = Field(
        5.0, ge=0, description="Largest held-out perplexity increase over the source model, in percent."
    )
    min_retention: float = Field(
        0.9, ge=0, le=1, description="Smallest retention = source ppl / variant ppl."
    )
    min_decode_speedup: float | None = Field(
        None, gt=0, description="If set: smallest decode tok/s (batch 1) ratio over the source model."
    )
    max_bytes_ratio: float | None = Field(
        None, gt=0, description="If set: largest bytes-on-disk ratio to the source model."
    )


class VariantConfig(StrictModel):
    name: str = Field(
        ..., pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Variant name (suffix of the published name)."
    )
    prune: PruneConfig | None = Field(None, description="Pruning step (before quantization), or none.")
    quant: QuantSettings | None = Field(None, description="Quantization step, or none.")
    gate: GateConfig | None = Field(None, description="This variant's gate; default: the job's gate.")
    publish: bool = Field(True, description="Publish this variant if it passes its gate.")

    @model_validator(mode="after")
    def _check(self) -> VariantConfig:
        if self.prune is None and self.quant is None:
            raise ValueError(f"variant {self.name!r} has neither prune nor quant")
        return self


class EvalConfig(StrictModel):
    seq_len: int = Field(128, ge=8, description="Context length of the held-out perplexity.")
    stride: int = Field(128, ge=1, description="Sliding-window stride (<= seq_len); seq_len = plain chunks.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    max_tokens: int | None = Field(
        32768, ge=2, description="Evaluate on at most this many val tokens (None = all)."
    )
    calib_tokens: int = Field(8192, ge=64, description="Calibration tokens (from the train split) for awq.")
    decode_prompt: int = Field(16, ge=1, description="Prompt tokens before timing decode.")
    decode_tokens: int = Field(32, ge=2, description="Generated tokens timed per decode measurement.")
    decode_batches: list[int] = Field(
        [1, 16], min_length=1, description="Batch sizes at which decode tok/s is measured."
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads for timing (default: torch's default)."
    )
    isolate: bool = Field(
        True,
        description="Measure decode speed and peak RAM in a fresh subprocess per model (false: in this "
        "process; faster, but peak RAM is then the job's).",
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) must be <= seq_len ({self.seq_len})")
        return self


class RecoveryConfig(StrictModel):
    """Prune, then distill (Minitron): the structurally pruned model is the student (``student_init``),
    the unpruned source the teacher, trained by the distillation job (Ray Train + DeepSpeed)."""

    enabled: bool = Field(False, description="Recover every structurally pruned variant by distillation.")
    steps: int = Field(200, ge=1, description="Optimizer steps of each recovery run.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, warm-up + cosine).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps (< steps).")
    seq_len: int | None = Field(None, ge=8, description="Training sequence length; default: eval.seq_len.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per step.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers.")
    loss: KDLossConfig = Field(
        default_factory=lambda: KDLossConfig(kind="fkl", temperature=1.0, alpha=1.0),
        description="Distillation loss; default: pure forward KL to the source's logits at T=1 (as Minitron).",
    )
    distill: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other distillation-job fields (nested, as in configs/distill/*.yaml), e.g. "
        "{zero_stage: 2, checkpoint_every: 50}; teacher, student, data, registry and publishing are the job's.",
    )


def recovers(v: VariantConfig) -> bool:
    """Whether recovery (when enabled) applies to this variant: structured pruning only."""
    return v.prune is not None and v.prune.method == "structured"


RESERVED_DISTILL = (
    "data",
    "teacher",
    "student",
    "student_preset",
    "student_init",
    "registry",
    "publish",
    "publish_name",
    "publish_alias",
    "run_dir",
)


class CompressConfig(StrictModel):
    source: str = Field(
        "student@latest",
        description="The model to compress: a registry ref (name@alias, name:VERSION, name) or a checkpoint directory.",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Corpus for calibration (train split) and evaluation (val split).",
    )
    data_dir: str | None = Field(
        None,
        description="An already prepared data directory (holding manifest.json) to use instead of "
        "preparing `data` here (e.g. the one `retort data` printed).",
    )
    variants: list[VariantConfig] = Field(
        default_factory=lambda: [
            VariantConfig(name="int8", quant=QuantSettings(scheme="int8")),
            VariantConfig(name="int4", quant=QuantSettings(scheme="int4", group_size=32, calibration="awq")),
        ],
        min_length=1,
        description="Variants built from the source, each evaluated and gated on its own.",
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="Default gate for every variant.")
    recovery: RecoveryConfig = Field(
        default_factory=RecoveryConfig,
        description="Distill structurally pruned variants from the source (a registry ref); quantized variants "
        "of a pruned model are then built from the recovered weights.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Where the source comes from and variants go."
    )
    publish_prefix: str | None = Field(
        None, description="Published name = <prefix>-<variant>; default: the source model's registry name."
    )
    fail_on_gate: bool = Field(
        True, description="Exit 1 if any variant fails its gate (passing ones still publish)."
    )
    out_dir: str = Field("runs/compress", description="Where variant checkpoints and the report are written.")
    seed: int = Field(0, description="Calibration sampling seed.")

    @model_validator(mode="after")
    def _check(self) -> CompressConfig:
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variant names: {', '.join(dup)}")
        if self.recovery.enabled:
            if not any(recovers(v) for v in self.variants):
                raise ValueError(
                    "recovery.enabled needs a variant with structured pruning (prune: {method: structured}); "
                    "magnitude / 2:4 zeros would be refilled by dense fine-tuning"
                )
            taken = sorted(set(self.recovery.distill) & set(RESERVED_DISTILL))
            if taken:
                raise ValueError(
                    f"recovery.distill may not set {', '.join(taken)}: the compress job sets them"
                )
            recovered = {f"{v.name}-recovered" for v in self.variants if recovers(v) and v.quant is None}
            clash = sorted(recovered & set(names))
            if clash:
                raise ValueError(f"variant name(s) {', '.join(clash)} clash with the recovered rows' names")
            self.recovery_distill(teacher=self.source, student_init="check:1", data=self.data, run_dir=".")
        return self

    def recovery_distill(
        self, teacher: str, student_init: str, data: DataConfig, run_dir: str
    ) -> DistillConfig:
        """The distillation job config of one recovery run (raises ValueError naming the bad field)."""
        r = self.recovery
        base = {
            "data": data.model_dump(),
            "teacher": teacher,
            "student_init": student_init,
            "loss": r.loss.model_dump(),
            "teacher_source": "online",
            "mode": "zero",
            "zero_stage": 1,
            "num_workers": r.num_workers,
            "micro_batch_size": r.micro_batch_size,
            "steps": r.steps,
            "seq_len": r.seq_len or self.eval.seq_len,
            "lr": r.lr,
            "warmup_steps": r.warmup_steps,
            "checkpoint_every": r.steps,
            "seed": self.seed,
            "registry": self.registry.model_dump(),
            "eval": {
                "seq_len": self.eval.seq_len,
                "stride": self.eval.stride,
                "batch_size": self.eval.batch_size,
                "max_tokens": self.eval.max_tokens,
                "teacher": False,
            },
            "publish": False,
            "run_dir": run_dir,
        }
        try:
            return DistillConfig.model_validate(deep_merge(base, r.distill))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(
                f"recovery: distill{'.' + where if where else ''}: {err['msg'].removeprefix('Value error, ')}"
            ) from None
