"""CUDA graphs for decode steps (the hot path: one token per sequence, every step).

A decode step is a few hundred small kernels at small batch, so launch cost, not the GPU,
sets its time. Two things cut it:

* each decoder block runs as one ``torch.compile``-d function of tensors
  (``fused_model.make_decode_layer``; the layer's weights are arguments, so one compiled graph serves
  every layer): Inductor fuses the norms, RoPE, the KV write, the gather and the SwiGLU into a
  handful of kernels around the matmuls and the attention kernel. Compiled with
  ``dynamic=True`` (one compile for every batch / block-table size) and without Inductor's own
  CUDA graphs: we capture those ourselves, below.
* the whole step is captured as one CUDA graph per (batch bucket, block-table bucket), all at
  load (``capture_all``), into one shared memory pool, and replayed. Inputs live in static buffers; rows beyond the
  real batch are padding that reads and writes only the KV pool's scratch block.

``compile=False`` (the default; or a model with quantized projections) captures the eager fused forward.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from serve.engine.fused_model import FusedModel, make_decode_layer
from serve.engine.kv_cache_manager import KVCacheManager


def buckets(limit: int, start: list[int]) -> list[int]:
    out = [b for b in start if b < limit]
    b = out[-1] if out else 1
    while b < limit:
        b *= 2
        out.append(min(b, limit))
    return sorted(set(out + [limit]))


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool keep-mask -> (B, 1, 1, L) additive mask, built once per step (not per layer)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))[:, None, None, :]


class DecodeGraphs:
    def __init__(self, fused: FusedModel, kv: KVCacheManager, device: torch.device, max_batch: int, max_blocks: int,
                 compile: bool = True) -> None:
        self.fused, self.kv, self.device = fused, kv, device
        self.batch_sizes = buckets(max_batch, [1, 2, 4, 8, 16, 24, 32, 48, 64])
        self.block_counts = buckets(max_blocks, [4, 8, 16, 32])
        B, NB = self.batch_sizes[-1], self.block_counts[-1]
        scratch, bs = kv.scratch_block, kv.block_size
        # one input buffer, one host->device copy per step: [token, position, slot, ctx_len, table...]
        self.inputs = torch.zeros(B, 4 + NB, dtype=torch.long, device=device)
        self.inputs[:, 2] = scratch * bs
        self.inputs[:, 3] = 1
        self.inputs[:, 4:] = scratch
        self.host = torch.zeros(B, 4 + NB, dtype=torch.long, pin_memory=True)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._copy_done: torch.cuda.Event | None = None
        weights = [fused.decode_weights(i) for i in range(len(fused.layers))]
        self.layer_weights = weights if compile and all(w is not None for w in weights) else None
        self.layer_fn = None
        if self.layer_weights:
            layer = make_decode_layer(fused.n_heads, fused.n_kv_heads, fused.head_dim, fused.eps)
            self.layer_fn = torch.compile(layer, dynamic=True, fullgraph=True)

    def capture_all(self) -> None:
        """Compile and capture every (batch, blocks) bucket now, largest first (smaller graphs then
        reuse the pool's memory), so no compile or capture happens while serving."""
        for b in reversed(self.batch_sizes):
            for nb in reversed(self.block_counts):
                if (b, nb) not in self.graphs:
                    self.graphs[(b, nb)] = self._capture(b, nb)

    def fits(self, batch: int, blocks: int) -> bool:
        return batch <= self.batch_sizes[-1] and blocks <= self.block_counts[-1]

    def run(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode step for len(tokens) sequences -> fp32 logits (B, V)."""
        n = len(tokens)
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        nb = self.block_counts[bisect.bisect_left(self.block_counts, max(len(t) for t in tables))]
        scratch, bs = self.kv.scratch_block, self.kv.block_size
        rows = [[t, p, sl, p + 1, *tb, *([scratch] * (nb - len(tb)))] for t, p, sl, tb in zip(tokens, positions, slots, tables, strict=True)]
        rows += [[0, 0, scratch * bs, 1] + [scratch] * nb] * (b - n)
        # the pinned buffer is reused every step: wait until the previous copy out of it is done
        if self._copy_done is not None:
            self._copy_done.synchronize()
        host = self.host[:b, : 4 + nb]
        host.copy_(torch.tensor(rows, dtype=torch.long))
        self.inputs[:b, : 4 + nb].copy_(host, non_blocking=True)
        self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        key = (b, nb)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, nb)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:n]

    def _step_fn(self, b: int, nb: int) -> Callable[[], torch.Tensor]:
        from serve.engine.model_runner import PagedAttention, StepMetadata

        fm, bs = self.fused, self.kv.block_size

        def step() -> torch.Tensor:
            inp = self.inputs[:b]
            tokens, positions, slots, ctx = inp[:, 0], inp[:, 1], inp[:, 2].contiguous(), inp[:, 3]
            tables = inp[:, 4 : 4 + nb].contiguous()  # (b, nb)
            mask = additive_mask(torch.arange(nb * bs, device=self.device)[None, :] < ctx[:, None], self.kv.kv[0].dtype)
            x = fm.embed(tokens)  # (b, d)
            cos, sin = fm.rope_tables(positions)
            if self.layer_fn is not None:
                for w, cache in zip(self.layer_weights, self.kv.kv, strict=True):
                    x = self.layer_fn(x, cos, sin, w, cache[0], cache[1], slots, tables, mask)
            else:
                attn = PagedAttention(self.kv, StepMetadata(slots, slots, tables, mask, []))
                for i in range(len(fm.layers)):
                    q, k, v = fm.qkv(i, x, cos, sin)
                    x = fm.finish(i, x, attn.attend(i, q, k, v))
            return fm.logits(x)  # (b, V)

        return step

    @torch.inference_mode()
    def _capture(self, b: int, nb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        fn = self._step_fn(b, nb)
        # the warm-up run (which also compiles) writes the current (real) inputs' k/v again: same values, harmless
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out
