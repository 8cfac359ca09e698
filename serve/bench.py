"""Engine benchmark: our engine vs ``transformers`` ``generate`` on the same model and prompts.

    python -m serve.bench --device cpu --preset small --quick
    python -m serve.bench --device cpu --preset small --quick --threads 1 --workload mixed
    python -m serve.bench --device cuda --preset base            # one GPU, bf16

Prints (markdown): output tok/s at each concurrency, TTFT and TPOT p50/p99, and the ratio of our
throughput to HF's default-cache and static-cache ``generate``; TTFT with a 1k-token shared
prefix cached vs not; the time per output token at batch 1 and, on CUDA, one decode step's GPU time;
the throughput the workload's matmuls alone allow (on a CPU a ceiling for any engine, which bounds
the ratio to HF: its matmuls are the same) and, on CUDA, the HBM roofline of a decode step. Random weights (speed does not depend on them). Every number in a ratio is measured in the same run. "CPU ms/token" is this process's CPU
time per output token: on a shared, oversubscribed CPU it is the steadier comparison.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from cluster.config.engine import EngineConfig
from cluster.config.model import preset
from cluster.model import Transformer
from serve.engine import LLMEngine, SamplingParams


@dataclass
class Row:
    system: str
    concurrency: int
    tok_s: float
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    cpu_ms_per_token: float = float(
        "nan"
    )  # this process's CPU time per output token (robust to a busy machine)

    def pct(self, xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        s = sorted(xs)
        return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# -- our engine ---------------------------------------------------------------------------------
def make_engine(model: Transformer, args, max_seqs: int, budget: int, blocks_tokens: int) -> LLMEngine:
    cfg = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        num_blocks=blocks_tokens // 16 + max_seqs + 8,
        max_model_len=model.cfg.max_seq_len,
        **({} if args.scheduler_steps is None else {"num_scheduler_steps": args.scheduler_steps}),
    )
    return LLMEngine(model, cfg)


Work = list[tuple[list[int], int]]  # (prompt, output length) per request


def workload(n: int, prompt_len: int, out_len: int, vocab: int, seed: int, mixed: bool) -> Work:
    """``n`` requests: all ``prompt_len -> out_len`` (fixed), or lengths uniform in
    [1/4, 7/4] of those (mixed: same means, what real traffic looks like)."""
    if not mixed:
        return [(p, out_len) for p in prompts_for(n, prompt_len, vocab, seed)]
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(max(1, prompt_len // 4), prompt_len * 7 // 4 + 1, (n,), generator=g).tolist()
    olens = torch.randint(max(2, out_len // 4), out_len * 7 // 4 + 1, (n,), generator=g).tolist()
    return [
        (torch.randint(0, vocab, (pl,), generator=g).tolist(), ol)
        for pl, ol in zip(plens, olens, strict=True)
    ]


def bench_engine(engine: LLMEngine, work: Work, conc: int) -> Row:
    """Closed loop: ``conc`` requests in flight until all of ``work`` is done."""
    todo = list(enumerate(work))
    start: dict[str, float] = {}
    first: dict[str, float] = {}
    want: dict[str, int] = {}
    ttft, tpot = [], []
    n_out = 0
    t0, c0 = time.perf_counter(), time.process_time()
    live = 0
    while todo or live:
        while todo and live < conc:
            i, (p, n) = todo.pop(0)
            rid = f"b{i}-{time.monotonic_ns()}"
            start[rid], want[rid] = time.perf_counter(), n
            engine.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            live += 1
        for o in engine.step():
            now = time.perf_counter()
            n_out += len(o.new_token_ids)
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = now
            if o.finished:
                live -= 1
                ttft.append((first[o.request_id] - start[o.request_id]) * 1e3)
                tpot.append((now - first[o.request_id]) * 1e3 / max(1, want[o.request_id] - 1))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return Row("retort engine", conc, n_out / wall, ttft, tpot, cpu * 1e3 / max(1, n_out))


def decode_step_us(engine: LLMEngine, prompt: list[int], steps: int) -> tuple[float, float]:
    """Wall and CPU time (µs) per output token of a single running sequence in steady decode (with
    multi-step decoding one ``step()`` yields several tokens: the time is per token, not per call)."""
    engine.add_request(
        "decode-probe", prompt, SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    )
    engine.step()  # prefill
    engine.step()
    n = 0
    t, c = time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        n += sum(len(o.new_token_ids) for o in engine.step())
    return (time.perf_counter() - t) * 1e6 / n, (time.process_time() - c) * 1e6 / n


def graph_replay_us(engine: LLMEngine, batch: int, ctx: int, reps: int = 200) -> float | None:
    """GPU time (µs) of one captured decode step of ``batch`` real sequences at context ``ctx``: the
    device-side floor of a step, without any host work. (The graph advances its own inputs; they are
    restored before each replay, a 2 µs copy included in the time.)"""
    g = engine.runner.graphs
    if g is None or batch > g.batch_sizes[-1]:
        return None
    prompts = prompts_for(batch, ctx - 1, engine.vocab_size, 5)
    ids = [f"replay-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    while True:  # prefill until each sequence has its first token (not yet computed)
        engine.step()
        seqs = [engine._seqs.get(r) for r in ids]
        if any(s is None for s in seqs):  # one finished before the last was prefilled: no steady batch
            for r in ids:
                engine.abort(r)
            engine.step()
            return None
        if all(s.output_token_ids for s in seqs):
            break
    for s in seqs:  # the block of the position this step writes (the scheduler's job in a real step)
        engine.kv.allocate(s, 1)
    with torch.inference_mode():
        engine.runner._graph_decode(seqs)  # fills the graph's inputs for this batch
        saved = g.inputs.clone()
        graph = g.graphs[
            (
                g.batch_sizes[bisect.bisect_left(g.batch_sizes, batch)],
                g.block_counts[bisect.bisect_left(g.block_counts, -(-ctx // engine.kv.block_size))],
            )
        ][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(reps + 10):
            if i == 10:
                start.record()
            g.inputs.copy_(saved)
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    for r in ids:
        engine.abort(r)
    engine.step()
    return start.elapsed_time(end) * 1e3 / reps


def prefix_ttft_ms(engine: LLMEngine, vocab: int, prefix_len: int, reps: int) -> tuple[float, float]:
    """Median TTFT (ms) of a prefix_len + 16 prompt: prefix never seen (miss) vs cached (hit)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    miss, hit = [], []
    for r in range(reps):
        prefix = prompts_for(1, prefix_len, vocab, seed=1000 + r)[0]
        suffixes = prompts_for(2, 16, vocab, seed=2000 + r)
        miss.append(engine.generate([prefix + suffixes[0]], params, prefix="miss")[0].ttft_s * 1e3)
        c = engine.generate([prefix + suffixes[1]], params, prefix="hit")[0]
        assert c.num_cached_tokens >= prefix_len - 16, c.num_cached_tokens
        hit.append(c.ttft_s * 1e3)
    return statistics.median(miss), statistics.median(hit)


