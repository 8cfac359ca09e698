"""Decode attention straight from the paged KV pool (Triton, CUDA): no gathered copy, no mask.

The portable path (``fused_model.decode_attention``) gathers every sequence's blocks into a padded
``(B, L, Hkv, D)`` copy and runs one masked SDPA: at batch 64 with 256-token contexts on the
``base`` model that copy is ~50 MB per layer. This kernel reads each sequence's blocks through its
block table where they lie, ``TILE`` tokens at a time, with an online softmax (one program per
sequence and query head; positions at or past the sequence's context length are masked in
registers). It launches with a fixed grid and loops to each sequence's own length, so it is
CUDA-graph safe. Triton is optional: without it (CPU builds) ``available()`` is False.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(device: torch.device, head_dim: int) -> bool:
    """Triton is importable, the device is CUDA and the head size a power of two (``tl.arange``)."""
    return triton is not None and device.type == "cuda" and head_dim & (head_dim - 1) == 0


if triton is not None:

    # strides and lengths vary from step to step: one compiled kernel for all (no value specialization)
    @triton.jit(do_not_specialize=["s_qb", "s_qh", "s_kblk", "s_ktok", "s_kh", "s_tb", "s_ctx", "s_ob", "s_oh",
                                   "max_ctx"])
    def _paged_decode(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr,
                      s_qb, s_qh, s_kblk, s_ktok, s_kh, s_tb, s_ctx, s_ob, s_oh, scale,
                      max_ctx, N_REP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // N_REP
        ctx = tl.minimum(tl.load(ctx_ptr + b * s_ctx), max_ctx)  # never past the block table
        d = tl.arange(0, D)
        t = tl.arange(0, TILE)
        q = tl.load(q_ptr + b * s_qb + h * s_qh + d).to(tl.float32) * scale
        m = tl.max(tl.full([TILE], float("-inf"), tl.float32), 0)
        acc_l = tl.sum(tl.zeros([TILE], tl.float32), 0)
        acc = tl.zeros([D], tl.float32)
        for start in range(0, ctx, TILE):
            pos = start + t
            live = pos < ctx
            blk = tl.load(tables_ptr + b * s_tb + pos // BS, mask=live, other=0)
            off = blk.to(tl.int64) * s_kblk + (pos % BS) * s_ktok + kvh * s_kh
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.where(live, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            acc_l = acc_l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        out = acc / acc_l
        tl.store(out_ptr + b * s_ob + h * s_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           ctx_lens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D); caches (NB, BS, Hkv, D) (D contiguous); tables (B, nb) block ids; ctx_lens (B,)
    tokens each query attends to (>= 1); any of them may be strided views (the CUDA graphs pass
    columns of their input buffer) -> (B, H, D)."""
    B, H, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_decode_attention needs caches with contiguous head dims, laid out alike")
    if q.stride(2) != 1:
        q = q.contiguous()
    _paged_decode[(B, H)](
        q, k_cache, v_cache, tables, ctx_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        ctx_lens.stride(0), out.stride(0), out.stride(1), D**-0.5, tables.shape[1] * BS,
        N_REP=H // Hkv, BS=BS, D=D, TILE=64, num_warps=4,
    )
    return out
