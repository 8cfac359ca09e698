"""Attention straight from the paged KV pool (Triton, CUDA): no gathered copy, no mask.

The portable path (``fused_model.decode_attention``) gathers every sequence's blocks into a padded
``(B, L, Hkv, D)`` copy and runs one masked SDPA: at batch 64 with 256-token contexts on the
``base`` model that copy is ~50 MB per layer. This kernel reads each sequence's blocks through its
block table where they lie, ``TILE`` tokens at a time, with an online softmax (one-warp programs per
sequence, query head and key split — splits only while the batch alone leaves the GPU idle, combined
by a second kernel; positions at or past the sequence's context length are masked in registers). It
launches with a fixed grid and loops to each sequence's own length, so it is CUDA-graph safe. Triton is optional: without it (CPU builds) ``available()`` is False.

``paged_varlen_attention`` is the same for any step (prefill chunks after a cached prefix, fresh
prompts, decode rows of a mixed batch): queries come in *query blocks* of up to ``BLOCK_Q``
consecutive rows of one sequence, each attending causally to its sequence's keys through the block
table (whose new k/v were written to the pool before the call); ``tl.dot`` on tiles of
``BLOCK_Q x TILE``. Query blocks are a fixed-size table (unused entries have 0 rows and return at
once), so a whole step — every layer's attention included — is one CUDA graph per token bucket
(vLLM v1's unified Triton attention has the same shape).
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

    @triton.jit
    def kv_offsets(table_ptr, pos, live, BS: tl.constexpr, s_kblk, s_ktok, head_off):
        """Element offsets in the paged pool of the tokens at positions ``pos`` of one sequence
        (``table_ptr``: its block-table row; masked positions read block 0): the shared first step
        of every kernel that reads K/V through a block table."""
        blk = tl.load(table_ptr + pos // BS, mask=live, other=0)
        return blk.to(tl.int64) * s_kblk + (pos % BS) * s_ktok + head_off

    # The table width and context lengths vary from step to step: not specialized (one compiled
    # kernel for all, no compile while serving). The q / cache / out strides are model constants
    # (multiples of the head size) and stay specialized: Triton then knows every row start is
    # 16-byte aligned and issues vector loads (without it, one 2-byte load per element).
    @triton.jit(do_not_specialize=["s_tb", "s_ctx", "max_ctx"])
    def _paged_decode(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        ctx_ptr,
        out_ptr,
        part_ptr,
        ml_ptr,
        s_qb,
        s_qh,
        s_kblk,
        s_ktok,
        s_kh,
        s_tb,
        s_ctx,
        s_ob,
        s_oh,
        scale,
        max_ctx,
        H: tl.constexpr,
        N_REP: tl.constexpr,
        BS: tl.constexpr,
        D: tl.constexpr,
        TILE: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        kvh = h // N_REP
        ctx = tl.minimum(tl.load(ctx_ptr + b * s_ctx), max_ctx)  # never past the block table
        # this program's keys: split ``sp`` of SPLITS, in whole tiles (later splits may be empty)
        per = tl.cdiv(tl.cdiv(ctx, SPLITS), TILE) * TILE
        lo = sp * per
        hi = tl.minimum(lo + per, ctx)
        d = tl.arange(0, D)
        t = tl.arange(0, TILE)
        table = tables_ptr + b * s_tb
        q = tl.load(q_ptr + b * s_qb + h * s_qh + d).to(tl.float32) * scale
        m = tl.max(tl.full([TILE], float("-inf"), tl.float32), 0)
        acc_l = tl.sum(tl.zeros([TILE], tl.float32), 0)
        acc = tl.zeros([D], tl.float32)
        # software pipelining: the next tile's table entries, keys and values are loaded before this
        # tile's math, so one tile's memory latency hides behind the other's (at batch 1 the kernel
        # is a chain of dependent loads, not bandwidth)
        pos = lo + t
        live = pos < hi
        off = kv_offsets(table, pos, live, BS, s_kblk, s_ktok, kvh * s_kh)
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0)
        for start in range(lo, hi, TILE):
            nxt = start + TILE + t
            nlive = nxt < hi
            noff = kv_offsets(table, nxt, nlive, BS, s_kblk, s_ktok, kvh * s_kh)
            nk = tl.load(k_ptr + noff[:, None] + d[None, :], mask=nlive[:, None], other=0.0)
            nv = tl.load(v_ptr + noff[:, None] + d[None, :], mask=nlive[:, None], other=0.0)
            s = tl.where(live, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            acc_l = acc_l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m = m_new
            k, v, live = nk, nv, nlive
        if SPLITS == 1:
            tl.store(out_ptr + b * s_ob + h * s_oh + d, (acc / acc_l).to(out_ptr.dtype.element_ty))
        else:  # fp32 partials (unnormalized sum, max, sum of weights) for _decode_combine
            row = (b * H + h) * SPLITS + sp
            tl.store(part_ptr + row * D + d, acc)
            tl.store(ml_ptr + row * 2, m)
            tl.store(ml_ptr + row * 2 + 1, acc_l)

    @triton.jit
    def _decode_combine(
        part_ptr, ml_ptr, out_ptr, s_ob, s_oh, H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        rows = (b * H + h) * SPLITS + tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        m = tl.load(ml_ptr + rows * 2)
        w = tl.exp(m - tl.max(m, 0))  # empty splits (max -inf) weigh 0; split 0 always has keys
        l_sum = tl.sum(w * tl.load(ml_ptr + rows * 2 + 1), 0)
        acc = tl.sum(w[:, None] * tl.load(part_ptr + rows[:, None] * D + d[None, :]), axis=0)
        tl.store(out_ptr + b * s_ob + h * s_oh + d, (acc / l_sum).to(out_ptr.dtype.element_ty))

    @triton.jit(do_not_specialize=["s_tb", "split_rows"])
    def _paged_varlen(
        q_ptr,
        k_ptr,
        v_ptr,
        qblocks_ptr,
        tables_ptr,
        out_ptr,
        part_ptr,
        ml_ptr,
        s_qn,
        s_qh,
        s_kblk,
        s_ktok,
        s_kh,
        s_tb,
        s_on,
        s_oh,
        split_rows,
        scale,
        N_REP: tl.constexpr,
        BS: tl.constexpr,
        D: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        TILE: tl.constexpr,
        SPLITS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        kvh = h // N_REP
        row0 = tl.load(qblocks_ptr + qb * 4)  # first flat row, rows, sequence (table row), position of row0
        nrows = tl.load(qblocks_ptr + qb * 4 + 1)
        seq = tl.load(qblocks_ptr + qb * 4 + 2)
        pos0 = tl.load(qblocks_ptr + qb * 4 + 3)
        end = pos0 + nrows  # keys [0, end) of the sequence; row r sees [0, pos0 + r]
        per = tl.cdiv(tl.cdiv(end, TILE), SPLITS) * TILE  # this split's key range: [lo, hi)
        lo = split * per
        hi = tl.minimum(lo + per, end)
        if (nrows > 0) & (lo < end):
            r = tl.arange(0, BLOCK_Q)
            d = tl.arange(0, D)
            t = tl.arange(0, TILE)
            live_q = r < nrows
            qpos = pos0 + r
            rows = (row0 + r).to(tl.int64)
            q = tl.load(q_ptr + rows[:, None] * s_qn + h * s_qh + d[None, :], mask=live_q[:, None], other=0.0)
            q = (q.to(tl.float32) * scale).to(q.dtype)
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
            acc_l = tl.zeros([BLOCK_Q], tl.float32)
            acc = tl.zeros([BLOCK_Q, D], tl.float32)
            for start in range(lo, hi, TILE):
                kpos = start + t
                live_k = kpos < hi
                off = kv_offsets(
                    tables_ptr + seq.to(tl.int64) * s_tb, kpos, live_k, BS, s_kblk, s_ktok, kvh * s_kh
                )
                k = tl.load(k_ptr + off[:, None] + d[None, :], mask=live_k[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_Q, TILE) fp32
                s = tl.where((kpos[None, :] <= qpos[:, None]) & live_k[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet in this split
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m - m_safe)
                v = tl.load(v_ptr + off[:, None] + d[None, :], mask=live_k[:, None], other=0.0)
                acc_l = acc_l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m = m_new
            if SPLITS == 1:  # every live row saw key 0: acc_l > 0
                out = acc / acc_l[:, None]
                tl.store(
                    out_ptr + rows[:, None] * s_on + h * s_oh + d[None, :],
                    out.to(out_ptr.dtype.element_ty),
                    mask=live_q[:, None],
                )
            else:  # unnormalized partials, combined by _varlen_combine
                prow = (split * split_rows + rows) * tl.num_programs(1) + h  # (split, row, head)
                tl.store(part_ptr + prow[:, None] * D + d[None, :], acc, mask=live_q[:, None])
                tl.store(ml_ptr + prow * 2, m, mask=live_q)
                tl.store(ml_ptr + prow * 2 + 1, acc_l, mask=live_q)

    @triton.jit(do_not_specialize=["split_rows"])
    def _varlen_combine(
        qblocks_ptr,
        out_ptr,
        part_ptr,
        ml_ptr,
        s_on,
        s_oh,
        split_rows,
        D: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        TILE: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        qb = tl.program_id(0)
        h = tl.program_id(1)
        H = tl.num_programs(1)
        row0 = tl.load(qblocks_ptr + qb * 4)
        nrows = tl.load(qblocks_ptr + qb * 4 + 1)
        end = tl.load(qblocks_ptr + qb * 4 + 3) + nrows
        if nrows > 0:
            r = tl.arange(0, BLOCK_Q)
            d = tl.arange(0, D)
            live_q = r < nrows
            rows = (row0 + r).to(tl.int64)
            per = tl.cdiv(tl.cdiv(end, TILE), SPLITS) * TILE
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
            acc_l = tl.zeros([BLOCK_Q], tl.float32)
            acc = tl.zeros([BLOCK_Q, D], tl.float32)
            for split in range(0, tl.cdiv(end, per)):  # the splits that had keys (and so wrote partials)
                prow = (split * split_rows + rows) * H + h
                m_s = tl.load(ml_ptr + prow * 2, mask=live_q, other=float("-inf"))
                l_s = tl.load(ml_ptr + prow * 2 + 1, mask=live_q, other=0.0)
                a_s = tl.load(part_ptr + prow[:, None] * D + d[None, :], mask=live_q[:, None], other=0.0)
                m_new = tl.maximum(m, m_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m - m_safe)
                w = tl.exp(m_s - m_safe)
                acc_l = acc_l * alpha + l_s * w
                acc = acc * alpha[:, None] + a_s * w[:, None]
                m = m_new
            out = acc / acc_l[:, None]
            tl.store(
                out_ptr + rows[:, None] * s_on + h * s_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=live_q[:, None],
            )

    @triton.jit
    def _rope_and_cache(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        k_ptr,
        v_ptr,
        slots_ptr,
        q_ptr,
        s_qkv,
        s_cos,
        s_kslot,
        s_kh,
        s_qn,
        s_qh,
        H: tl.constexpr,
        HKV: tl.constexpr,
        HP: tl.constexpr,
        D: tl.constexpr,
    ):
        n = tl.program_id(0)
        hh = tl.arange(0, HP)
        d = tl.arange(0, D)
        rot = (d + D // 2) % D  # rotate-half partner
        sign = tl.where(d < D // 2, -1.0, 1.0)
        row = qkv_ptr + n.to(tl.int64) * s_qkv
        cos = tl.load(cos_ptr + n.to(tl.int64) * s_cos + d).to(tl.float32)
        sin = tl.load(sin_ptr + n.to(tl.int64) * s_cos + d).to(tl.float32)
        dt = q_ptr.dtype.element_ty
        slot = tl.load(slots_ptr + n).to(tl.int64)
        # x * cos + rotate_half(x) * sin, rounded per op as torch does on 16-bit tensors
        lq = hh < H
        x = tl.load(row + hh[:, None] * D + d[None, :], mask=lq[:, None], other=0.0).to(tl.float32)
        xr = tl.load(row + hh[:, None] * D + rot[None, :], mask=lq[:, None], other=0.0).to(tl.float32)
        y = (x * cos[None, :]).to(dt).to(tl.float32) + (sign[None, :] * xr * sin[None, :]).to(dt).to(
            tl.float32
        )
        tl.store(q_ptr + n.to(tl.int64) * s_qn + hh[:, None] * s_qh + d[None, :], y.to(dt), mask=lq[:, None])
        lk = hh < HKV
        kp = row + H * D
        x = tl.load(kp + hh[:, None] * D + d[None, :], mask=lk[:, None], other=0.0).to(tl.float32)
        xr = tl.load(kp + hh[:, None] * D + rot[None, :], mask=lk[:, None], other=0.0).to(tl.float32)
        y = (x * cos[None, :]).to(dt).to(tl.float32) + (sign[None, :] * xr * sin[None, :]).to(dt).to(
            tl.float32
        )
        tl.store(k_ptr + slot * s_kslot + hh[:, None] * s_kh + d[None, :], y.to(dt), mask=lk[:, None])
        v = tl.load(row + (H + HKV) * D + hh[:, None] * D + d[None, :], mask=lk[:, None], other=0.0)
        tl.store(v_ptr + slot * s_kslot + hh[:, None] * s_kh + d[None, :], v, mask=lk[:, None])


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    q_out: torch.Tensor,
) -> torch.Tensor:
    """One kernel for what follows the q/k/v projection: qkv (N, (H + 2 Hkv) D) -> RoPE'd q into
    ``q_out`` (N, H, D); RoPE'd k and v into ``slots`` (N,) of the (NB, BS, Hkv, D) caches. cos/sin
    (N, [1,] D) in the activation dtype (``fused_model.rope``'s rounding)."""
    N, H, D = q_out.shape
    _, BS, Hkv, _ = k_cache.shape
    cos2, sin2 = cos.reshape(N, D), sin.reshape(N, D)
    if (
        qkv.stride(1) != 1
        or cos2.stride() != sin2.stride()
        or cos2.stride(1) != 1
        or k_cache.stride(3) != 1
        or v_cache.stride() != k_cache.stride()
        or q_out.stride(2) != 1
        or k_cache.stride(0) != BS * k_cache.stride(1)
    ):
        raise ValueError("rope_and_cache needs contiguous rows, caches laid out alike with contiguous blocks")
    _rope_and_cache[(N,)](
        qkv,
        cos2,
        sin2,
        k_cache,
        v_cache,
        slots,
        q_out,
        qkv.stride(0),
        cos2.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        H=H,
        HKV=Hkv,
        HP=triton.next_power_of_2(max(H, Hkv)),
        D=D,
        num_warps=4,
    )
    return q_out


def varlen_block_q(tokens: int) -> int:
    """Rows per query block for a step of ``tokens`` rows: 16 (``tl.dot``'s smallest M) for short
    steps, where a decode row wastes least of its block; 64 for long prompts, where each key tile
    loaded then serves 4x the queries (at 16, a 1k-token prompt's attention took 126 µs a layer)."""
    return 16 if tokens <= 128 else 64


def varlen_splits(tokens: int) -> int:
    """Key-range splits per query block (flash-decoding): a few query blocks over a long cached
    prefix (a prefix hit: 1 block x 12 heads over 1k keys) would otherwise run ~12 programs of 17
    sequential tiles each (30 µs a layer on an H200)."""
    return 8 if tokens <= 128 else 4 if tokens <= 512 else 2


def varlen_scratch_rows(buckets: list[int]) -> int:
    """Rows of partial results the split kernel needs for any of these token buckets."""
    return max(varlen_splits(t) * t for t in buckets)


def query_blocks(chunks: list[tuple[int, int, int]], block_q: int) -> list[tuple[int, int, int, int]]:
    """(flat start row, rows, position of the first row) per sequence, in table-row order ->
    query blocks (row0, rows, sequence index, position of row0), each within one sequence."""
    out = []
    for i, (row, n, pos) in enumerate(chunks):
        for j in range(0, n, block_q):
            out.append((row + j, min(block_q, n - j), i, pos + j))
    return out


def paged_varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qblocks: torch.Tensor,
    tables: torch.Tensor,
    out: torch.Tensor,
    block_q: int,
    splits: int = 1,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (N, H, D) one step's flat queries; caches (NB, BS, Hkv, D) already holding the step's new
    k/v; qblocks (Q, 4) int64 rows of ``query_blocks(..., block_q)`` (padded with zero rows:
    skipped); tables (S, nb) block ids of each sequence -> attention output written into ``out``
    (N, H, D) for the rows the query blocks cover (others untouched). ``splits > 1`` splits each
    block's keys over that many programs, whose fp32 partials go to ``scratch`` = (acc (R, H, D),
    max and sum (R, H, 2)) with R >= splits * N, and a second kernel combines them."""
    N, H, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    if (
        k_cache.stride(3) != 1
        or v_cache.stride() != k_cache.stride()
        or q.stride(2) != 1
        or out.stride(2) != 1
    ):
        raise ValueError("paged_varlen_attention needs contiguous head dims and caches laid out alike")
    if splits > 1 and (scratch is None or scratch[0].shape[0] < splits * N):
        raise ValueError(f"paged_varlen_attention with {splits} splits needs scratch for {splits * N} rows")
    part, ml = scratch if splits > 1 else (out, out)
    grid = (qblocks.shape[0], H)
    _paged_varlen[(*grid, splits)](
        q,
        k_cache,
        v_cache,
        qblocks,
        tables,
        out,
        part,
        ml,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        N,
        D**-0.5,
        N_REP=H // Hkv,
        BS=BS,
        D=D,
        BLOCK_Q=block_q,
        TILE=64,
        SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_q <= 16 else 8,
    )
    if splits > 1:
        _varlen_combine[grid](
            qblocks,
            out,
            part,
            ml,
            out.stride(0),
            out.stride(1),
            N,
            D=D,
            BLOCK_Q=block_q,
            TILE=64,
            SPLITS=splits,
            num_warps=4,
        )
    return out


def decode_splits(programs: int, sms: int = 132) -> int:
    """Key splits per (sequence, head) for a decode batch of ``programs`` (sequence, head) pairs: at
    least ~4 one-warp programs per SM (at batch 1 the 12 programs of a 12-head model each walked
    their whole context alone: 14 µs a layer on an H200, 4 µs split 8 ways), at most 8, a power of
    two; 1 once the batch alone fills the GPU (then the partials' traffic and the combine kernel
    buy nothing: batch 64 at 192 tokens ran 10.6 µs unsplit, 11.0 split in 2)."""
    splits = 1
    while splits < 8 and programs * splits < 4 * sms:
        splits *= 2
    return splits


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    out: torch.Tensor | None = None,
    splits: int | None = None,
    tile: int = 32,
    warps: int = 1,
) -> torch.Tensor:
    """q (B, H, D); caches (NB, BS, Hkv, D) (D contiguous); tables (B, nb) block ids; ctx_lens (B,)
    tokens each query attends to (>= 1); any of them may be strided views (the CUDA graphs pass
    columns of their input buffer) -> (B, H, D). ``splits`` (a power of two; default
    ``decode_splits``) splits each sequence's keys over that many programs, whose fp32 partials a
    second kernel combines; the split count depends on the batch shape only, so a captured graph
    serves any context length. ``tile`` keys a loop step and ``warps`` a program: the defaults are
    the sweep's (``python -m serve.engine.decode_sweep --parts paged``)."""
    B, H, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_decode_attention needs caches with contiguous head dims, laid out alike")
    if q.stride(2) != 1:
        q = q.contiguous()
    # one warp per program, 32 keys a tile (the defaults): on an H200 (bf16, 12 heads of 64) the fastest
    # of 1-8 warps and 16-128 keys at batch 1-64 and 192-1k tokens, or within 10% of it (batch 64:
    # 17.3 -> 10.6 µs against 4 warps and 64 keys)
    if splits is None:
        splits = decode_splits(B * H, _sm_count(q.device))
    if splits & (splits - 1):
        raise ValueError(f"decode splits must be a power of two, got {splits}")
    part = torch.empty(B * H * splits, D, dtype=torch.float32, device=q.device) if splits > 1 else out
    ml = torch.empty(B * H * splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_decode[(B, H, splits)](
        q,
        k_cache,
        v_cache,
        tables,
        ctx_lens,
        out,
        part,
        ml,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        tables.stride(0),
        ctx_lens.stride(0),
        out.stride(0),
        out.stride(1),
        D**-0.5,
        tables.shape[1] * BS,
        H=H,
        N_REP=H // Hkv,
        BS=BS,
        D=D,
        TILE=tile,
        SPLITS=splits,
        num_warps=warps,
    )
    if splits > 1:
        _decode_combine[(B, H)](
            part, ml, out, out.stride(0), out.stride(1), H=H, D=D, SPLITS=splits, num_warps=1
        )
    return out


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter (tests): an H100/H200's count
    return torch.cuda.get_device_properties(device).multi_processor_count