# -- transformers -------------------------------------------------------------------------------
def bench_hf(hf, work: Work, conc: int, static: bool, device: torch.device) -> Row:
    """Static batching with ``generate``: batches of ``conc`` requests, prompts left-padded, each
    batch runs to its longest output (greedy, no early stop); only requested tokens count."""
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
    ttft, tpot, n_out = [], [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    probe_wall = probe_cpu = 0.0
    for b in range(0, len(work), conc):
        batch = work[b : b + conc]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        n_new = max(n for _, n in batch)
        with torch.inference_mode():
            t, c = time.perf_counter(), time.process_time()
            hf.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **kw)
            _sync(device)
            first = time.perf_counter() - t
            probe_wall, probe_cpu = probe_wall + first, probe_cpu + time.process_time() - c
            t = time.perf_counter()
            hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            _sync(device)
            total = time.perf_counter() - t
        n_out += sum(n for _, n in batch)
        ttft += [first * 1e3] * len(batch)
        tpot += [max(total - first, 0.0) * 1e3 / max(1, n_new - 1)] * len(batch)
    # the separate TTFT probes are not part of the throughput: subtract them
    wall, cpu = time.perf_counter() - t0 - probe_wall, time.process_time() - c0 - probe_cpu
    name = "HF static cache" if static else "HF default cache"
    return Row(name, conc, n_out / max(1e-9, wall), ttft, tpot, cpu * 1e3 / max(1, n_out))


