"""GPU sweeps behind the decode kernels' defaults: ``python -m serve.engine.decode_sweep [--parts ...]``.

* ``paged``: the paged decode-attention kernel's launch configs (key splits x keys per tile x warps)
  per (batch, context) on a ``base``-sized layer (12 heads of 64, bf16, 16-token blocks): the time
  of the config ``paged_decode_attention`` picks and the six fastest, each timed as a CUDA graph of
  20 calls (the combine kernel included when split). The defaults in ``paged_attention`` (one warp,
  32 keys a tile, ``decode_splits``) come from this table on an H200.
* ``gemm``, ``attn``, ``step``: ``triton_decode``'s fused kernels against the torch path and cuBLAS
  (each kernel for the ``base`` shapes at M = 1, 8, 64, a few block configs per GEMM, then a whole
  decode step), over L2-cold weight copies.
"""

from __future__ import annotations

import itertools

import torch

from serve.engine import paged_attention as pa
from serve.engine.triton_decode import (
    _NORM,
    _PLAIN,
    _SWIGLU,
    LinearConfig,
    _launch_linear,
    decode_attention,
    linear_config,
    make_triton_decode_layer,
    norm_linear,
    triton,
)


def _graph_us(fn, reps: int = 50) -> float:
    """µs per call of ``fn`` replayed in a CUDA graph (``fn`` may itself make several calls)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def _copies(weight_bytes: int, total: int = 256 << 20) -> int:
    """How many copies of a weight to cycle through so that they do not all fit in L2 (50 MB on an
    H200), as in a real step, where the layers' weights stream from HBM."""
    return max(2, min(256, -(-total // weight_bytes)))


_BASE = {"d": 768, "H": 12, "D": 64, "F": 2048, "V": 32000, "BS": 16, "eps": 1e-5}  # the ``base`` model


def _candidates(base: LinearConfig, N: int) -> list[LinearConfig]:
    """Block configs the sweep tries besides the heuristic's (same BLOCK_M)."""
    out = []
    for bn in (16, 32, 64, 128):
        for bk in (128, 256):
            for warps, stages in ((4, 3), (4, 4), (8, 4)):
                cfg = LinearConfig(base.block_m, bn, bk, warps, stages)
                if cfg != base and bn * bk <= 16384 and triton.cdiv(N, bn) >= 24:
                    out.append(cfg)
    return out


def sweep(
    layers: int = 12,
    ctx_len: int = 256,
    parts: str = "gemm,attn,step",
    search: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> None:
    """Times each kernel for the ``base`` shapes (d 768, 12 heads of 64, d_ff 2048, vocab 32000) at
    M = 1, 8, 64 against the torch path (same math, eager ops) and cuBLAS alone (``F.linear``), every
    variant captured in a CUDA graph over L2-cold weight copies; tries a few block configs per GEMM;
    then a whole decode step (``layers`` blocks + the LM head) both ways. Prints the tables
    (``parts``: any of gemm, attn, step; ``search=False`` times the heuristic's configs only)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen) * scale

    if "gemm" in parts:
        _sweep_gemms(rnd, search)
    if "attn" in parts:
        _sweep_attention(rnd, gen, ctx_len)
    if "step" in parts:
        _sweep_step(rnd, gen, layers, ctx_len)


def _sweep_gemms(rnd, search: bool) -> None:
    import torch.nn.functional as F

    from serve.engine.fused_model import rms_norm

    d, F_, V, eps = _BASE["d"], _BASE["F"], _BASE["V"], _BASE["eps"]
    print("# GEMMs, µs per call, L2-cold weights")
    print(
        f"{'kernel':<24}{'M':>4}{'torch':>9}{'cuBLAS':>9}{'triton':>9}{'x torch':>9}{'best':>9}  best config"
    )
    gemms = [
        ("norm_linear qkv", _NORM, 3 * d, d, True),
        ("linear_residual o", _PLAIN, d, d, False),
        ("norm_linear gate_up", _NORM, 2 * F_, d, False),
        ("swiglu_linear_res down", _SWIGLU, d, F_, False),
        ("norm_linear lm_head", _NORM, V, d, False),
    ]
    for name, prologue, N, K, has_bias in gemms:
        ws = [rnd(N, K, scale=K**-0.5) for _ in range(_copies(N * K * 2))]
        nw, bias = rnd(K).abs_() + 0.5, (rnd(N) if has_bias else None)
        out_dtype = torch.float32 if N == V else None
        for M in (1, 8, 64):
            x = rnd(M, 2 * K if prologue == _SWIGLU else K)
            res = rnd(M, N) if prologue != _NORM else None

            def torch_call(w, x=x, res=res, prologue=prologue, nw=nw, bias=bias, out_dtype=out_dtype):
                if prologue == _NORM:
                    y = F.linear(rms_norm(x, nw, eps), w, bias)
                    return y if out_dtype is None else y.to(out_dtype)
                if prologue == _PLAIN:
                    return res + F.linear(x, w)
                g, u = x.chunk(2, -1)
                return res + F.linear(F.silu(g) * u, w)

            a_plain = x[:, :K].contiguous()

            def triton_call(w, cfg, x=x, res=res, prologue=prologue, nw=nw, bias=bias, out_dtype=out_dtype):
                return _launch_linear(
                    prologue, x, nw if prologue == _NORM else None, eps, w, bias, res, None, out_dtype, cfg
                )

            def t(call, ws=ws):  # µs per call, cycling through the weight copies
                return _graph_us(lambda: [call(w) for w in ws]) / len(ws)

            t_torch = t(torch_call)
            t_cublas = t(lambda w, a=a_plain: F.linear(a, w))
            base = linear_config(M, N, K)
            t_tri = t(lambda w, base=base: triton_call(w, base))
            best, best_cfg = t_tri, base
            for cfg in _candidates(base, N) if search else ():
                try:
                    us = t(lambda w, cfg=cfg: triton_call(w, cfg))
                except Exception:  # e.g. out of shared memory for this tile / stage count
                    continue
                if us < best:
                    best, best_cfg = us, cfg
            print(
                f"{name:<24}{M:>4}{t_torch:>9.2f}{t_cublas:>9.2f}{t_tri:>9.2f}{t_torch / t_tri:>9.2f}{best:>9.2f}  "
                f"{tuple(best_cfg)}"
            )
        del ws


def _sweep_attention(rnd, gen, ctx_len: int) -> None:
    from serve.engine.fused_model import rope
    from serve.engine.paged_attention import paged_decode_attention

    H, Hkv, D, BS = _BASE["H"], _BASE["H"], _BASE["D"], _BASE["BS"]
    dev = gen.device
    print(f"\n# decode attention (rope + KV write + attention), context {ctx_len}, µs per call")
    print(f"{'B':>4}{'torch+paged':>13}{'triton':>9}{'x':>7}")
    nb = -(-ctx_len // BS)
    for B in (1, 8, 64):
        NB = B * nb + 1
        kc, vc = rnd(NB, BS, Hkv, D), rnd(NB, BS, Hkv, D)
        tables = torch.randperm(NB - 1, device=dev, generator=gen)[: B * nb].view(B, nb)
        ctx = torch.full((B,), ctx_len, device=dev)
        pos = ctx - 1
        slots = tables.gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS
        qkv = rnd(B, (H + 2 * Hkv) * D)
        cos, sin = rnd(B, 1, D), rnd(B, 1, D)

        def ref(qkv=qkv, cos=cos, sin=sin, kc=kc, vc=vc, slots=slots, tables=tables, ctx=ctx, B=B):
            qk = rope(qkv[:, : (H + Hkv) * D].view(B, H + Hkv, D), cos, sin)
            kc.view(-1, Hkv, D).index_copy_(0, slots, qk[:, H:])
            vc.view(-1, Hkv, D).index_copy_(0, slots, qkv[:, (H + Hkv) * D :].view(B, Hkv, D))
            return paged_decode_attention(qk[:, :H], kc, vc, tables, ctx)

        t_ref = _graph_us(ref)
        t_tri = _graph_us(
            lambda qkv=qkv, cos=cos, sin=sin, kc=kc, vc=vc, slots=slots, tables=tables, ctx=ctx: (
                decode_attention(qkv, cos, sin, kc, vc, slots, tables, ctx)
            )
        )
        print(f"{B:>4}{t_ref:>13.2f}{t_tri:>9.2f}{t_ref / t_tri:>7.2f}")


def _sweep_step(rnd, gen, layers: int, ctx_len: int) -> None:
    import torch.nn.functional as F

    from serve.engine.fused_model import make_decode_layer, rms_norm

    d, H, Hkv, D, F_, V, BS, eps = (_BASE[k] for k in ("d", "H", "H", "D", "F", "V", "BS", "eps"))
    dev = gen.device
    nb = -(-ctx_len // BS)
    print(
        f"\n# whole decode step: {layers} layers + final norm + LM head (fp32 logits), context {ctx_len}, µs"
    )
    print(f"{'B':>4}{'torch(paged)':>14}{'triton':>9}{'x':>7}{'max |dlogit|':>14}")
    ws = [
        (
            rnd(d).abs_() + 0.5,
            rnd(3 * d, d, scale=d**-0.5),
            rnd(3 * d),
            rnd(d, d, scale=d**-0.5),
            rnd(d).abs_() + 0.5,
            rnd(2 * F_, d, scale=d**-0.5),
            rnd(d, F_, scale=F_**-0.5),
        )
        for _ in range(layers)
    ]
    norm_w, lm = rnd(d).abs_() + 0.5, rnd(V, d, scale=d**-0.5)
    ref_layer = make_decode_layer(H, Hkv, D, eps, compile=False, paged=True)
    tri_layer = make_triton_decode_layer(H, Hkv, D, eps)
    for B in (1, 8, 64):
        NB = B * nb + 1
        caches = [(rnd(NB, BS, Hkv, D), rnd(NB, BS, Hkv, D)) for _ in range(layers)]
        tables = torch.randperm(NB - 1, device=dev, generator=gen)[: B * nb].view(B, nb)
        ctx = torch.full((B,), ctx_len, device=dev)
        pos = ctx - 1
        slots = tables.gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS
        x0 = rnd(B, d)
        cos, sin = rnd(B, 1, D), rnd(B, 1, D)

        def ref_step(x0=x0, cos=cos, sin=sin, caches=caches, slots=slots, tables=tables, ctx=ctx):
            x = x0
            for w, (kc, vc) in zip(ws, caches, strict=True):
                x = ref_layer(x, cos, sin, w, kc, vc, slots, tables, None, ctx)
            return F.linear(rms_norm(x, norm_w, eps), lm).float()

        def tri_step(x0=x0, cos=cos, sin=sin, caches=caches, slots=slots, tables=tables, ctx=ctx):
            x = x0
            for w, (kc, vc) in zip(ws, caches, strict=True):
                x = tri_layer(x, cos, sin, w, kc, vc, slots, tables, None, ctx)
            return norm_linear(x, norm_w, eps, lm, out_dtype=torch.float32)

        err = (ref_step() - tri_step()).abs().max().item()
        t_ref, t_tri = _graph_us(ref_step), _graph_us(tri_step)
        print(f"{B:>4}{t_ref:>14.1f}{t_tri:>9.1f}{t_ref / t_tri:>7.2f}{err:>14.4f}")


def _paged_us(q, kc, vc, tables, lens, out, splits: int, tile: int, warps: int, calls: int = 20) -> float:
    """µs per call of ``paged_decode_attention`` with this launch config (20 calls a graph)."""

    def run() -> None:
        for _ in range(calls):
            pa.paged_decode_attention(q, kc, vc, tables, lens, out, splits=splits, tile=tile, warps=warps)

    return _graph_us(run, reps=10) / calls


def sweep_paged(
    shapes=((1, 192), (8, 192), (64, 192), (1, 1024), (64, 1024)), H: int = 12, D: int = 64, BS: int = 16
) -> None:
    dtype = torch.bfloat16
    pool = max(b * -(-c // BS) for b, c in shapes) + 8
    kc = torch.randn(pool, BS, H, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    print(f"{'batch':>5} {'ctx':>5} {'KV MB':>6} {'picked µs':>9}  fastest (µs splits/keys-per-tile/warps)")
    for B, ctx in shapes:
        nb = -(-ctx // BS)
        q = torch.randn(B, H, D, device="cuda", dtype=dtype)
        out = torch.empty_like(q)
        tables = torch.stack([torch.randperm(pool, device="cuda")[:nb] for _ in range(B)])
        lens = torch.full((B,), ctx, device="cuda")

        timed = sorted(
            (_paged_us(q, kc, vc, tables, lens, out, s, t, w), s, t, w)
            for s, t, w in itertools.product([1, 2, 4, 8], [16, 32, 64, 128], [1, 2, 4, 8])
        )
        picked = next(
            r[0] for r in timed if r[1:] == (pa.decode_splits(B * H, pa._sm_count(q.device)), 32, 1)
        )
        mb = B * ctx * H * D * 2 * 2 / 1e6
        print(
            f"{B:>5} {ctx:>5} {mb:>6.1f} {picked:>9.2f}  "
            + ", ".join(f"{t:.2f} {s}/{ti}/{w}" for t, s, ti, w in timed[:6]),
            flush=True,
        )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="paged,gemm,attn,step", help="which tables: paged, gemm, attn, step")
    p.add_argument("--layers", type=int, default=12, help="decoder blocks of the whole-step table")
    p.add_argument("--ctx", type=int, default=256, help="context length of every sequence (attn, step)")
    p.add_argument("--no-search", action="store_true", help="time only the heuristic's GEMM block configs")
    args = p.parse_args()
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("the sweep needs a CUDA GPU and Triton")
    with torch.inference_mode():
        if "paged" in args.parts:
            sweep_paged()
        sweep(args.layers, args.ctx, args.parts, not args.no_search)
