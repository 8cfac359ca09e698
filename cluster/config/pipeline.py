"""The whole chain (``retort pipeline``): which stage configs to run, and what the report assumes."""

from __future__ import annotations

from pydantic import Field

from cluster.config.base import StrictModel
from cluster.config.registry import RegistryConfig


class StageSpec(StrictModel):
    config: str = Field(
        ..., description="Path of the stage's own config file (configs/<kind>/<preset>.yaml)."
    )
    overrides: list[str] = Field(
        default_factory=list, description="Dotted key=value overrides for that config."
    )
    enabled: bool = Field(True, description="Run this stage (a disabled stage is reported as skipped).")


class CostAssumptions(StrictModel):
    requests_per_day: int = Field(
        1_000_000, ge=1, description="Request volume the cost table is computed for."
    )
    output_tokens_per_request: int = Field(128, ge=1, description="Mean generated tokens per request.")
    replica_cost_per_hour: float = Field(
        0.10, ge=0, description="Price of one replica-hour (USD) on this hardware."
    )
    headroom: float = Field(
        1.5, ge=1, description="Capacity multiplier over the mean load (peaks, failover)."
    )


class PipelineConfig(StrictModel):
    name: str = Field("demo", description="Run name: state and report go to <runs_dir>/<name>/.")
    runs_dir: str = Field("runs", description="Folder of pipeline runs (relative to the repo).")
    local_jobs: bool = Field(
        False,
        description="Run the job stages as local subprocesses (--local) instead of Ray jobs on the cluster.",
    )
    cluster: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/cluster/local.yaml"),
        description="`retort up` config.",
    )
    data: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/data/small.yaml"),
        description="Corpus -> tokenizer -> shards.",
    )
    teacher: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/teacher/small.yaml"),
        description="Teacher pretraining and top-k cache.",
    )
    distill: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/distill/small.yaml"),
        description="Ray Train + DeepSpeed distillation.",
    )
    baseline: StageSpec = Field(
        default_factory=lambda: StageSpec(
            config="configs/distill/small.yaml",
            overrides=[
                "loss.alpha=0.0",
                "publish_name=student-nokd",
                "publish_alias=null",
                "eval.teacher=false",
                "run_dir=runs/distill-nokd",
            ],
        ),
        description="The same student trained on the same tokens without KD (alpha=0), for the KD-vs-scratch table.",
    )
    compress: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/compress/small.yaml"),
        description="Prune / quantize / gate.",
    )
    serve: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/serve/small.yaml"),
        description="Ray Serve deployment.",
    )
    loadtest: StageSpec = Field(
        default_factory=lambda: StageSpec(config="configs/loadtest/small.yaml"), description="Locust run."
    )
    promote_alias: str = Field(
        "production", description="Alias the best passing compressed variant is promoted to."
    )
    promote_by: str = Field(
        "tok_s_b1",
        description="Metric (in the variants' registry manifests) that picks the best variant; higher wins.",
    )
    promote_candidates: list[str] = Field(
        default_factory=lambda: ["int8", "w8a8", "int4", "w4a8"],
        description="Variant names (the part after '<model>-') eligible for promotion; others are only reported.",
    )
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="The registry all stages share."
    )
    cost: CostAssumptions = Field(
        default_factory=CostAssumptions, description="Assumptions of the report's cost table."
    )
    keep_serving: bool = Field(
        True, description="Leave the model deployed after the pipeline (the demo ends serving)."
    )
