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

``StepGraphs`` goes one further where the Triton paged attention runs (CUDA, head size a power of
two): attention reads everything it needs from static buffers (query blocks, block tables:
``paged_attention.paged_varlen_attention``), so the *whole* step — embedding, every layer with its
KV write and attention, final norm and LM head over the rows that need logits — is one graph per
token bucket. A step is then one host-to-device copy of its inputs and one replay: a short prefill
went from ~3 ms (12 eager attention calls of ~200 µs of host time each) to the graph's GPU time.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from serve.engine import triton_decode
from serve.engine.cuda_graphs import _replay_us, graph_variants
from serve.engine.fused_model import FusedModel
from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.paged_attention import (
    paged_varlen_attention,
    query_blocks,
    rope_and_cache,
    varlen_block_q,
    varlen_scratch_rows,
    varlen_splits,
)

TRITON_MAX_TOKENS = 64  # buckets up to this many rows also try triton_decode's GEMMs (tuned for M <= 64)


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


class StepGraphs:
    """One CUDA graph per token bucket for a whole prefill / mixed step (see the module docstring).

    Inputs live in one long buffer, filled on the host (pinned) and copied once per step:
    ``[tokens (T) | positions (T) | slots (T) | logit rows (S) | query blocks (Q, 4) | tables (S, NB)]``
    with T the largest bucket, S the most sequences in a step, Q = T / BLOCK_Q + S the most query
    blocks, NB the most blocks per sequence."""

    def __init__(
        self,
        fused: FusedModel,
        kv: KVCacheManager,
        device: torch.device,
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        compile: bool = False,
    ) -> None:
        self.fused, self.kv, self.device = fused, kv, device
        # compiled: each layer's attention-free parts as Inductor kernels (norms, RoPE, residuals fused);
        # every bucket is then captured both ways and the faster replay kept, as for decode
        self.compiled = None
        weights = [fused.decode_weights(i) for i in range(len(fused.layers))]
        self.weights = weights if all(w is not None for w in weights) else None
        if compile and self.weights:
            self.compiled = (
                torch.compile(fused.pre, dynamic=True, fullgraph=True),
                torch.compile(fused.post, dynamic=True, fullgraph=True),
            )
        # small buckets, when asked for: triton_decode's fused GEMMs (norm in the prologue, residual in
        # the epilogue); opt-in like the decode graphs' triton variant (slower than cuBLAS on an H200)
        self.triton = triton_decode.usable(fused, device)
        self.chosen: dict[int, str] = {}
        self.buckets = token_buckets(max_tokens)
        T, S, NB = self.buckets[-1], max_seqs, max_blocks
        self.T, self.S, self.NB = T, S, NB
        self.Q = max(self._num_qblocks(t) for t in self.buckets)
        sizes = [T, T, T, S, self.Q * 4, S * NB]
        self.offsets = np.cumsum([0] + sizes).tolist()
        self.inputs = torch.zeros(self.offsets[-1], dtype=torch.long, device=device)
        self.host = torch.zeros(self.offsets[-1], dtype=torch.long, pin_memory=device.type == "cuda")
        self.host_np = self.host.numpy()
        H, D = fused.n_heads, fused.head_dim
        self.o = torch.zeros(
            T, H, D, dtype=kv.kv[0].dtype, device=device
        )  # attention output (rows past a step: stale)
        self.q = (
            torch.zeros(TRITON_MAX_TOKENS, H, D, dtype=kv.kv[0].dtype, device=device) if self.triton else None
        )
        R = varlen_scratch_rows(self.buckets)  # the split attention's fp32 partials
        self.scratch = (torch.zeros(R, H, D, device=device), torch.zeros(R, H, 2, device=device))
        self.graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor]
        ] = {}  # until captured, steps run eagerly
        self._copy_done: torch.cuda.Event | None = None

    def _num_qblocks(self, t: int) -> int:
        """Query blocks a step of up to ``t`` rows over up to S sequences may need."""
        return -(-t // varlen_block_q(t)) + self.S

    def bucket(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.S and max_blocks <= self.NB

    def _views(self, t: int):
        o, inp = self.offsets, self.inputs
        q = self._num_qblocks(t)
        return (
            inp[o[0] : o[0] + t],
            inp[o[1] : o[1] + t],
            inp[o[2] : o[2] + t],
            inp[o[3] : o[4]],
            inp[o[4] : o[4] + q * 4].view(q, 4),
            inp[o[5] : o[6]].view(self.S, self.NB),
        )

    def variants(self, t: int) -> list[str]:
        """The ways bucket ``t`` can be captured (the fastest replay is kept); ``RETORT_GRAPH_VARIANT``
        forces one where it is available (else eager), as for the decode graphs."""
        v = ["eager"] + (["compiled"] if self.compiled else [])
        return graph_variants(
            v + (["triton"] if self.triton and t <= TRITON_MAX_TOKENS else []), strict=False
        )

    def _forward(self, t: int, variant: str = "eager") -> torch.Tensor:
        fm, kv = self.fused, self.kv
        tokens, positions, slots, rows, qblocks, tables = self._views(t)
        x = fm.embed(tokens)
        cos, sin = fm.rope_tables(positions)
        H, D = fm.n_heads, fm.head_dim
        for i in range(len(fm.layers)):
            cache = kv.kv[i]
            _, nb, bs, hkv, d = cache.shape
            if variant == "triton":
                ln1, qkv_w, qkv_b, o_w, ln2, gu_w, down_w = self.weights[i]
                qkv = triton_decode.norm_linear(x, ln1, fm.eps, qkv_w, qkv_b)
                q = rope_and_cache(qkv, cos, sin, cache[0], cache[1], slots, self.q[:t])
            elif variant == "compiled":
                ln1, qkv_w, qkv_b, o_w, ln2, gu_w, down_w = self.weights[i]
                q, k, v = self.compiled[0](x, cos, sin, ln1, qkv_w, qkv_b)
            else:
                q, k, v = fm.qkv(i, x, cos, sin)
            if variant != "triton":
                cache[0].view(nb * bs, hkv, d).index_copy_(0, slots, k)
                cache[1].view(nb * bs, hkv, d).index_copy_(0, slots, v)
            o = paged_varlen_attention(
                q,
                cache[0],
                cache[1],
                qblocks,
                tables,
                self.o[:t],
                varlen_block_q(t),
                varlen_splits(t),
                self.scratch,
            )
            if variant == "triton":
                x = triton_decode.linear_residual(o.view(t, H * D), o_w, x)
                gu = triton_decode.norm_linear(x, ln2, fm.eps, gu_w)
                x = triton_decode.swiglu_linear_residual(gu, down_w, x, out=x)
            elif variant == "compiled":
                x = self.compiled[1](x, o, o_w, ln2, gu_w, down_w)
            else:
                x = fm.finish(i, x, o)
        x = x.index_select(0, rows)
        return triton_decode.logits(fm, x) if variant == "triton" else fm.logits(x)  # (S, V) fp32

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (the pool's memory is then reused), with each
        variant when there are several, keeping the fastest replay."""
        self.pool = torch.cuda.graph_pool_handle()
        for t in reversed(self.buckets):
            variants = self.variants(t)
            if len(variants) == 1:
                self.graphs[t] = self._capture(t, variants[0])
                continue
            timed = sorted(
                ((_replay_us(g[0]), v, g) for v in variants for g in [self._capture(t, v)]),
                key=lambda x: x[0],
            )
            self.graphs[t] = timed[0][2]
            self.chosen[t] = timed[0][1]

    def _pad(self) -> None:
        """All inputs padding: token 0 at position 0 into the scratch block, no query blocks."""
        h, o = self.host_np, self.offsets
        h[:] = 0
        h[o[2] : o[3]] = self.kv.scratch_block * self.kv.block_size

    @torch.inference_mode()
    def _capture(self, t: int, variant: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._pad()
        self.inputs.copy_(self.host)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(t, variant)  # warm-up, compiles (padding inputs: only the scratch block is written)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(t, variant)
        return graph, out

    @torch.inference_mode()
    def run(self, chunks: list[tuple[list[int], int, list[int], bool]]) -> torch.Tensor:
        """One step: per sequence (new token ids, position of the first, its block table covering
        them, whether its last row needs logits) -> fp32 logits (rows that need them, in order, V).
        The step's total tokens must fit a bucket, its sequences ``fits``."""
        n = sum(len(c[0]) for c in chunks)
        t = self.bucket(n)
        bs, o = self.kv.block_size, self.offsets
        if self._copy_done is not None:  # the pinned buffer is reused: the last copy out of it must be done
            self._copy_done.synchronize()
        h = self.host_np
        q = self._num_qblocks(t)
        h[o[0] : o[2]] = 0  # tokens, positions
        h[o[2] : o[2] + t] = self.kv.scratch_block * bs  # padding rows' k/v go to the scratch block
        h[o[4] : o[4] + q * 4] = 0
        tables = h[o[5] : o[6]].reshape(self.S, self.NB)
        spans, rows, row = [], [], 0
        for i, (toks, start, table, logits) in enumerate(chunks):
            m = len(toks)
            tb = np.asarray(table, dtype=np.int64)
            pos = np.arange(start, start + m)
            h[o[0] + row : o[0] + row + m] = toks
            h[o[1] + row : o[1] + row + m] = pos
            h[o[2] + row : o[2] + row + m] = tb[pos // bs] * bs + pos % bs
            tables[i, : len(tb)] = tb
            spans.append((row, m, start))
            if logits:
                rows.append(row + m - 1)
            row += m
        qb = query_blocks(spans, varlen_block_q(t))
        h[o[4] : o[4] + len(qb) * 4] = np.asarray(qb, dtype=np.int64).reshape(-1)
        h[o[3] : o[3] + len(rows)] = rows
        h[o[3] + len(rows) : o[4]] = 0
        self.inputs.copy_(self.host, non_blocking=True)
        if t not in self.graphs:
            return self._forward(t)[: len(rows)]
        self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        graph, out = self.graphs[t]
        graph.replay()
        return out[: len(rows)]
