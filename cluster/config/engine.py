"""The serving engine's knobs: KV pool size, batching limits, precision, device, prefix caching."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cluster.config.base import StrictModel


class EngineConfig(StrictModel):
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block (the unit of paging and prefix caching).")
    num_blocks: int | None = Field(
        None,
        ge=2,
        description="KV blocks in the pool. None: sized from kv_memory_bytes, else from free GPU memory "
        "(gpu_memory_utilization) on CUDA, or on CPU enough for max_num_seqs sequences of max_model_len "
        "(capped at a quarter of available RAM).",
    )
    kv_memory_bytes: int | None = Field(None, ge=1, description="Bytes for the KV pool (all layers, k and v); ignored when num_blocks is set.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=0.98, description="On CUDA with neither num_blocks nor kv_memory_bytes: fraction of the free memory (after loading the model) given to the KV pool."
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences running in one step (the decode batch).")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget per step, shared by decode tokens (first) and chunked prefill; "
        "keep it >= max_num_seqs so every running sequence decodes each step."
    )
    max_model_len: int | None = Field(None, ge=2, description="Longest prompt + completion in tokens; None: the model's max_seq_len.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights, activations and KV dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model and KV pool live; auto = cuda when available.")
    enable_prefix_caching: bool = Field(True, description="Reuse full KV blocks across requests by chained block hash.")
    enforce_eager: bool = Field(
        False, description="CUDA only: run decode steps eagerly instead of replaying captured CUDA graphs."
    )
    seed: int = Field(0, description="Seed of the sampler's generator for requests without their own seed.")
