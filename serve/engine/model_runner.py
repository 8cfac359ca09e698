"""Runs one engine step: builds the flat batch, runs the model over paged KV, returns logits.

All scheduled tokens of all sequences go through the model as one flat batch ``(N, d)`` (vLLM's
layout), so the linear layers see one matmul per step however the batch is mixed; the forward is
``serve.engine.fused_model.FusedModel`` (fused q/k/v and gate/up, RoPE table). Attention is the
only per-sequence part (``PagedAttention``):

* new k/v are scattered into their slots of the paged pool (one ``index_copy_`` per layer);
* decode tokens (one query each) are attended together: their blocks are gathered into a padded
  ``(B, L, Hkv, D)`` and one masked SDPA runs over the batch (measured faster on CPU than one
  SDPA per sequence from batch 2 on: the per-call overhead dominates at these sizes);
* prefill chunks are attended one sequence at a time: plain causal SDPA over the new tokens when
  nothing is cached before them, else a masked SDPA over the gathered prefix + chunk (on CUDA a
  bottom-right causal bias, ``causal_lower_right``, so the fused kernel runs with no mask tensor).

The same code runs on CUDA (SDPA picks its fused kernels; the metadata is built on the host and
copied once per step, not per layer). With CUDA graphs, a step rarely comes here: pure decode steps
replay ``cuda_graphs.DecodeGraphs``; other steps that fit a token bucket replay one whole-step graph
(``piecewise_graphs.StepGraphs``, Triton attention over the paged pool) or, without Triton, pieces
between eager ``PagedAttention`` calls (``PiecewiseGraphs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from cluster.model import Transformer
from serve.engine.cuda_graphs import additive_mask
from serve.engine.fused_model import FusedModel, decode_attention
from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.paged_attention import available as paged_available
from serve.engine.paged_attention import paged_decode_attention
from serve.engine.request import Sequence

# Not cuDNN's SDPA: it builds an execution graph for every new shape (hundreds of ms: sglang#4650,
# pytorch#161434), and prefill chunk lengths change every step. Flash / memory-efficient / math have
# no per-shape setup.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PrefillChunk:
    start: int  # offset of its first query in the flat batch
    q_len: int
    ctx_len: int  # cached + new tokens attended to
    blocks: torch.Tensor | None  # (nb,) block ids; None when the chunk is the whole context
    mask: torch.Tensor | None  # (q_len, ctx_len) bool, True = attend


@dataclass
class FreshBatch:
    """Prefill chunks with nothing cached before them, attended together: right-padded to the
    longest into one ``(C, heads, L, D)`` causal SDPA (padding sits after every real query, so
    causality alone keeps it out of the real rows)."""

    num: int  # C chunks
    length: int  # L, the longest chunk
    gather: torch.Tensor  # (C * L,) flat row of each padded position (padding repeats a real row)
    src: torch.Tensor  # (R,) padded positions of the real rows
    dst: torch.Tensor  # (R,) their flat rows


def fresh_groups(chunks: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Group (start, q_len) chunks for ``FreshBatch``es, longest first, each group's shortest at
    least half its longest (padding stays under half the compute); singletons stay alone."""
    groups: list[list[tuple[int, int]]] = []
    for c in sorted(chunks, key=lambda c: -c[1]):
        if groups and 2 * c[1] >= groups[-1][0][1]:
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # (N,) flat slot of every new token
    decode_idx: torch.Tensor | None  # (Bd,) flat offsets of the decode queries
    decode_tables: torch.Tensor | None  # (Bd, max_blocks) block ids, padded with 0
    decode_mask: (
        torch.Tensor | None
    )  # (Bd, 1, 1, max_blocks * block_size) additive: 0 or -inf, KV dtype; None with Triton
    prefills: list[PrefillChunk]
    decode_ctx: torch.Tensor | None = None  # (Bd,) tokens each decode query attends to
    fresh: list[FreshBatch] = field(default_factory=list)  # uncached chunks attended in batches


