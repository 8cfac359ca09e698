"""The distillation job: data, teacher, student, loss, parallelism, schedule, checkpoints, publish.

``python -m train.distill -c configs/distill/tiny.yaml`` validates this schema before any
worker starts; every rule DeepSpeed or the batch arithmetic would otherwise trip over later
(pipelines with ZeRO >= 2, batch sizes that do not divide, more stages than layers) is refused
here with the reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster.config.base import StrictModel
from cluster.config.data import DataConfig
from cluster.config.losses import KDLossConfig
from cluster.config.model import PRESETS, ModelConfig, preset
from cluster.config.registry import RegistryConfig


class TopKSettings(StrictModel):
    dir: str | None = Field(
        None,
        description="Directory of the teacher's top-k cache (python -m train.topk). None: the cache train.topk "
        "writes by default for this teacher version and seq_len (<data dir>/topk/<name>-v<N>-L<seq_len>-k<k>).",
    )


class EvalSettings(StrictModel):
    seq_len: int | None = Field(
        None, ge=8, description="Context length of the held-out perplexity; default: seq_len."
    )
    stride: int | None = Field(
        None, ge=1, description="Sliding-window stride; default: the eval context length."
    )
    batch_size: int = Field(8, ge=1, description="Windows per forward pass during evaluation.")
    max_tokens: int | None = Field(
        65536, ge=1, description="Evaluate on at most this many val tokens (None = all)."
    )
    teacher: bool = Field(
        True, description="Also measure the teacher's perplexity (for retention = teacher/student)."
    )


class DistillConfig(StrictModel):
    data: DataConfig = Field(
        default_factory=DataConfig, description="Corpus, tokenizer and token shards (train.data)."
    )
    teacher: str = Field(
        "teacher@latest", description="Registry ref of the teacher: name@alias, name:VERSION or name."
    )
    student_preset: str = Field(
        "small-student", description=f"Student architecture preset ({', '.join(PRESETS)})."
    )
    student: ModelConfig | None = Field(
        None, description="Explicit student architecture; overrides student_preset."
    )
    student_init: str | None = Field(
        None,
        description="Start the student from this checkpoint instead of a fresh init: a registry ref (name@alias, "
        "name:VERSION) or a checkpoint directory. Its config.json is the student's architecture (an explicit "
        "student / student_preset must match it) and its tokenizer must be the data's.",
    )
    loss: KDLossConfig = Field(default_factory=KDLossConfig, description="The distillation loss.")
    teacher_source: Literal["online", "topk"] = Field(
        "online",
        description="online: the frozen teacher runs in every worker (no grad); topk: read the top-k cache.",
    )
    topk: TopKSettings = Field(default_factory=TopKSettings, description="Top-k cache settings.")
    mode: Literal["zero", "pipeline"] = Field(
        "zero",
        description="zero: data parallel with ZeRO; pipeline: the student as a DeepSpeed PipelineModule.",
    )
    zero_stage: int = Field(
        1, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3); pipeline mode allows 0-1."
    )
    num_workers: int = Field(
        2, ge=1, description="Ray Train workers (one process each; one GPU each if use_gpu)."
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; otherwise CPU and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    pipeline_stages: int = Field(
        2, ge=2, description="Pipeline stages (mode=pipeline); num_workers must be a multiple."
    )
    micro_batch_size: int = Field(4, ge=1, description="Sequences per micro-batch per data-parallel rank.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (pipeline: micro-batches in flight)."
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="If set, must equal micro_batch_size * grad_accum * data-parallel world (checked).",
    )
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms/biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 = off).")
    compile: bool = Field(
        False,
        description="torch.compile the student's and the online teacher's decoder blocks (GPU: fused kernels; "
        "the first steps compile). ZeRO <= 2.",
    )
    fused_kd: bool = Field(
        False,
        description="Online teacher, zero mode: compute the KD loss from both models' final hidden states in token "
        "chunks (train/distill/fused_kd.py), never materialising the (tokens, vocab) logits; with compile, each "
        "chunk is one compiled pass. Same loss and gradients as the reference loss. ZeRO <= 2.",
    )
    bf16: bool = Field(
        False, description="bf16 mixed precision (GPUs with bf16; CPU runs stay fp32 if false)."
    )
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU (stage >= 1).")
    seed: int = Field(0, description="Student init, data order and dropout seed.")
    checkpoint_every: int = Field(
        50, ge=1, description="Save a DeepSpeed checkpoint and report it to Ray Train every N steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray Train keeps (oldest deleted).")
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts Ray Train allows (each resumes from the last checkpoint)."
    )
    log_every: int = Field(10, ge=1, description="Report metrics to Ray Train every N steps.")
    eval: EvalSettings = Field(
        default_factory=EvalSettings, description="Held-out evaluation after training."
    )
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Where the teacher comes from and the student goes."
    )
    publish: bool = Field(True, description="Publish the final student to the registry.")
    publish_name: str = Field("student", description="Registry name of the published student.")
    publish_alias: str | None = Field(
        None,
        description="Alias moved to the new version (None = none; NAME@latest always means the newest version).",
    )
    run_dir: str = Field(
        "runs/distill", description="Run directory: Ray Train storage, checkpoints, exported student."
    )

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        # a student_init registry ref has no architecture until make_plan resolves it (and checks it then)
        model = (
            None
            if self.student is None and self.student_init and not init_is_dir(self.student_init)
            else self.student_model()
        )
        if self.mode == "pipeline":
            if self.zero_stage >= 2:
                raise ValueError(
                    f"mode=pipeline with zero_stage={self.zero_stage}: DeepSpeed's pipeline engine asserts ZeRO < 2 "
                    "(ZeRO-2/3 partition gradients/parameters, which pipeline parallelism cannot combine with); "
                    "use zero_stage 0 or 1, or mode=zero"
                )
            if self.teacher_source != "topk":
                raise ValueError(
                    "mode=pipeline takes its KD labels from the top-k cache: set teacher_source=topk"
                )
            if self.num_workers % self.pipeline_stages:
                raise ValueError(
                    f"num_workers ({self.num_workers}) must be a multiple of pipeline_stages ({self.pipeline_stages})"
                )
            if model is not None and self.pipeline_stages > model.n_layers:
                raise ValueError(
                    f"pipeline_stages ({self.pipeline_stages}) > the student's n_layers ({model.n_layers}): "
                    "every stage needs at least one decoder block"
                )
            if self.loss.hidden_weight > 0:
                raise ValueError(
                    "loss.hidden_weight > 0 needs an online teacher; pipeline mode uses the top-k cache"
                )
        if self.teacher_source == "topk" and self.loss.hidden_weight > 0:
            raise ValueError(
                "loss.hidden_weight > 0 needs teacher_source=online (the cache holds no hidden states)"
            )
        if self.compile and self.zero_stage >= 3:
            raise ValueError(
                "compile with zero_stage=3: ZeRO-3's parameter hooks break torch.compile graphs; use stage <= 2"
            )
        if self.fused_kd:
            if self.mode != "zero" or self.teacher_source != "online":
                raise ValueError(
                    "fused_kd needs mode=zero with teacher_source=online (it fuses the online teacher's "
                    "LM head into the loss); set fused_kd=false for the top-k cache or pipeline mode"
                )
            if self.zero_stage >= 3:
                raise ValueError(
                    "fused_kd with zero_stage=3: ZeRO-3 partitions the LM-head weight the fused loss "
                    "reads outside the module's forward; use stage <= 2 or fused_kd=false"
                )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "offload_optimizer needs zero_stage >= 1 (ZeRO-Offload partitions the optimizer state)"
            )
        if self.publish_alias == "latest":
            raise ValueError(
                "publish_alias 'latest' is implicit (the newest version); use another alias or null"
            )
        want = self.micro_batch_size * self.grad_accum * self.dp_world
        if self.global_batch_size is not None and self.global_batch_size != want:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) != micro_batch_size ({self.micro_batch_size}) x "
                f"grad_accum ({self.grad_accum}) x data-parallel world ({self.dp_world}) = {want}"
            )
        if model is not None and self.seq_len > model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) > the student's max_seq_len ({model.max_seq_len})")
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self

    def student_model(self) -> ModelConfig:
        if self.student is not None:
            return self.student
        if self.student_init is not None:
            return init_architecture(self.student_init)
        if self.student_preset not in PRESETS:
            raise ValueError(f"unknown student_preset {self.student_preset!r}; known: {', '.join(PRESETS)}")
        return preset(self.student_preset)

    @property
    def dp_world(self) -> int:
        """Data-parallel world size: every worker in zero mode, workers / stages in pipeline mode."""
        return self.num_workers // self.pipeline_stages if self.mode == "pipeline" else self.num_workers

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_world

    def training_hash(self) -> str:
        """Hash of everything that shapes the optimisation trajectory (what a resume must not change).

        Excludes fields that may legitimately change between a run and its resume: the failure
        budget, the checkpoint cadence, logging, eval and publishing.
        """
        d = self.model_dump(mode="json")
        for k in (
            "max_failures",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "eval",
            "publish",
            "publish_name",
            "publish_alias",
            "registry",
            "cpus_per_worker",
            "run_dir",
        ):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def init_is_dir(student_init: str) -> bool:
    return Path(student_init).expanduser().is_dir()


def init_architecture(student_init: str) -> ModelConfig:
    """The architecture in a ``student_init`` checkpoint directory's config.json."""
    from cluster.checkpoint import config_from_hf, read_hf_config  # torch: only when a checkpoint is read

    if not init_is_dir(student_init):
        raise ValueError(
            f"student_init {student_init!r} is not a checkpoint directory (a registry ref is "
            "resolved by train.distill.job.make_plan)"
        )
    path = Path(student_init).expanduser()
    return config_from_hf(read_hf_config(path), source=str(path / "config.json"))
