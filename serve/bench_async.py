"""Async scheduling on vs off, measured in one process on one engine (the flag toggled between runs).

    python -m serve.bench_async --device cuda --preset base          # one GPU, bf16
    python -m serve.bench_async --device cpu --preset tiny --rounds 1 # runs anywhere (no overlap on a CPU)

Prints, per concurrency, the median output tok/s of ``--rounds`` alternating runs with
``engine.async_scheduling`` off and on (closed loop, greedy, prompt 128 -> 128 tokens, random
weights) and their ratio. On CUDA async scheduling queues each multi-step burst before the last one's
tokens are applied, so the host's bookkeeping overlaps the GPU; on a CPU a burst is computed when it
is queued, so the ratio there only shows the mode costs nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cluster.config.model import preset
from cluster.model import Transformer
from serve.bench import bench_engine, make_engine, workload
from serve.engine import LLMEngine
from serve.engine.engine import resolve_device, resolve_dtype


def compare(engine: LLMEngine, conc: int, rounds: int, prompt_len: int, out_len: int) -> tuple[float, float]:
    """Median tok/s with async scheduling off and on, runs alternating (a noisy machine hits both)."""
    runs: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for on in (False, True):
            engine.async_scheduling = on
            work = workload(2 * conc, prompt_len, out_len, engine.vocab_size, 7 * conc + r, False)
            runs[on].append(bench_engine(engine, work, conc).tok_s)
    return statistics.median(runs[False]), statistics.median(runs[True])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.bench_async", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--preset", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[64, 8, 1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    maxc = max(args.concurrency)
    mcfg = preset(args.preset, max_seq_len=max(2048, 2 * (args.prompt_len + args.output_len)))
    model = Transformer(mcfg).init_weights(0)
    args.device, args.dtype, args.scheduler_steps = device.type, str(dtype).removeprefix("torch."), None
    engine = make_engine(
        model, args, maxc, max(2048, maxc), 2 * maxc * (args.prompt_len + args.output_len) + 256
    )
    bench_engine(engine, workload(min(4, maxc), args.prompt_len, 4, mcfg.vocab_size, 99, False), min(4, maxc))
    print(
        f"# serve.bench_async: preset {args.preset}, {dtype} on {device}, prompt {args.prompt_len} -> "
        f"{args.output_len} tokens, median of {args.rounds} alternating runs",
        flush=True,
    )
    print("| concurrency | async off tok/s | async on tok/s | on / off |")
    print("|---:|---:|---:|---:|")
    for c in args.concurrency:
        off, on = compare(engine, c, args.rounds, args.prompt_len, args.output_len)
        print(f"| {c} | {off:,.0f} | {on:,.0f} | {on / off:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        raise SystemExit(main())
