"""The teacher job (``retort teacher``) and its top-k cache job (``python -m train.topk``).

One config file drives both: ``train.teacher`` pretrains (or imports) a teacher and publishes it
to the registry; ``train.topk`` runs a published teacher over the training windows once and
stores its top-k log-probabilities for distillation without an online teacher. ``topk.enabled``
makes the teacher job build the cache right after publishing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config.base import StrictModel
from cluster.config.data import DataConfig
from cluster.config.model import PRESETS, ModelConfig
from cluster.config.registry import RegistryConfig


class TeacherTraining(StrictModel):
    steps: int = Field(600, ge=1, description="Optimizer steps (source=pretrain).")
    seq_len: int = Field(
        128, ge=8, description="Tokens per training sequence (packed windows of train.data.loader)."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay on matrices (not on norms or biases)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 = off).")
    seed: int = Field(0, ge=0, description="Weight init and data order seed.")
    eval_every: int = Field(
        100, ge=1, description="Measure val perplexity every N steps (on eval_tokens tokens)."
    )
    eval_tokens: int = Field(
        16384, ge=16, description="Val tokens read by the periodic (not the final) evaluation."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available, else cpu."
    )
    bf16: bool = Field(False, description="bf16 autocast on CUDA (ignored on CPU).")
    num_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads for this process (None = torch's default)."
    )


class TeacherEval(StrictModel):
    seq_len: int | None = Field(
        None, ge=8, description="Context length of the final held-out perplexity; default training.seq_len."
    )
    stride: int | None = Field(
        None, ge=1, description="Sliding-window stride (1..seq_len); default: seq_len (no overlap)."
    )
    batch_size: int = Field(16, ge=1, description="Windows per forward pass.")
    max_tokens: int | None = Field(
        131072, ge=16, description="Evaluate on at most this many val tokens (None = all)."
    )


class TopKConfig(StrictModel):
    enabled: bool = Field(
        False, description="Build the cache at the end of the teacher job (after publishing)."
    )
    teacher: str | None = Field(
        None,
        description="Teacher ref the top-k job reads (python -m train.topk); default: <name>@<alias>, or <name> if no alias.",
    )
    k: int = Field(
        32,
        ge=1,
        le=1024,
        description="Log-probabilities kept per position (bytes/token = 6k: int32 id + fp16 logprob).",
    )
    seq_len: int = Field(
        128, ge=8, description="Window length; must equal the distill job's seq_len (windows are aligned)."
    )
    batch_size: int = Field(16, ge=1, description="Windows per teacher forward pass.")
    shard_windows: int = Field(4096, ge=1, description="Windows per shard file.")
    max_windows: int | None = Field(
        None,
        ge=1,
        description="Cache only the first N windows (tests, quick demos); the distill job must stay below it.",
    )
    bf16: bool = Field(
        False,
        description="Run the teacher's forward under bf16 autocast (CPU with AVX512-BF16/AMX, or CUDA): about 2x "
        "faster on such CPUs; log-softmax and top-k stay fp32. Part of the cache's fingerprint.",
    )
    dir: str | None = Field(
        None,
        description="Output directory; default <data dir>/topk/<teacher name>-v<version>-L<seq_len>-k<k> "
        "(printed as the last stdout line of python -m train.topk).",
    )


class TeacherConfig(StrictModel):
    data: DataConfig = Field(
        default_factory=DataConfig, description="Corpus, tokenizer and token shards (train.data)."
    )
    source: Literal["pretrain", "import"] = Field(
        "pretrain",
        description="pretrain: train from scratch on data; import: read a Hugging Face checkpoint directory.",
    )
    model_preset: str = Field(
        "small", description=f"Architecture preset for pretraining ({', '.join(PRESETS)})."
    )
    model: ModelConfig | None = Field(
        None,
        description="Explicit architecture (overrides model_preset). vocab_size is set to the tokenizer's.",
    )
    import_dir: str | None = Field(
        None,
        description="source=import: HF checkpoint directory (Llama / Qwen2 / Mistral, safetensors) with its tokenizer.",
    )
    training: TeacherTraining = Field(default_factory=TeacherTraining, description="Pretraining schedule.")
    eval: TeacherEval = Field(default_factory=TeacherEval, description="Final held-out perplexity.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Where the teacher is published."
    )
    name: str = Field("teacher", description="Registry name to publish under.")
    alias: str | None = Field(
        "production",
        description="Alias to promote the new version to ('latest' is implicit; None = no promotion).",
    )
    out_dir: str = Field(
        "~/.retort/runs/teacher",
        description="Where the checkpoint directory is written before it is published.",
    )
    topk: TopKConfig = Field(default_factory=TopKConfig, description="The teacher's top-k logit cache.")

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.source == "import" and not self.import_dir:
            raise ValueError("source=import needs import_dir (a Hugging Face checkpoint directory)")
        if self.source == "pretrain" and self.model is None and self.model_preset not in PRESETS:
            raise ValueError(f"unknown model_preset {self.model_preset!r}; known: {', '.join(PRESETS)}")
        if self.eval.stride is not None and self.eval.stride > (self.eval.seq_len or self.training.seq_len):
            raise ValueError("eval.stride must not exceed the eval context length")
        return self

    def teacher_ref(self) -> str:
        """The ref the top-k job reads by default."""
        if self.topk.teacher:
            return self.topk.teacher
        return f"{self.name}@{self.alias}" if self.alias else self.name