# -- report -------------------------------------------------------------------------------------
def matmul_ceiling_tok_s(
    model: Transformer,
    conc: int,
    prompt_len: int,
    out_len: int,
    device: torch.device,
    dtype: torch.dtype,
    reps: int = 5,
) -> float:
    """Output tok/s of one wave of ``conc`` requests (``prompt_len -> out_len``) if only its matmuls
    cost time: the prefill's ``conc × prompt_len`` rows through each layer's four projections (q/k/v
    and gate/up fused, as the engine runs them), ``conc`` rows through the LM head, then
    ``out_len - 1`` decode steps of ``conc`` rows through all of them — no attention, norms,
    sampling or host work (on CUDA, replayed as one CUDA graph). Where the matmuls are compute- or
    bandwidth-bound (a CPU) this bounds any engine at this dtype, HF's ``generate`` included: their
    matmuls are the same; on a GPU, where a small step is latency-bound, it bounds engines that run
    one kernel per matmul."""
    from serve.engine.fused_model import FusedModel

    # the engine's own fused weights (q/k/v and gate/up concatenated)
    weights = [lw_w[0] for lw in FusedModel(model, 1).layers for lw_w in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    weights = [w.detach().to(device, dtype).contiguous() for w in weights]
    head = model.lm_head.weight.detach().to(device, dtype)

    def run(rows: int) -> float:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=dtype) for w in weights}
        x_head = torch.randn(conc, head.shape[1], device=device, dtype=dtype)

        def matmuls() -> None:
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            torch.nn.functional.linear(x_head, head)

        times = []
        with torch.inference_mode():
            call = matmuls
            if device.type == "cuda":  # one graph: the GPU's time, not Python's launches
                matmuls()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    matmuls()
                call = graph.replay
            for _ in range(reps + 1):
                _sync(device)
                t = time.perf_counter()
                call()
                _sync(device)
                times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    return conc * out_len / (run(conc * prompt_len) + (out_len - 1) * run(conc))


def hbm_roofline_tok_s(
    model: Transformer, conc: int, ctx: int, device: torch.device, dtype: torch.dtype
) -> float:
    """Decode tok/s of ``conc`` sequences at context ``ctx`` if every step only read, at this GPU's
    measured copy bandwidth, the bytes it must: every weight but the embedding table, and each
    sequence's K/V. No engine can pass it (prefill, compute and launches only add to it)."""
    cfg = model.cfg
    weight_bytes = (
        (model.num_params() - model.model.embed_tokens.weight.numel()) * torch.finfo(dtype).bits // 8
    )
    kv_bytes = conc * ctx * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.dim_head * torch.finfo(dtype).bits // 8
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB, well past L2
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    _sync(device)
    bandwidth = 2 * 10 * src.numel() / (time.perf_counter() - t)  # bytes read + written per second
    del src, dst
    return conc * bandwidth / (weight_bytes + kv_bytes)


