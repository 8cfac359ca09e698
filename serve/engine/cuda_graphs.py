"""CUDA graphs for decode steps (the hot path: one token per sequence, every step).

A decode step is a few hundred small kernels at small batch, so launch cost, not the GPU,
sets its time. Three things cut it:

* each decoder block runs as ``torch.compile``-d functions of tensors (``fused_model.make_decode_layer``;
  the layer's weights are arguments, so one compiled graph serves every layer): Inductor fuses the
  norms, RoPE, the gather and the SwiGLU into a handful of kernels around the matmuls and the
  attention kernel. Compiled with ``dynamic=True`` (one compile for every batch / block-table size)
  and without Inductor's own CUDA graphs: we capture those ourselves, below.
* the whole step is captured as one CUDA graph per (batch bucket, block-table bucket), all at
  load (``capture_all``), into one shared memory pool, and replayed. Inputs live in static buffers; rows beyond the
  real batch are padding that reads and writes only the KV pool's scratch block.
* multi-step decoding (vLLM's ``num_scheduler_steps``): each graph also takes the greedy token of
  its logits and advances its own inputs on the GPU (token, position, slot from the block table,
  context length), so ``run(..., steps=K)`` replays it K times back to back with no host work in
  between and copies the K × B tokens back once. The host's per-step cost (scheduling, building
  inputs, the sampler's sync) is paid once per K tokens.

Each bucket is captured with every variant of the step there is and the fastest replay is kept:
``eager`` (the fused forward, always), ``compiled`` (``compile=True``), and, only when asked for
with ``RETORT_GRAPH_VARIANT=triton``, ``triton`` (plain weights: ``triton_decode``'s five fused
kernels a layer; slower than the other two on an H200, so not captured by default). A model with
quantized projections gets the eager forward only. ``RETORT_GRAPH_VARIANT=<name>`` captures that variant alone (tests,
comparisons; the prefill/mixed step graphs follow it where they have it).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable

import torch

from serve.engine import triton_decode
from serve.engine.fused_model import FusedModel, make_decode_layer
from serve.engine.kv_cache_manager import KVCacheManager


def buckets(limit: int, start: list[int]) -> list[int]:
    out = [b for b in start if b < limit]
    b = out[-1] if out else 1
    while b < limit:
        b *= 2
        out.append(min(b, limit))
    return sorted(set(out + [limit]))


def graph_variants(available: list[str], strict: bool) -> list[str]:
    """The variants to capture a bucket with: all ``available`` (the fastest replay is kept), or the
    one ``RETORT_GRAPH_VARIANT`` names — an error if it is not available (``strict``), else eager."""
    forced = os.environ.get("RETORT_GRAPH_VARIANT")
    if not forced:
        return available
    if forced in available:
        return [forced]
    if strict:
        raise ValueError(f"RETORT_GRAPH_VARIANT={forced!r} is not available here; available: {available}")
    return ["eager"]


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool keep-mask -> (B, 1, 1, L) additive mask, built once per step (not per layer)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))[
        :, None, None, :
    ]


class DecodeGraphs:
    def __init__(
        self,
        fused: FusedModel,
        kv: KVCacheManager,
        device: torch.device,
        max_batch: int,
        max_blocks: int,
        compile: bool = True,
        max_steps: int = 1,
        paged: bool = False,
    ) -> None:
        self.fused, self.kv, self.device = fused, kv, device
        self.paged = paged  # decode attention with the Triton kernel (no gathered copy, no mask)
        self.batch_sizes = buckets(max_batch, [1, 2, 4, 8, 16, 24, 32, 48, 64])
        self.block_counts = buckets(max_blocks, [4, 8, 16, 32])
        B, NB = self.batch_sizes[-1], self.block_counts[-1]
        # one input buffer, one host->device copy per step: [token, position, slot, ctx_len, table...]
        self.inputs = torch.zeros(B, 4 + NB, dtype=torch.long, device=device)
        self._pad_inputs()
        self.host = torch.zeros(B, 4 + NB, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        # multi-step: the greedy token of replay j lands in column j (counter on the GPU, mod max_steps)
        self.max_steps = max(1, max_steps)
        self.history = torch.zeros(B, self.max_steps, dtype=torch.long, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._copy_done: torch.cuda.Event | None = None
        weights = [fused.decode_weights(i) for i in range(len(fused.layers))]
        self.layer_weights = weights if compile and all(w is not None for w in weights) else None
        self.layer_fn = None
        self.chosen: dict[tuple[int, int], str] = {}  # bucket -> the variant kept, when several were captured
        self.triton_fn = None
        if self.layer_weights:
            self.layer_fn = make_decode_layer(
                fused.n_heads, fused.n_kv_heads, fused.head_dim, fused.eps, compile=True, paged=paged
            )
        # the fused Triton block (five kernels a layer): opt-in, it lost to cuBLAS + Inductor on an H200
        # at every decode batch (see triton_decode)
        if triton_decode.usable(fused, device):
            self.triton_weights = weights
            self.triton_fn = triton_decode.make_triton_decode_layer(
                fused.n_heads, fused.n_kv_heads, fused.head_dim, fused.eps
            )

    def _pad_inputs(self) -> None:
        """Every row padding: token 0 at position 0 of the scratch block (what capture and the
        timing replays run on; replays advance positions, so this is reset before each capture)."""
        self.inputs.zero_()
        self.inputs[:, 2] = self.kv.scratch_block * self.kv.block_size
        self.inputs[:, 3] = 1
        self.inputs[:, 4:] = self.kv.scratch_block

    def capture_all(self) -> None:
        """Compile and capture every (batch, blocks) bucket now, largest first (smaller graphs then
        reuse the pool's memory), so no compile or capture happens while serving."""
        for b in reversed(self.batch_sizes):
            for nb in reversed(self.block_counts):
                if (b, nb) not in self.graphs:
                    self.graphs[(b, nb)] = self._capture_best(b, nb)

    def _capture_best(self, b: int, nb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the bucket with every variant there is and keep the fastest replay: ``eager``
        (the fused forward), ``compiled`` (Inductor's decode block; on an H200 it halved a batch-1
        step but was 17% slower at batch 64), ``triton`` (``triton_decode``'s five kernels a layer)."""
        variants = graph_variants(
            ["eager"] + (["compiled"] if self.layer_fn else []) + (["triton"] if self.triton_fn else []),
            strict=True,
        )
        if len(variants) == 1:
            return self._capture(b, nb, variants[0])
        timed = []
        for variant in variants:
            graph, out = self._capture(b, nb, variant)
            timed.append((_replay_us(graph), variant, graph, out))
        timed.sort(key=lambda t: t[0])
        self.chosen[(b, nb)] = timed[0][1]
        return timed[0][2], timed[0][3]

    def fits(self, batch: int, blocks: int) -> bool:
        return batch <= self.batch_sizes[-1] and blocks <= self.block_counts[-1]

    def run(
        self,
        tokens: list[int] | None,
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        steps: int = 1,
    ) -> torch.Tensor:
        """Decode len(positions) sequences. ``steps == 1``: one step -> fp32 logits (B, V).
        ``steps > 1``: that many greedy steps back to back -> token ids (B, steps) on the GPU; every
        table must then cover position + steps - 1. ``tokens=None`` continues the previous multi-step
        run of the same sequences from the tokens its last replay left in the inputs, on the GPU
        (the host need not have seen them: the next burst is queued before the last one's tokens
        are read back)."""
        n = len(positions)
        if steps > self.max_steps:
            raise ValueError(f"steps {steps} > max_steps {self.max_steps}")
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        nb = self.block_counts[bisect.bisect_left(self.block_counts, max(len(t) for t in tables))]
        scratch, bs = self.kv.scratch_block, self.kv.block_size
        # the pinned buffer is reused every step: wait until the previous copy out of it is done
        if self._copy_done is not None:
            self._copy_done.synchronize()
        h = self.host_np
        h[:b, 0:2] = 0  # rows n..b are padding: position 0 of the scratch block
        h[:b, 2] = scratch * bs
        h[:b, 4 : 4 + nb] = scratch
        if tokens is not None:
            h[:n, 0] = tokens
        h[:n, 1], h[:n, 2] = positions, slots
        h[:b, 3] = h[:b, 1] + 1
        for i, tb in enumerate(tables):
            h[i, 4 : 4 + len(tb)] = tb
        kept = (
            None if tokens is not None else self.inputs[:n, 0].clone()
        )  # in stream order, after the last burst
        self.inputs[:b, : 4 + nb].copy_(self.host[:b, : 4 + nb], non_blocking=True)
        if kept is not None:
            self.inputs[:n, 0].copy_(kept)
        self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        graph, out = self.graphs[(b, nb)]  # every bucket was captured at load
        if steps > 1:
            self.counter.zero_()
        for _ in range(steps):
            graph.replay()
        return out[:n] if steps == 1 else self.history[:n, :steps]

    def _step_fn(self, b: int, nb: int, variant: str) -> Callable[[], torch.Tensor]:
        from serve.engine.model_runner import PagedAttention, StepMetadata

        fm, bs = self.fused, self.kv.block_size

        def step() -> torch.Tensor:
            inp = self.inputs[:b]
            tokens, positions, slots, ctx = inp[:, 0], inp[:, 1], inp[:, 2].contiguous(), inp[:, 3]
            tables = inp[:, 4 : 4 + nb].contiguous()  # (b, nb)
            mask = (
                None
                if self.paged
                else additive_mask(
                    torch.arange(nb * bs, device=self.device)[None, :] < ctx[:, None], self.kv.kv[0].dtype
                )
            )
            x = fm.embed(tokens)  # (b, d)
            cos, sin = fm.rope_tables(positions)
            if variant == "eager":
                attn = PagedAttention(self.kv, StepMetadata(slots, slots, tables, mask, [], ctx))
                for i in range(len(fm.layers)):
                    q, k, v = fm.qkv(i, x, cos, sin)
                    x = fm.finish(i, x, attn.attend(i, q, k, v))
                logits = fm.logits(x)  # (b, V)
            elif variant == "compiled":
                for w, cache in zip(self.layer_weights, self.kv.kv, strict=True):
                    x = self.layer_fn(x, cos, sin, w, cache[0], cache[1], slots, tables, mask, ctx)
                logits = fm.logits(x)
            else:
                for w, cache in zip(self.triton_weights, self.kv.kv, strict=True):
                    x = self.triton_fn(x, cos, sin, w, cache[0], cache[1], slots, tables, mask, ctx)
                logits = triton_decode.logits(fm, x)
            if self.max_steps > 1:
                self._advance(inp, tables, logits, b, nb)
            return logits

        return step

    def _advance(
        self, inp: torch.Tensor, tables: torch.Tensor, logits: torch.Tensor, b: int, nb: int
    ) -> None:
        """In the graph, after the logits: record the greedy token and make it the next step's input
        (position + 1, its slot looked up in the block table, context + 1). A single-step run ignores
        this: the host rewrites every input before each run."""
        bs = self.kv.block_size
        nxt = logits.argmax(dim=-1)  # (b,)
        self.history[:b].index_copy_(1, self.counter, nxt[:, None])
        self.counter.add_(1).remainder_(self.max_steps)
        pos = inp[:, 1] + 1
        blk = tables.gather(1, (pos // bs).clamp_(max=nb - 1)[:, None])[
            :, 0
        ]  # padding rows: the scratch block
        inp[:, 0] = nxt
        inp[:, 2] = blk * bs + pos % bs
        inp[:, 1] = pos
        inp[:, 3] += 1

    @torch.inference_mode()
    def _capture(self, b: int, nb: int, variant: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        fn = self._step_fn(b, nb, variant)
        self._pad_inputs()
        # the warm-up run (which also compiles) and the capture write only the scratch block
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out


def _replay_us(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Mean GPU time of a replay (after one untimed). Replays at capture time touch only the scratch
    block: the captured inputs are padding rows."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps
