"""Sweep the paged decode-attention kernel's launch configs on a GPU: key splits x keys per tile x warps.

``python -m serve.engine.decode_sweep`` prints, per (batch, context), the time of the config
``paged_decode_attention`` picks and the six fastest (each timed as a CUDA graph of 20 calls, the
combine kernel included when split), on a ``base``-sized layer (12 heads of 64, bf16, 16-token
blocks). The defaults in ``paged_attention`` (one warp, 32 keys a tile, ``decode_splits``) come from
this table on an H200.
"""

from __future__ import annotations

import itertools

import torch

from serve.engine import paged_attention as pa


def time_config(kc, vc, q, tables, ctx, splits: int, tile: int, warps: int, calls: int = 20) -> float:
    """µs per call of the decode kernel (+ combine) with this config, replayed as one CUDA graph."""
    B, H, D = q.shape
    BS = kc.shape[1]
    out = torch.empty_like(q)
    part = torch.empty(B * H * splits, D, device=q.device)
    ml = torch.empty(B * H * splits, 2, device=q.device)

    def call():
        pa._paged_decode[(B, H, splits)](
            q,
            kc,
            vc,
            tables,
            ctx,
            out,
            part,
            ml,
            q.stride(0),
            q.stride(1),
            kc.stride(0),
            kc.stride(1),
            kc.stride(2),
            tables.stride(0),
            ctx.stride(0),
            out.stride(0),
            out.stride(1),
            D**-0.5,
            tables.shape[1] * BS,
            H=H,
            N_REP=H // kc.shape[2],
            BS=BS,
            D=D,
            TILE=tile,
            SPLITS=splits,
            num_warps=warps,
        )
        if splits > 1:
            pa._decode_combine[(B, H)](
                part, ml, out, out.stride(0), out.stride(1), H=H, D=D, SPLITS=splits, num_warps=1
            )

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * calls)


def sweep(
    shapes=((1, 192), (8, 192), (64, 192), (1, 1024), (64, 1024)), H: int = 12, D: int = 64, BS: int = 16
):
    dtype = torch.bfloat16
    pool = max(b * -(-c // BS) for b, c in shapes) + 8
    kc = torch.randn(pool, BS, H, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    print(f"{'batch':>5} {'ctx':>5} {'KV MB':>6} {'picked µs':>9}  fastest (µs splits/keys-per-tile/warps)")
    for B, ctx in shapes:
        nb = -(-ctx // BS)
        q = torch.randn(B, H, D, device="cuda", dtype=dtype)
        tables = torch.stack([torch.randperm(pool, device="cuda")[:nb] for _ in range(B)])
        lens = torch.full((B,), ctx, device="cuda")
        timed = sorted(
            (time_config(kc, vc, q, tables, lens, s, t, w), s, t, w)
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
    if not torch.cuda.is_available() or pa.triton is None:
        raise SystemExit("the sweep needs a CUDA GPU and Triton")
    sweep()
