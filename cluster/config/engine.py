"""The serving engine's knobs: KV pool size, batching limits, precision, device, prefix caching."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cluster.config.base import StrictModel


class EngineConfig(StrictModel):
    block_size: int = Field(
        16, ge=1, le=1024, description="Tokens per KV block (the unit of paging and prefix caching)."
    )
    num_blocks: int | None = Field(
        None,
        ge=2,
        description="KV blocks in the pool. None: sized from kv_memory_bytes, else from free GPU memory "
        "(gpu_memory_utilization) on CUDA, or on CPU enough for max_num_seqs sequences of max_model_len "
        "(capped at a quarter of available RAM).",
    )
    kv_memory_bytes: int | None = Field(
        None, ge=1, description="Bytes for the KV pool (all layers, k and v); ignored when num_blocks is set."
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0,
        le=0.98,
        description="On CUDA with neither num_blocks nor kv_memory_bytes: fraction of the free memory (after loading the model) given to the KV pool.",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences running in one step (the decode batch).")
    max_num_batched_tokens: int = Field(
        2048,
        ge=1,
        description="Token budget per step, shared by decode tokens (first) and chunked prefill; "
        "keep it >= max_num_seqs so every running sequence decodes each step.",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Longest prompt + completion in tokens; None: the model's max_seq_len."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights, activations and KV dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model and KV pool live; auto = cuda when available."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse full KV blocks across requests by chained block hash."
    )
    enforce_eager: bool = Field(
        False,
        description="CUDA only: run every step eagerly instead of replaying CUDA graphs captured at load "
        "(whole decode steps; prefill and mixed steps piecewise, between the attention calls).",
    )
    compile: bool = Field(
        True,
        description="CUDA graphs only: also capture every decode bucket with torch.compile'd decoder blocks and "
        "keep, per bucket, whichever replays faster (adds ~30 s to a replica's start; env RETORT_ENGINE_COMPILE=0/1 "
        "overrides).",
    )
    async_scheduling: bool | None = Field(
        None,
        description="Queue a multi-step burst before the previous one's tokens are read back and applied, so the "
        "host's bookkeeping runs while the GPU computes (vLLM's async scheduling; tokens then reach callers one "
        "step() later). None: on where decode runs in CUDA graphs (elsewhere a burst is computed when it is "
        "queued, so there is nothing to overlap).",
    )
    num_scheduler_steps: int = Field(
        8,
        ge=1,
        le=64,
        description="When every running sequence is decoding greedily (no logprobs) and nobody is waiting "
        "for a slot, run up to this many decode steps per schedule, each step's token feeding the next with no "
        "scheduling or sampling in between (vLLM's multi-step scheduling; on CUDA the steps replay CUDA graphs "
        "back to back and the tokens come back once). Tokens then stream in bursts of up to this many. "
        "1 = one token per schedule.",
    )
    seed: int = Field(0, description="Seed of the sampler's generator for requests without their own seed.")
