"""Runs one engine step: builds the flat batch, runs the model over paged KV, returns logits.

All scheduled tokens of all sequences go through the model as one flat row ``(1, N)`` (vLLM's
layout), so the linear layers see one ``(N, d)`` matmul per step however the batch is mixed.
Attention is the only per-sequence part; ``PagedAttention`` implements ``cluster.model.KVCache``:

* new k/v are scattered into their slots of the paged pool (one ``index_copy_`` per layer);
* decode tokens (one query each) are attended together: their blocks are gathered into a padded
  ``(B, L, Hkv, D)`` and one masked SDPA runs over the batch (measured faster on CPU than one
  SDPA per sequence from batch 2 on: the per-call overhead dominates at these sizes);
* prefill chunks are attended one sequence at a time: plain causal SDPA over the new tokens when
  nothing is cached before them, else a masked SDPA over the gathered prefix + chunk.

The same code runs on CUDA (SDPA picks its fused kernels; the metadata is built on the host and
copied once per step, not per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.model import Transformer, rope_cos_sin
from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.request import Sequence


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool keep-mask -> (B, 1, 1, L) additive mask, built once per step (not per layer)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))[:, None, None, :]


@dataclass
class PrefillChunk:
    start: int  # offset of its first query in the flat batch
    q_len: int
    ctx_len: int  # cached + new tokens attended to
    blocks: torch.Tensor | None  # (nb,) block ids; None when the chunk is the whole context
    mask: torch.Tensor | None  # (q_len, ctx_len) bool, True = attend


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # (N,) flat slot of every new token
    decode_idx: torch.Tensor | None  # (Bd,) flat offsets of the decode queries
    decode_tables: torch.Tensor | None  # (Bd, max_blocks) block ids, padded with 0
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, max_blocks * block_size) additive: 0 or -inf, KV dtype
    prefills: list[PrefillChunk]


class PagedAttention:
    """``cluster.model.KVCache`` over the engine's paged pool, for one step's flat batch."""

    def __init__(self, kv: KVCacheManager, meta: StepMetadata) -> None:
        self.kv = kv
        self.meta = meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, N, H, D), k/v (1, N, Hkv, D) -> (1, N, H, D)."""
        cache = self.kv.kv[layer]  # (2, NB, BS, Hkv, D)
        _, nb, bs, hkv, d = cache.shape
        m = self.meta
        k_flat, v_flat = cache[0].view(nb * bs, hkv, d), cache[1].view(nb * bs, hkv, d)
        k_flat.index_copy_(0, m.slot_mapping, k[0])
        v_flat.index_copy_(0, m.slot_mapping, v[0])
        gqa = q.shape[2] != hkv
        if m.decode_idx is not None and not m.prefills:
            return self._decode(cache, q[0], gqa).unsqueeze(0)
        out = torch.empty_like(q[0])  # (N, H, D)
        if m.decode_idx is not None:
            out[m.decode_idx] = self._decode(cache, q[0], gqa)
        for c in m.prefills:
            qs = q[0, c.start : c.start + c.q_len].transpose(0, 1)  # (H, q, D)
            if c.blocks is None:
                ks = k[0, c.start : c.start + c.q_len].transpose(0, 1)  # (Hkv, q, D)
                vs = v[0, c.start : c.start + c.q_len].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            else:
                ks = cache[0, c.blocks].view(-1, hkv, d)[: c.ctx_len].transpose(0, 1)  # (Hkv, ctx, D)
                vs = cache[1, c.blocks].view(-1, hkv, d)[: c.ctx_len].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=c.mask, enable_gqa=gqa)
            out[c.start : c.start + c.q_len] = o.transpose(0, 1)
        return out.unsqueeze(0)

    def _decode(self, cache: torch.Tensor, q: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Decode queries (Bd, H, D) -> (Bd, H, D) over each sequence's gathered blocks."""
        m = self.meta
        _, _, bs, hkv, d = cache.shape
        B, nbmax = m.decode_tables.shape
        qd = q if len(m.prefills) == 0 else q[m.decode_idx]
        qd = qd.unsqueeze(2)  # (Bd, H, 1, D)
        kd = cache[0].index_select(0, m.decode_tables.reshape(-1)).view(B, nbmax * bs, hkv, d).transpose(1, 2)  # (Bd, Hkv, L, D)
        vd = cache[1].index_select(0, m.decode_tables.reshape(-1)).view(B, nbmax * bs, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=m.decode_mask, enable_gqa=gqa)
        return o.squeeze(2)


class ModelRunner:
    def __init__(
        self, model: Transformer, kv: KVCacheManager, device: torch.device, *, cuda_graphs: bool = False,
        max_batch: int = 1, max_model_len: int = 1,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        self.graphs = None
        if cuda_graphs and device.type == "cuda":
            from serve.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, kv, device, max_batch, -(-max_model_len // kv.block_size))

    def build(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor, StepMetadata, list[int]]:
        """Flat tokens (1, N), positions (1, N), attention metadata, and the flat offsets of the
        rows whose logits are needed (sequences whose chunk reaches their last known token)."""
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
        meta = self._metadata(slots, dec_idx, dec_tables, dec_ctx, prefills)
        dev = self.device
        tok = torch.tensor(tokens, dtype=torch.long).to(dev, non_blocking=True).unsqueeze(0)
        pos = torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True).unsqueeze(0)
        return tok, pos, meta, logit_rows

    def _metadata(self, slots, dec_idx, dec_tables, dec_ctx, prefills) -> StepMetadata:
        dev, bs = self.device, self.block_size
        slot_mapping = torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True)
        decode_idx = decode_tables = decode_mask = None
        if dec_idx:
            nbmax = max(len(t) for t in dec_tables)
            padded = [t + [0] * (nbmax - len(t)) for t in dec_tables]
            decode_idx = torch.tensor(dec_idx, dtype=torch.long).to(dev, non_blocking=True)
            decode_tables = torch.tensor(padded, dtype=torch.long).to(dev, non_blocking=True)
            ctx = torch.tensor(dec_ctx, dtype=torch.long).to(dev, non_blocking=True)
            decode_mask = additive_mask(torch.arange(nbmax * bs, device=dev)[None, :] < ctx[:, None], self.kv.kv[0].dtype)
        chunks = []
        for off, q_len, ctx_len, blocks in prefills:
            if ctx_len == q_len:
                chunks.append(PrefillChunk(off, q_len, ctx_len, None, None))
                continue
            qpos = torch.arange(ctx_len - q_len, ctx_len, device=dev)
            mask = torch.arange(ctx_len, device=dev)[None, :] <= qpos[:, None]  # (q, ctx)
            bt = torch.tensor(blocks, dtype=torch.long).to(dev, non_blocking=True)
            chunks.append(PrefillChunk(off, q_len, ctx_len, bt, mask))
        return StepMetadata(slot_mapping, decode_idx, decode_tables, decode_mask, chunks)

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_new: list[int]) -> torch.Tensor:
        """Run the step; returns fp32 logits ``(len(logit rows), V)`` in the order of ``seqs``
        that reached their last token."""
        if self.graphs is not None and all(n == 1 and s.num_computed_tokens > 0 for s, n in zip(seqs, num_new, strict=False)):
            out = self._graph_decode(seqs)
            if out is not None:
                return out
        tokens, positions, meta, rows = self.build(seqs, num_new)
        m = self.model
        attn = PagedAttention(self.kv, meta)
        x = m.model.embed_tokens(tokens)  # (1, N, d)
        cos, sin = rope_cos_sin(positions, m.cfg.dim_head, m.cfg.rope_theta, x.dtype)
        for block in m.model.layers:
            x = block(x, cos, sin, attn)
        if not rows:
            return x.new_empty((0, m.cfg.vocab_size), dtype=torch.float32)
        idx = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        h = m.model.norm(x[0].index_select(0, idx))  # (S, d)
        return m.lm_head(h).float()  # (S, V)

    def _graph_decode(self, seqs: list[Sequence]) -> torch.Tensor | None:
        bs = self.block_size
        pos = [s.num_computed_tokens for s in seqs]
        tables = [self.kv.block_tables[s.request_id][: p // bs + 1] for s, p in zip(seqs, pos, strict=False)]
        if not self.graphs.fits(len(seqs), max(len(t) for t in tables)):
            return None
        toks = [s.token_slice(p, p + 1)[0] for s, p in zip(seqs, pos, strict=False)]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=False)]
        return self.graphs.run(toks, pos, slots, tables)