def table(rows: list[Row]) -> str:
    base = {(r.system, r.concurrency): r.tok_s for r in rows}
    cpu = {(r.system, r.concurrency): r.cpu_ms_per_token for r in rows}
    lines = [
        "| system | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | × HF default | × HF static "
        "| CPU ms/token | × HF default (CPU time) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = base.get(("HF default cache", r.concurrency))
        s = base.get(("HF static cache", r.concurrency))
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.tok_s:,.0f} | {r.pct(r.ttft_ms, 0.5):.1f} | {r.pct(r.ttft_ms, 0.99):.1f} | "
            f"{r.pct(r.tpot_ms, 0.5):.2f} | {r.pct(r.tpot_ms, 0.99):.2f} | "
            f"{r.tok_s / d if d else float('nan'):.2f} | {r.tok_s / s if s else float('nan'):.2f} | "
            f"{r.cpu_ms_per_token:.2f} | {cpu.get(('HF default cache', r.concurrency), float('nan')) / r.cpu_ms_per_token:.2f} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=None, help="default 1 8 64 (+256 on GPU)")
    ap.add_argument(
        "--waves", type=int, default=None, help="requests per concurrency level = waves × concurrency"
    )
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument(
        "--workload",
        default="fixed",
        choices=["fixed", "mixed"],
        help="fixed: every request prompt-len -> output-len (the anchor's setup); mixed: lengths "
        "uniform in [1/4, 7/4] of those (HF pads prompts and runs each batch to its longest output)",
    )
    ap.add_argument(
        "--scheduler-steps",
        type=int,
        default=None,
        help="engine num_scheduler_steps (CUDA multi-step greedy decode); default: the config's",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the matmuls-alone ceiling rows")
    ap.add_argument("--quick", action="store_true", help="fewer/shorter runs (CPU)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 is steadier on a shared, oversubscribed CPU)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from serve.engine.engine import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.device, args.dtype = device.type, str(dtype).removeprefix("torch.")
    out_len = args.output_len or (32 if args.quick else 128)
    concs = args.concurrency or ([1, 8, 64] + ([256] if device.type == "cuda" else []))
    waves = args.waves or (1 if args.quick else 2)
    mcfg = preset(args.preset, max_seq_len=max(2048, args.prefix_len + 64, 2 * (args.prompt_len + out_len)))
    torch.manual_seed(0)
    model = Transformer(mcfg).init_weights(0)
    print(
        f"# serve.bench: preset {args.preset} ({model.num_params() / 1e6:.1f}M params), {args.dtype} on {device}, "
        f"{args.workload} workload, prompt {args.prompt_len} -> {out_len} tokens (mean), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows: list[Row] = []
    log: Callable[[Row], None] = lambda r: print(  # noqa: E731
        f"  {r.system:18s} c={r.concurrency:<4d} {r.tok_s:10,.1f} tok/s", file=sys.stderr, flush=True
    )
    tmp = tempfile.TemporaryDirectory()
    hf = None
    if not args.no_hf:
        model.save_pretrained(tmp.name)
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(tmp.name, dtype=dtype).to(device).eval()
        hf.generation_config.eos_token_id = None
    maxc = max(concs)
    engine = make_engine(
        model, args, maxc, max(2048, maxc), 2 * maxc * (args.prompt_len + out_len) + 2 * args.prefix_len + 256
    )
    bench_engine(engine, workload(min(4, maxc), args.prompt_len, 4, mcfg.vocab_size, 99, False), 4)  # warm up
    mixed = args.workload == "mixed"
    for c in concs:
        work = workload(c * waves, args.prompt_len, out_len, mcfg.vocab_size, c, mixed)
        rows.append(bench_engine(engine, work, c))
        log(rows[-1])
        if hf is not None:
            for static in (False, True):
                # warm up on the first batch itself: HF's static cache compiles for the cache length
                # (prompt + new tokens), so a shorter warm-up left that compile inside the timed run
                bench_hf(hf, work[:c], c, static, device)
                rows.append(bench_hf(hf, work, c, static, device))
                log(rows[-1])
    steps = 32 if args.quick else 128
    dec_us, dec_cpu_us = decode_step_us(engine, prompts_for(1, args.prompt_len, mcfg.vocab_size, 7)[0], steps)
    miss, hit = prefix_ttft_ms(engine, mcfg.vocab_size, args.prefix_len, 3 if args.quick else 5)
    graph_us: dict[int, float] = {}
    print(table(rows))
    print()
    hf1 = {r.system: r.pct(r.tpot_ms, 0.5) * 1e3 for r in rows if r.concurrency == 1}
    print("| measure | retort engine | HF default cache (TPOT) | HF static cache (TPOT) | ratio |")
    print("|---|---:|---:|---:|---:|")
    d1 = hf1.get("HF default cache", float("nan"))
    print(
        f"| time per output token, batch 1 (µs wall; engine CPU {dec_cpu_us:,.0f}) | {dec_us:,.0f} | {d1:,.0f} "
        f"| {hf1.get('HF static cache', float('nan')):,.0f} | HF default / engine = {d1 / dec_us:.2f} |"
    )
    for b in (1, 64):
        us = graph_replay_us(engine, b, args.prompt_len + out_len // 2) if device.type == "cuda" else None
        if us is not None:
            graph_us[b] = us
            print(
                f"| one decode step's GPU time, batch {b}, context {args.prompt_len + out_len // 2} (µs, CUDA-graph "
                f"replay) | {us:,.0f} | | | |"
            )
    print(
        f"| TTFT, {args.prefix_len}-token prefix: miss vs hit (ms) | miss {miss:.1f} / hit {hit:.1f} | | | {miss / hit:.1f}× lower on hit |"
    )
    ceilings = {}
    if not args.no_ceiling:
        for c in concs:
            ceilings[c] = matmul_ceiling_tok_s(model, c, args.prompt_len, out_len, device, dtype)
            d = next(
                (r.tok_s for r in rows if r.system == "HF default cache" and r.concurrency == c), float("nan")
            )
            s = next(
                (r.tok_s for r in rows if r.system == "HF static cache" and r.concurrency == c), float("nan")
            )
            print(
                f"| matmuls alone, c={c}: output tok/s (4 a layer + LM head, one call each) | {ceilings[c]:,.0f} "
                f"| {d:,.0f} | {s:,.0f} | ceiling / HF default = {ceilings[c] / d:.2f}, / HF static = {ceilings[c] / s:.2f} |"
            )
            if device.type == "cuda":
                roof = hbm_roofline_tok_s(model, c, args.prompt_len + out_len // 2, device, dtype)
                ceilings[f"hbm_{c}"] = roof
                print(
                    f"| HBM roofline, c={c}: decode tok/s at context {args.prompt_len + out_len // 2} (weights + KV read "
                    f"once a step at copy bandwidth) | {roof:,.0f} | {d:,.0f} | {s:,.0f} | roofline / HF default = "
                    f"{roof / d:.2f}, / HF static = {roof / s:.2f} |"
                )
    if args.json:
        res = dict(
            args=vars(args),
            rows=[asdict(r) for r in rows],
            decode_step_us=dec_us,
            decode_step_cpu_us=dec_cpu_us,
            graph_replay_us=graph_us,
            prefix_miss_ms=miss,
            prefix_hit_ms=hit,
            matmul_ceiling_tok_s=ceilings,
        )
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
