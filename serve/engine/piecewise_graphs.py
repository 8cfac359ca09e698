"""Piecewise CUDA graphs for steps that are not pure decode (prefill chunks, mixed batches).

Such a step's attention is per sequence (variable lengths, cached prefixes), so the step as a whole
cannot be one graph; everything else can (vLLM v1's piecewise graphs). The forward is cut at every
attention: piece 0 = embedding + RoPE tables + layer 0's norm/q/k/v/RoPE; piece i = layer i-1's
output projection + MLP + layer i's norm/q/k/v/RoPE; the last piece = the last layer's MLP. Each
piece is captured once per token bucket (the step's token count rounded up), at load; attention runs
eagerly between replays (``PagedAttention.attend``, writing into a static output buffer).

Why: on a GPU host where each eager kernel launch costs ~15-25 µs of CPU (measured on the H200
machine here), a 12-layer prefill was ~440 launches, ~10 ms of host time for ~1-2 ms of GPU work,
whatever the prompt length. With pieces a step is L + 1 graph launches plus the attention calls.

Pieces read and write static buffers (x, q, k, v, attention output, cos, sin), shared by all buckets
as row-prefix views; rows past the step's real tokens are padding whose k/v go to the scratch block.
"""

from __future__ import annotations

import bisect

import torch

from serve.engine.fused_model import FusedModel


def token_buckets(max_tokens: int) -> list[int]:
    out, b = [], 16
    while b < max_tokens:
        out.append(b)
        b = b * 2 if b < 512 else b + 512
    return out + [max_tokens]


class PiecewiseGraphs:
    def __init__(self, fused: FusedModel, device: torch.device, max_tokens: int, dtype: torch.dtype) -> None:
        self.fused, self.device = fused, device
        self.buckets = token_buckets(max_tokens)
        T, d = self.buckets[-1], fused.model.cfg.d_model
        H, Hkv, D = fused.n_heads, fused.n_kv_heads, fused.head_dim
        z = dict(device=device)
        self.tokens = torch.zeros(T, dtype=torch.long, **z)
        self.positions = torch.zeros(T, dtype=torch.long, **z)
        self.x = torch.zeros(T, d, dtype=dtype, **z)
        self.q = torch.zeros(T, H, D, dtype=dtype, **z)
        self.k = torch.zeros(T, Hkv, D, dtype=dtype, **z)
        self.v = torch.zeros(T, Hkv, D, dtype=dtype, **z)
        self.o = torch.zeros(T, H, D, dtype=dtype, **z)  # attention writes here, eagerly
        self.cos = torch.zeros(T, 1, D, dtype=fused.cos.dtype, **z)
        self.sin = torch.zeros(T, 1, D, dtype=fused.cos.dtype, **z)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def bucket(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    # -- the pieces (eager code, captured) -----------------------------------------------------
    def _qkv(self, i: int, t: int) -> None:
        q, k, v = self.fused.qkv(i, self.x[:t], self.cos[:t], self.sin[:t])
        self.q[:t].copy_(q)
        self.k[:t].copy_(k)
        self.v[:t].copy_(v)

    def _piece(self, i: int, t: int) -> None:
        fm = self.fused
        if i == 0:
            self.x[:t].copy_(fm.embed(self.tokens[:t]))
            cos, sin = fm.rope_tables(self.positions[:t])
            self.cos[:t].copy_(cos)
            self.sin[:t].copy_(sin)
        else:
            self.x[:t].copy_(fm.finish(i - 1, self.x[:t], self.o[:t]))
        if i < len(fm.layers):
            self._qkv(i, t)

    def capture_all(self) -> None:
        """Capture every bucket's pieces now, largest first (the pool's memory is then reused)."""
        for t in reversed(self.buckets):
            self.graphs[t] = [self._capture(i, t) for i in range(len(self.fused.layers) + 1)]

    @torch.inference_mode()
    def _capture(self, i: int, t: int) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._piece(i, t)  # warm-up (buffers hold padding: nothing outside them is written)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._piece(i, t)
        return graph

    # -- a step ----------------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, positions: torch.Tensor, attn, t: int) -> torch.Tensor:
        """tokens/positions: (t,) already padded to bucket ``t``; ``attn`` a ``PagedAttention`` whose
        slot mapping covers all ``t`` rows. Returns the final hidden states (t, d) (a view of the
        static buffer: use it before the next step)."""
        self.tokens[:t].copy_(tokens)
        self.positions[:t].copy_(positions)
        pieces = self.graphs[t]
        pieces[0].replay()
        for i in range(len(self.fused.layers)):
            attn.attend(i, self.q[:t], self.k[:t], self.v[:t], out=self.o[:t])
            pieces[i + 1].replay()
        return self.x[:t]
