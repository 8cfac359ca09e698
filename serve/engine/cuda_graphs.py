"""CUDA graphs for decode steps (the hot path: one token per sequence, every step).

A decode step launches a few hundred small kernels; replaying them as one captured graph
removes the per-kernel launch cost, which dominates at small batch. Graphs are captured lazily
for each (batch bucket, block-table bucket) actually seen, into one shared memory pool. Inputs
live in static buffers; rows beyond the real batch are padding that reads and writes only the
KV pool's scratch block.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from cluster.model import Transformer, rope_cos_sin
from serve.engine.kv_cache_manager import KVCacheManager


def buckets(limit: int, start: list[int]) -> list[int]:
    out = [b for b in start if b < limit]
    b = out[-1] if out else 1
    while b < limit:
        b *= 2
        out.append(min(b, limit))
    return sorted(set(out + [limit]))


class DecodeGraphs:
    def __init__(self, model: Transformer, kv: KVCacheManager, device: torch.device, max_batch: int, max_blocks: int) -> None:
        self.model, self.kv, self.device = model, kv, device
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
        from serve.engine.model_runner import PagedAttention, StepMetadata, additive_mask

        m, bs = self.model, self.kv.block_size

        def step() -> torch.Tensor:
            inp = self.inputs[:b]
            tokens, positions, slots, ctx = inp[:, 0], inp[:, 1], inp[:, 2].contiguous(), inp[:, 3]
            tables = inp[:, 4 : 4 + nb].contiguous()  # (b, nb)
            mask = additive_mask(torch.arange(nb * bs, device=self.device)[None, :] < ctx[:, None], self.kv.kv[0].dtype)
            meta = StepMetadata(slots, slots, tables, mask, [])
            attn = PagedAttention(self.kv, meta)
            x = m.model.embed_tokens(tokens.view(1, b))  # (1, b, d)
            cos, sin = rope_cos_sin(positions.view(1, b), m.cfg.dim_head, m.cfg.rope_theta, x.dtype)
            for block in m.model.layers:
                x = block(x, cos, sin, attn)
            return m.lm_head(m.model.norm(x[0])).float()  # (b, V)

        return step

    @torch.inference_mode()
    def _capture(self, b: int, nb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        fn = self._step_fn(b, nb)
        # the warm-up run writes the current (real) inputs' k/v again: same values, harmless
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out