class PagedAttention:
    """Attention over the engine's paged pool for one step's flat batch (see the module docstring)."""

    def __init__(self, kv: KVCacheManager, meta: StepMetadata) -> None:
        self.kv = kv
        self.meta = meta

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (N, H, D), k/v (N, Hkv, D) -> (N, H, D) (into ``out`` if given; rows that are neither a
        decode query nor in a prefill chunk are left as they are); stores k/v in their slots first."""
        cache = self.kv.kv[layer]  # (2, NB, BS, Hkv, D)
        _, nb, bs, hkv, d = cache.shape
        m = self.meta
        cache[0].view(nb * bs, hkv, d).index_copy_(0, m.slot_mapping, k)
        cache[1].view(nb * bs, hkv, d).index_copy_(0, m.slot_mapping, v)
        if not q.is_cuda:
            return self._attend(q, k, v, cache, out)
        with sdpa_kernel(SDPA_BACKENDS):
            return self._attend(q, k, v, cache, out)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        _, nb, bs, hkv, d = cache.shape
        m = self.meta
        if m.decode_idx is not None and not m.prefills and not m.fresh and out is None:
            return self._decode(q, cache)
        gqa = q.shape[1] != hkv
        if out is None:
            out = torch.empty_like(q)  # (N, H, D)
        if m.decode_idx is not None:
            out[m.decode_idx] = self._decode(q[m.decode_idx], cache)
        for f in m.fresh:
            H = q.shape[1]
            qs = q.index_select(0, f.gather).view(f.num, f.length, H, d).transpose(1, 2)  # (C, H, L, D)
            ks = k.index_select(0, f.gather).view(f.num, f.length, hkv, d).transpose(1, 2)
            vs = v.index_select(0, f.gather).view(f.num, f.length, hkv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            out.index_copy_(0, f.dst, o.transpose(1, 2).reshape(-1, H, d).index_select(0, f.src))
        for c in m.prefills:
            # 4-D (1, heads, len, D): SDPA's fused CUDA kernels take only batched inputs (3-D ran the math kernel)
            qs = q[c.start : c.start + c.q_len].transpose(0, 1)[None]  # (1, H, q, D)
            if c.blocks is None:
                ks = k[c.start : c.start + c.q_len].transpose(0, 1)[None]  # (1, Hkv, q, D)
                vs = v[c.start : c.start + c.q_len].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            else:
                ks = (
                    cache[0, c.blocks].view(-1, hkv, d)[: c.ctx_len].transpose(0, 1)[None]
                )  # (1, Hkv, ctx, D)
                vs = cache[1, c.blocks].view(-1, hkv, d)[: c.ctx_len].transpose(0, 1)[None]
                if (
                    q.is_cuda
                ):  # the chunk's queries are the last q_len positions: bottom-right causal, fused kernel
                    if gqa:
                        ks, vs = (
                            ks.repeat_interleave(q.shape[1] // hkv, 1),
                            vs.repeat_interleave(q.shape[1] // hkv, 1),
                        )
                    o = F.scaled_dot_product_attention(
                        qs, ks, vs, attn_mask=causal_lower_right(c.q_len, c.ctx_len)
                    )
                else:
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=c.mask, enable_gqa=gqa)
            out[c.start : c.start + c.q_len] = o[0].transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        m = self.meta
        if m.decode_mask is None:  # Triton reads the paged pool directly
            return paged_decode_attention(q, cache[0], cache[1], m.decode_tables, m.decode_ctx)
        return decode_attention(
            q, cache[0], cache[1], m.decode_tables, m.decode_mask, q.shape[1] // cache.shape[3]
        )


class PendingTokens:
    """The tokens of a multi-step burst (``ModelRunner.decode_steps_async``): ``get()`` -> each
    sequence's ``steps`` greedy tokens, waiting for the GPU's copy if the burst ran in CUDA graphs.
    ``on_gpu``: its last tokens also sit in the decode graphs' inputs, so the next burst of the same
    sequences can be queued before this one is read back."""

    def __init__(
        self,
        steps: int,
        tokens: list[list[int]] | None = None,
        host: torch.Tensor | None = None,
        done: torch.cuda.Event | None = None,
    ) -> None:
        self.steps = steps
        self._tokens, self._host, self._done = tokens, host, done
        self.on_gpu = tokens is None

    def get(self) -> list[list[int]]:
        if self._tokens is None:
            self._done.synchronize()
            self._tokens = self._host.tolist()
        return self._tokens


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        kv: KVCacheManager,
        device: torch.device,
        *,
        cuda_graphs: bool = False,
        max_batch: int = 1,
        max_model_len: int = 1,
        compile: bool = False,
        max_steps: int = 1,
        max_tokens: int = 0,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        self.fused = FusedModel(model, max_model_len)
        # decode attention straight from the paged pool (Triton) where it can run, else gather + SDPA
        self.paged = paged_available(device, self.fused.head_dim)
        if self.paged:  # compile the Triton kernel now (for the eager steps' layout), not on a first request
            c, fm = kv.kv[0], self.fused
            paged_decode_attention(
                torch.zeros(1, fm.n_heads, fm.head_dim, dtype=c.dtype, device=device),
                c[0],
                c[1],
                torch.zeros(1, 1, dtype=torch.long, device=device),
                torch.ones(1, dtype=torch.long, device=device),
            )
        self.graphs = None
        self.pieces = None
        self.steps = None
        if cuda_graphs and device.type == "cuda":
            from serve.engine.cuda_graphs import DecodeGraphs
            from serve.engine.piecewise_graphs import PiecewiseGraphs, StepGraphs

            self.graphs = DecodeGraphs(
                self.fused,
                kv,
                device,
                max_batch,
                -(-max_model_len // kv.block_size),
                compile=compile,
                max_steps=max_steps,
                paged=self.paged,
            )
            self.graphs.capture_all()
            # two pinned buffers for multi-step tokens: one burst's copy lands while the other's is read
            self._burst_host = [
                torch.zeros(max_batch, max(1, max_steps), dtype=torch.long, pin_memory=True) for _ in range(2)
            ]
            self._burst_flip = 0
            if max_tokens and all(
                self.fused.decode_weights(i) is not None for i in range(len(self.fused.layers))
            ):
                if self.paged:  # whole steps as graphs (attention from static buffers)
                    self.steps = StepGraphs(
                        self.fused,
                        kv,
                        device,
                        max_tokens,
                        max_batch,
                        -(-max_model_len // kv.block_size),
                        compile=compile,
                    )
                    self.steps.capture_all()
                else:  # graphs between eager attention calls
                    self.pieces = PiecewiseGraphs(self.fused, device, max_tokens, kv.kv[0].dtype)
                    self.pieces.capture_all()

    def build(
        self,
        seqs: list[Sequence],
        num_new: list[int],
        pad_to: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, StepMetadata, list[int]]:
        """Flat tokens (N,), positions (N,), attention metadata, and the flat offsets of the
        rows whose logits are needed (sequences whose chunk reaches their last known token).
        ``pad_to``: rows up to it are padding (token 0, position 0, k/v into the scratch block)."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        dec_idx, dec_tables, dec_ctx = [], [], []
        prefills: list[tuple[int, int, int, list[int]]] = []
        for seq, n in zip(seqs, num_new, strict=True):
            start = seq.num_computed_tokens
            table = self.kv.block_tables[seq.request_id]
            off = len(tokens)
            tokens.extend(seq.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.num_tokens:
                logit_rows.append(off + n - 1)
            if n == 1 and start > 0:
                dec_idx.append(off)
                dec_tables.append(table[: (start + bs) // bs])
                dec_ctx.append(start + 1)
            else:
                prefills.append((off, n, start + n, table[: -(-(start + n) // bs)]))
        if pad_to is not None and pad_to > len(tokens):
            pad = pad_to - len(tokens)
            tokens += [0] * pad
            positions += [0] * pad
            slots += [self.kv.scratch_block * bs] * pad
        meta = self._metadata(slots, dec_idx, dec_tables, dec_ctx, prefills)
        dev = self.device
        tok = torch.tensor(tokens, dtype=torch.long).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True)
        return tok, pos, meta, logit_rows

    def _metadata(self, slots, dec_idx, dec_tables, dec_ctx, prefills) -> StepMetadata:
        dev, bs = self.device, self.block_size
        slot_mapping = torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True)
        decode_idx = decode_tables = decode_mask = ctx = None
        if dec_idx:
            nbmax = max(len(t) for t in dec_tables)
            padded = [t + [0] * (nbmax - len(t)) for t in dec_tables]
            decode_idx = torch.tensor(dec_idx, dtype=torch.long).to(dev, non_blocking=True)
            decode_tables = torch.tensor(padded, dtype=torch.long).to(dev, non_blocking=True)
            ctx = torch.tensor(dec_ctx, dtype=torch.long).to(dev, non_blocking=True)
            if not self.paged:
                decode_mask = additive_mask(
                    torch.arange(nbmax * bs, device=dev)[None, :] < ctx[:, None], self.kv.kv[0].dtype
                )
        chunks, fresh = [], []
        for group in fresh_groups([(off, q_len) for off, q_len, ctx_len, _ in prefills if ctx_len == q_len]):
            if len(group) == 1:
                chunks.append(PrefillChunk(group[0][0], group[0][1], group[0][1], None, None))
            else:
                fresh.append(self._fresh_batch(group))
        for off, q_len, ctx_len, blocks in prefills:
            if ctx_len == q_len:
                continue
            mask = None
            if dev.type != "cuda":  # CUDA uses causal_lower_right (no materialized mask)
                qpos = torch.arange(ctx_len - q_len, ctx_len, device=dev)
                mask = torch.arange(ctx_len, device=dev)[None, :] <= qpos[:, None]  # (q, ctx)
            bt = torch.tensor(blocks, dtype=torch.long).to(dev, non_blocking=True)
            chunks.append(PrefillChunk(off, q_len, ctx_len, bt, mask))
        return StepMetadata(slot_mapping, decode_idx, decode_tables, decode_mask, chunks, ctx, fresh)

    def _fresh_batch(self, group: list[tuple[int, int]]) -> FreshBatch:
        length = group[0][1]  # longest first
        gather, src, dst = [], [], []
        for i, (off, q_len) in enumerate(group):
            gather += list(range(off, off + q_len)) + [off] * (length - q_len)
            src += range(i * length, i * length + q_len)
            dst += range(off, off + q_len)
        dev = self.device
        t = torch.tensor(
            [gather, src + [0] * (len(gather) - len(src)), dst + [0] * (len(gather) - len(dst))],
            dtype=torch.long,
        ).to(dev, non_blocking=True)  # one copy for the three
        return FreshBatch(len(group), length, t[0], t[1, : len(src)], t[2, : len(dst)])

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """Run the step; returns fp32 logits ``(len(logit rows), V)`` in the order of ``seqs``
        that reached their last token."""
        if self.graphs is not None and all(
            n == 1 and s.num_computed_tokens > 0 for s, n in zip(seqs, num_new, strict=False)
        ):
            out = self._graph_decode(seqs)
            if out is not None:
                return out
        if self.steps is not None and self.steps.bucket(sum(num_new)) is not None:
            out = self._graph_step(seqs, num_new)
            if out is not None:
                return out
        if self.pieces is not None:
            t = self.pieces.bucket(sum(num_new))
            if t is not None:
                tokens, positions, meta, rows = self.build(seqs, num_new, pad_to=t)
                x = self.pieces.run(tokens, positions, PagedAttention(self.kv, meta), t)
                return self._logits(x, rows)
        tokens, positions, meta, rows = self.build(seqs, num_new)
        return self._forward(tokens, positions, meta, rows)

    def _graph_step(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor | None:
        bs = self.block_size
        chunks = []
        for seq, n in zip(seqs, num_new, strict=True):
            start = seq.num_computed_tokens
            table = self.kv.block_tables[seq.request_id][: -(-(start + n) // bs)]
            chunks.append((seq.token_slice(start, start + n), start, table, start + n == seq.num_tokens))
        if not self.steps.fits(len(chunks), max(len(c[2]) for c in chunks)):
            return None
        return self.steps.run(chunks)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, meta: StepMetadata, rows: list[int]
    ) -> torch.Tensor:
        fm = self.fused
        attn = PagedAttention(self.kv, meta)
        x = fm.embed(tokens)  # (N, d)
        cos, sin = fm.rope_tables(positions)
        for i in range(len(fm.layers)):
            q, k, v = fm.qkv(i, x, cos, sin)
            x = fm.finish(i, x, attn.attend(i, q, k, v))
        return self._logits(x, rows)

    def _logits(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """fp32 logits of the hidden states' ``rows``."""
        fm = self.fused
        if not rows:
            return x.new_empty((0, self.model.cfg.vocab_size), dtype=torch.float32)
        if len(rows) < x.shape[0]:
            x = x.index_select(0, torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True))
        return fm.logits(x)  # (S, V)

    def _graph_decode(
        self, seqs: list[Sequence], steps: int = 1, offset: int = 0, last: list[int] | None = None
    ) -> torch.Tensor | None:
        """Decode ``seqs`` in the CUDA graphs from ``offset`` positions past their computed tokens:
        the input token of each is its own (``offset == 0``), ``last`` (given), or — with neither —
        the one the previous burst's last replay left in the graphs' inputs."""
        bs = self.block_size
        pos = [s.num_computed_tokens + offset for s in seqs]
        tables = [
            self.kv.block_tables[s.request_id][: (p + steps - 1) // bs + 1]
            for s, p in zip(seqs, pos, strict=False)
        ]
        if not self.graphs.fits(len(seqs), max(len(t) for t in tables)):
            return None
        toks = last if offset else [s.token_slice(p, p + 1)[0] for s, p in zip(seqs, pos, strict=False)]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=False)]
        return self.graphs.run(toks, pos, slots, tables, steps)

    @torch.inference_mode()
    def decode_steps(self, seqs: list[Sequence], steps: int) -> list[list[int]]:
        """``steps`` greedy decode steps of ``seqs`` (each one token behind, with KV blocks reserved
        for ``steps`` more tokens) with no scheduling or sampling in between -> each sequence's new
        tokens. In CUDA graphs when the batch fits one (the tokens stay on the GPU until the end),
        else eagerly."""
        return self.decode_steps_async(seqs, steps).get()

    @torch.inference_mode()
    def decode_steps_async(
        self, seqs: list[Sequence], steps: int, after: PendingTokens | None = None
    ) -> PendingTokens:
        """``decode_steps``, returning before the tokens are back when the burst runs in CUDA graphs.
        ``after``: the burst of the same ``seqs`` (same order) still to be applied: this one starts
        where it ends (KV blocks reserved for both). When both run in the graphs, this one is queued
        behind it on the GPU without reading its tokens back first — the host applies one burst while
        the GPU runs the next (vLLM's async scheduling)."""
        offset = after.steps if after is not None else 0
        if self.graphs is not None and 1 < steps <= self.graphs.max_steps:
            last = None if after is None or after.on_gpu else [t[-1] for t in after.get()]
            if self._graph_decode(seqs, steps, offset, last) is not None:
                host = self._burst_host[self._burst_flip][: len(seqs)]  # whole rows: one contiguous copy
                self._burst_flip ^= 1
                host.copy_(self.graphs.history[: len(seqs)], non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                return PendingTokens(steps, host=host[:, :steps], done=done)
        bs, n = self.block_size, len(seqs)
        pos = [s.num_computed_tokens + offset for s in seqs]
        if after is not None:
            toks = [t[-1] for t in after.get()]
        else:
            toks = [s.token_slice(p, p + 1)[0] for s, p in zip(seqs, pos, strict=True)]
        tables = [self.kv.block_tables[s.request_id] for s in seqs]
        out: list[list[int]] = [[] for _ in seqs]
        for _ in range(steps):
            slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)]
            meta = self._metadata(
                slots,
                list(range(n)),
                [t[: p // bs + 1] for t, p in zip(tables, pos, strict=True)],
                [p + 1 for p in pos],
                [],
            )
            tok = torch.tensor(toks, dtype=torch.long).to(self.device, non_blocking=True)
            posn = torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True)
            toks = self._forward(tok, posn, meta, list(range(n))).argmax(dim=-1).tolist()
            for o, t in zip(out, toks, strict=True):
                o.append(t)
            pos = [p + 1 for p in pos]
        return PendingTokens(steps, tokens=out)
