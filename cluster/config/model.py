"""The model's architecture: one Llama-family decoder (Llama, Qwen2, Mistral-style GQA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config.base import StrictModel


class ModelConfig(StrictModel):
    arch: Literal["llama", "qwen2"] = Field(
        "llama", description="Checkpoint family: llama (no qkv bias) or qwen2 (qkv bias)."
    )
    vocab_size: int = Field(
        8192, ge=2, description="Rows of the embedding / LM head (may exceed the tokenizer's vocab: padding)."
    )
    d_model: int = Field(256, ge=8, description="Hidden size (HF hidden_size).")
    n_layers: int = Field(4, ge=1, description="Decoder blocks (HF num_hidden_layers).")
    n_heads: int = Field(4, ge=1, description="Query heads (HF num_attention_heads).")
    n_kv_heads: int = Field(4, ge=1, description="Key/value heads; 1 = MQA, n_heads = MHA, between = GQA.")
    head_dim: int | None = Field(None, ge=4, description="Per-head size; default d_model // n_heads.")
    d_ff: int = Field(768, ge=8, description="SwiGLU inner size (HF intermediate_size).")
    max_seq_len: int = Field(512, ge=8, description="Context length (HF max_position_embeddings).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the embedding matrix with the LM head.")
    qkv_bias: bool = Field(False, description="Bias on q/k/v projections (Qwen2).")
    init_std: float = Field(0.02, gt=0, description="Normal init std for fresh weights.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.dim_head % 2:
            raise ValueError(f"head_dim ({self.dim_head}) must be even for RoPE")
        return self

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


PRESETS: dict[str, dict] = {
    # tests: seconds on a CPU
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256),
    # the CPU demo's teacher (~6M params with an 4k vocab)
    "small": dict(
        vocab_size=4096, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=512
    ),
    # the CPU demo's student (about a quarter of the teacher)
    "small-student": dict(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        d_ff=352,
        max_seq_len=512,
        tie_embeddings=True,
    ),
    # one GPU: ~125M (GPT-2-small sized Llama)
    "base": dict(
        vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, max_seq_len=2048
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
