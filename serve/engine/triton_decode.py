"""Fused Triton kernels for the small-batch decode step: five launches per decoder block.

At decode batch sizes (1..64 rows) a ``base``-model block is ~16 short kernels (norm pieces, cuBLAS
GEMMs, RoPE, KV writes, attention, residual adds), each a few µs, while its weights take ~3.5 µs
to stream from HBM. These kernels fold the cheap ops into the prologue or epilogue of the
bandwidth-bound ones, so a block is:

1. ``norm_linear``: RMSNorm of x, then ``@ qkv_w.T + qkv_b`` (the norm in the GEMM's prologue);
2. ``decode_attention``: RoPE of q and k, the new k/v written to the paged pool, attention over it;
3. ``linear_residual``: ``x + attn @ o_w.T``;
4. ``norm_linear``: RMSNorm, then ``@ gate_up_w.T``;
5. ``swiglu_linear_residual``: ``x + (silu(g) * u) @ down_w.T`` (the activation in the prologue).

Every kernel rounds where torch eager rounds (each op on bf16 tensors rounds to bf16), so results
match ``fused_model``'s functions to a few bf16 ulps. The GEMMs are ``tl.dot`` over row tiles of
16/32/64 (masked padding rows) and weight tiles small enough that the grid covers the GPU's SMs;
there is no split-K (an fp32 atomic reduction is not bitwise deterministic). Lengths and the
per-step strides are not specialized, so one compiled kernel per block size serves every batch /
block-count bucket of the CUDA graphs (``serve.engine.cuda_graphs``); nothing autotunes at capture.

``python -m serve.engine.decode_sweep --parts gemm,attn,step`` (on a GPU) times each kernel and a
whole 12-layer step against the torch path and prints tables. Measured on an H200 (``base``, bf16, the
heuristic configs): the GEMMs are slower than cuBLAS (qkv 6.0 vs 4.3 µs at M = 1, SwiGLU down 23 vs
7.4, LM head 18 vs 15), the fused RoPE + KV write + attention faster (14 vs 23 µs at B = 1), the
whole step no faster than the engine's compiled graphs; so the engine uses these kernels only on
request (``requested``). Next: the sweep's config search, split-K for the N = 768 products.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    from serve.engine.paged_attention import kv_offsets
except ImportError:  # CPU-only installs
    triton = None

# prologue of the fused linear kernel
_PLAIN, _NORM, _SWIGLU = 0, 1, 2
_SMS = 132  # H200 streaming multiprocessors: the weight-tile grid aims to cover them
# Triton's CPU interpreter (3.9) gets bf16 wrong twice: a dot multiplies the operands' raw uint16 bits,
# and fp32 -> bf16 casts truncate (the GPU rounds to nearest even). Under it, bf16 dot tiles are widened
# to fp32 first (exact: bf16 products are exact in fp32, accumulated in fp32 either way) and casts to
# bf16 round in integer arithmetic (``_to``), so CPU tests check the same numbers as the GPU computes.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def requested() -> bool:
    """The engine captures these kernels' variant of its CUDA graphs only when asked for
    (``RETORT_GRAPH_VARIANT=triton``): on an H200 they lost to cuBLAS + Inductor at every decode
    batch (the whole ``base`` step: 686 µs vs the engine's chosen graph's 658 at batch 1, 1,588 vs 824
    at 64; per GEMM, e.g. the SwiGLU down projection 23 µs vs cuBLAS's 7)."""
    return os.environ.get("RETORT_GRAPH_VARIANT") == "triton"


def usable(fused, device: torch.device) -> bool:
    """The engine may capture this variant for ``fused`` (a ``FusedModel``): requested, Triton on
    CUDA, and plain weights everywhere (every layer's projections and an unbiased LM head)."""
    lm = fused.model.lm_head
    return (
        requested()
        and available(device, fused.head_dim)
        and type(lm) is torch.nn.Linear
        and lm.bias is None
        and all(fused.decode_weights(i) is not None for i in range(len(fused.layers)))
    )


def logits(fused, x: torch.Tensor) -> torch.Tensor:
    """``fused.logits(x)`` (final norm, LM head, fp32) in one ``norm_linear`` launch."""
    m = fused.model
    return norm_linear(x, m.model.norm.weight, m.model.norm.eps, m.lm_head.weight, out_dtype=torch.float32)


def available(device: torch.device, head_dim: int) -> bool:
    """Triton is importable, the device is CUDA and the head size a power of two (``tl.arange``)."""
    return triton is not None and device.type == "cuda" and head_dim & (head_dim - 1) == 0


class LinearConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def linear_config(M: int, N: int, K: int) -> LinearConfig:
    """Block sizes for an (M, K) x (K, N) product at decode sizes (to be refined by ``sweep``):

    * BLOCK_M: the smallest of 16/32/64 that holds all rows (``tl.dot`` needs >= 16; the padding
      rows are masked, the weight tile is read once whatever M is);
    * BLOCK_N: the largest power of two in [16, 128] that still gives >= ~132 programs over N
      (N=768 -> 16 (48 programs), 2304 -> 16 (144), 4096 -> 16 (256), 32000 -> 128 (250));
    * BLOCK_K: 256 for thin tiles (a 16 x 256 bf16 weight tile is 8 KB per pipeline stage), else 128.
    """
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n = 16
    while block_n < 128 and triton.cdiv(N, block_n * 2) >= _SMS:
        block_n *= 2
    block_k = 256 if block_m <= 32 and block_n <= 32 else 128
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    return LinearConfig(block_m, block_n, block_k)


if triton is not None:

    @triton.jit
    def _to(x, dt: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        """fp32 ``x`` rounded to ``dt`` (round to nearest even, as torch casts)."""
        if (
            EMULATE_RTNE and dt == tl.bfloat16
        ):  # the interpreter only: add half an ulp (ties to even), truncate
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dt)

    # M changes with the batch bucket: not specialized (one kernel for every bucket of a block size);
    # the strides are those of the engine's fixed buffers, specialized so loads vectorize
    @triton.jit(do_not_specialize=["M"])
    def _fused_linear(
        x_ptr,
        nw_ptr,
        w_ptr,
        b_ptr,
        r_ptr,
        o_ptr,
        M,
        N,
        K,
        s_xm,
        s_wn,
        s_rm,
        s_om,
        eps,
        PROLOGUE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr,
        EMU: tl.constexpr,
    ):
        """o = [r +] round(prologue(x) @ w.T [+ b]); x (M, K) ((M, 2K) for SwiGLU: gate | up)."""
        dt = x_ptr.dtype.element_ty
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + rm[:, None].to(tl.int64) * s_xm
        w_rows = w_ptr + rn[:, None].to(tl.int64) * s_wn
        if PROLOGUE == 1:  # RMSNorm statistics of the row tile (x is tiny: every program recomputes them)
            ss = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                xk = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0).to(
                    tl.float32
                )
                ss += tl.sum(xk * xk, axis=1)
            rstd = 1.0 / tl.sqrt_rn(ss / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            xmask = m_ok[:, None] & k_ok[None, :]
            if PROLOGUE == 2:  # silu(g) * u, rounded as torch rounds: silu -> dt, product -> dt
                g = tl.load(x_rows + kk[None, :], mask=xmask, other=0.0).to(tl.float32)
                u = tl.load(x_rows + K + kk[None, :], mask=xmask, other=0.0).to(tl.float32)
                a = _to(g / (1.0 + tl.exp(-g)), dt, EMU).to(tl.float32)
                a = _to(a * u, dt, EMU)
            else:
                a = tl.load(x_rows + kk[None, :], mask=xmask, other=0.0)
                if PROLOGUE == 1:  # weight * (x * rstd).to(dt), the product rounded to dt
                    xn = _to(a.to(tl.float32) * rstd[:, None], dt, EMU).to(tl.float32)
                    nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                    a = _to(xn * nw[None, :], dt, EMU)
            wt = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(wt), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = _to(acc, dt, EMU)  # the matmul result in the activation dtype, as F.linear returns it
        omask = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            res = tl.load(r_ptr + rm[:, None].to(tl.int64) * s_rm + rn[None, :], mask=omask, other=0.0)
            y = _to(res.to(tl.float32) + y.to(tl.float32), dt, EMU)
        o_ptrs = o_ptr + rm[:, None].to(tl.int64) * s_om + rn[None, :]
        tl.store(o_ptrs, y.to(o_ptr.dtype.element_ty), mask=omask)

    # slots / tables / ctx are columns of the graphs' input buffer (tables' row stride is the bucket's
    # block count) and max_ctx changes with the bucket: not specialized. The cache strides are fixed.
    @triton.jit(do_not_specialize=["s_slot", "s_tb", "s_ctx", "max_ctx"])
    def _decode_attention(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        k_ptr,
        v_ptr,
        slots_ptr,
        tables_ptr,
        ctx_ptr,
        out_ptr,
        s_qkv,
        s_cos,
        s_sin,
        s_kblk,
        s_ktok,
        s_kh,
        s_slot,
        s_tb,
        s_ctx,
        s_ob,
        s_oh,
        scale,
        max_ctx,
        H: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        R_PAD: tl.constexpr,
        BS: tl.constexpr,
        D: tl.constexpr,
        TILE: tl.constexpr,
        EMU: tl.constexpr,
    ):
        """One program per (sequence, kv head): RoPE, KV write, attention of its N_REP query heads."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        dt = qkv_ptr.dtype.element_ty
        cdt = k_ptr.dtype.element_ty
        d = tl.arange(0, D)
        rot = (d + D // 2) % D  # rotate-half: out[d] = -x[d + D/2] (first half), x[d - D/2] (second)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * s_cos + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * s_sin + d).to(tl.float32)
        row = qkv_ptr + b.to(tl.int64) * s_qkv

        # the new token's k (roped) and v, rounded to the cache dtype as the pool stores them
        kx = tl.load(row + (H + kvh) * D + d).to(tl.float32)
        kr = tl.load(row + (H + kvh) * D + rot).to(tl.float32) * sign
        k_new = _to(_to(kx * cos, dt, EMU).to(tl.float32) + _to(kr * sin, dt, EMU).to(tl.float32), dt, EMU)
        k_new = _to(k_new.to(tl.float32), cdt, EMU)
        v_new = _to(tl.load(row + (H + HKV + kvh) * D + d).to(tl.float32), cdt, EMU)
        slot = tl.load(slots_ptr + b * s_slot)
        dst = (slot // BS) * s_kblk + (slot % BS) * s_ktok + kvh * s_kh + d
        tl.store(k_ptr + dst, k_new)  # the only program that writes this kv head's slot
        tl.store(v_ptr + dst, v_new)

        # the N_REP query heads sharing this kv head (padded to a power of two, masked), roped
        r = tl.arange(0, R_PAD)
        r_ok = r < N_REP
        q_off = (kvh * N_REP + r)[:, None] * D
        qx = tl.load(row + q_off + d[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)
        qr = tl.load(row + q_off + rot[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32) * sign[None, :]
        q = _to(qx * cos[None, :], dt, EMU).to(tl.float32) + _to(qr * sin[None, :], dt, EMU).to(tl.float32)
        q = _to(q, dt, EMU).to(tl.float32) * scale  # (R_PAD, D)

        # online softmax, started from the new token (held in registers: cache positions [0, ctx - 1) only)
        kf = k_new.to(tl.float32)
        m = tl.sum(q * kf[None, :], axis=1)  # (R_PAD,)
        acc_l = tl.full([R_PAD], 1.0, tl.float32)
        acc = tl.zeros([R_PAD, D], tl.float32) + v_new.to(tl.float32)[None, :]
        n_old = tl.minimum(tl.load(ctx_ptr + b * s_ctx), max_ctx) - 1  # never past the block table
        t = tl.arange(0, TILE)
        for start in range(0, n_old, TILE):
            pos = start + t
            live = pos < n_old
            off = kv_offsets(tables_ptr + b * s_tb, pos, live, BS, s_kblk, s_ktok, kvh * s_kh)
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (R_PAD, TILE)
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
            acc_l = acc_l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / acc_l[:, None]
        o_ptrs = out_ptr + b * s_ob + (kvh * N_REP + r)[:, None] * s_oh + d[None, :]
        tl.store(o_ptrs, _to(out, out_ptr.dtype.element_ty, EMU), mask=r_ok[:, None])


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _launch_linear(
    prologue: int,
    x: torch.Tensor,
    norm_w: torch.Tensor | None,
    eps: float,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    res: torch.Tensor | None,
    out: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    cfg: LinearConfig | None = None,
) -> torch.Tensor:
    name = ("linear_residual", "norm_linear", "swiglu_linear_residual")[prologue]
    _need(
        x.dim() == 2 and w.dim() == 2,
        f"{name}: x and w must be 2-D, got {tuple(x.shape)} and {tuple(w.shape)}",
    )
    M, Kx = x.shape
    N, K = w.shape
    _need(
        Kx == (2 * K if prologue == _SWIGLU else K),
        f"{name}: x {tuple(x.shape)} does not match the weight {tuple(w.shape)}",
    )
    _need(x.dtype == w.dtype, f"{name}: x is {x.dtype} but the weight is {w.dtype}")
    _need(x.stride(1) == 1 and w.stride(1) == 1, f"{name}: x and w need a contiguous last dimension")
    if norm_w is not None:
        _need(
            norm_w.shape == (K,) and norm_w.is_contiguous(), f"{name}: norm weight must be ({K},) contiguous"
        )
    if bias is not None:
        _need(bias.shape == (N,) and bias.is_contiguous(), f"{name}: bias must be ({N},) contiguous")
    if res is not None:
        _need(
            res.shape == (M, N) and res.dtype == x.dtype and res.stride(1) == 1,
            f"{name}: res must be ({M}, {N}) {x.dtype} with a contiguous last dimension",
        )
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    _need(
        out.shape == (M, N) and out.stride(1) == 1,
        f"{name}: out must be ({M}, {N}) with a contiguous last dimension",
    )
    cfg = cfg or linear_config(M, N, K)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))
    _fused_linear[grid](
        x,
        x if norm_w is None else norm_w,
        w,
        x if bias is None else bias,
        x if res is None else res,
        out,
        M,
        N,
        K,
        x.stride(0),
        w.stride(0),
        0 if res is None else res.stride(0),
        out.stride(0),
        float(eps),
        PROLOGUE=prologue,
        HAS_BIAS=bias is not None,
        HAS_RES=res is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        PRECISION="ieee"
        if x.dtype == torch.float32
        else "tf32",  # fp32 as F.linear (no TF32); 16-bit: unused
        DOT_F32=_INTERPRETED and x.dtype == torch.bfloat16,
        EMU=_INTERPRETED,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def norm_linear(
    x: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.linear(fused_model.rms_norm(x, norm_w, eps), w, bias)`` in one kernel: x (M, K), w (N, K)
    -> (M, N) rounded to x.dtype, then cast to ``out_dtype`` (e.g. fp32 logits) when given."""
    return _launch_linear(_NORM, x, norm_w, eps, w, bias, None, out, out_dtype)


def linear_residual(
    a: torch.Tensor, w: torch.Tensor, res: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``res + F.linear(a, w)``: a (M, K), w (N, K), res (M, N); ``out`` may be ``res`` itself."""
    return _launch_linear(_PLAIN, a, None, 0.0, w, None, res, out, None)


def swiglu_linear_residual(
    gu: torch.Tensor, w: torch.Tensor, res: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``res + F.linear(F.silu(g) * u, w)`` with ``g, u = gu.chunk(2, -1)``: gu (M, 2F), w (N, F),
    res (M, N); the activation is computed tile by tile in the matmul (no (M, F) intermediate)."""
    return _launch_linear(_SWIGLU, gu, None, 0.0, w, None, res, out, None)


def _attention_tile(r_pad: int, d: int) -> int:
    """Tokens per step: the (R_PAD, TILE, D) fp32 score product stays at <= 4096 elements (64 x 64 for MHA)."""
    return max(16, min(64, 4096 // (r_pad * d)))


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    ctx: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence: qkv (B, (H + 2 Hkv) D) (q heads, k heads, v heads); cos/sin (B, D)
    or (B, 1, D); caches (NB, BS, Hkv, D); slots (B,) flat slot of the new token; tables (B, nb)
    block ids; ctx (B,) tokens attended including the new one (at position ctx - 1). Ropes q and k
    (``fused_model.rope``), writes k and v to ``slots`` of the caches and returns the attention
    output (B, H, D). Any of the index tensors may be strided views."""
    _need(
        k_cache.dim() == 4
        and v_cache.shape == k_cache.shape
        and v_cache.stride() == k_cache.stride()
        and k_cache.stride(3) == 1,
        "decode_attention: caches must be (NB, BS, Hkv, D) alike, head dim contiguous",
    )
    _, BS, Hkv, D = k_cache.shape
    _need(D & (D - 1) == 0, f"decode_attention: head_dim {D} is not a power of two")
    _need(
        qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] % D == 0 and qkv.shape[1] // D > 2 * Hkv,
        f"decode_attention: qkv {tuple(qkv.shape)} is not (B, (H + 2 * {Hkv}) * {D}) with a contiguous last dim",
    )
    B = qkv.shape[0]
    H = qkv.shape[1] // D - 2 * Hkv
    _need(H % Hkv == 0, f"decode_attention: {H} query heads do not divide into {Hkv} kv heads")
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    _need(
        cos2.shape == (B, D) and sin2.shape == (B, D) and cos2.stride(1) == 1 and sin2.stride(1) == 1,
        f"decode_attention: cos/sin must be ({B}, [1,] {D}) with a contiguous last dim",
    )
    _need(
        slots.shape == (B,) and ctx.shape == (B,) and tables.dim() == 2 and tables.shape[0] == B,
        f"decode_attention: slots and ctx must be ({B},), tables ({B}, nb)",
    )
    if out is None:
        out = torch.empty(B, H, D, dtype=qkv.dtype, device=qkv.device)
    _need(out.shape == (B, H, D) and out.stride(2) == 1, f"decode_attention: out must be ({B}, {H}, {D})")
    n_rep = H // Hkv
    r_pad = triton.next_power_of_2(n_rep)
    _decode_attention[(B, Hkv)](
        qkv,
        cos2,
        sin2,
        k_cache,
        v_cache,
        slots,
        tables,
        ctx,
        out,
        qkv.stride(0),
        cos2.stride(0),
        sin2.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        slots.stride(0),
        tables.stride(0),
        ctx.stride(0),
        out.stride(0),
        out.stride(1),
        D**-0.5,
        tables.shape[1] * BS,
        H=H,
        HKV=Hkv,
        N_REP=n_rep,
        R_PAD=r_pad,
        BS=BS,
        D=D,
        TILE=_attention_tile(r_pad, D),
        EMU=_INTERPRETED,
        num_warps=4,
    )
    return out


def make_triton_decode_layer(n_heads: int, n_kv_heads: int, head_dim: int, eps: float):
    """``layer(x, cos, sin, w, k_cache, v_cache, slots, tables, mask, ctx) -> x``: the same function as
    ``fused_model.make_decode_layer``'s (w = (ln1, qkv_w, qkv_b, o_w, ln2, gate_up_w, down_w); the
    new k/v land in ``slots``; ``ctx`` (B,) context lengths; ``mask`` is ignored), in five launches.
    ``x`` is not modified; per call four buffers are allocated (qkv, attention out, x, gate|up)."""
    H, D = n_heads, head_dim
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")

    def layer(x, cos, sin, w, k_cache, v_cache, slots, tables, mask, ctx):
        ln1, qkv_w, qkv_b, o_w, ln2, gu_w, down_w = w
        qkv = norm_linear(x, ln1, eps, qkv_w, qkv_b)
        attn = decode_attention(qkv, cos, sin, k_cache, v_cache, slots, tables, ctx)
        x = linear_residual(attn.view(x.shape[0], H * D), o_w, x)
        gu = norm_linear(x, ln2, eps, gu_w)
        return swiglu_linear_residual(gu, down_w, x, out=x)  # x is this layer's own buffer now

    return layer
