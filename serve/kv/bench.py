"""Shared KV store + cache-aware routing benchmark: ``python -m serve.kv.bench``.

1. TTFT of a request whose ``--prefix-tokens`` prefix another engine computed and published:
   fetched from the store (memory / Ray actor refs / Ray actor bytes / Redis) vs recomputed, on
   the ``--model`` preset (random weights), same process, same weights, local prefix cache
   emptied before every measured request. Two readers per backend, one per ``fetch_policy``:
   ``always`` (what the store alone gives) and ``cost`` (fetches only when its online cost model
   predicts a win; it first serves ``--calibrate`` rounds of misses of 1..N blocks, as a replica
   would have by then, so that it has seen prefill steps of several sizes).
2. Break-even: TTFT under both policies vs recompute for prefixes of 1..64 blocks, the cost
   engine's decisions and its predicted fetch / saved-recompute times; ``cost`` should never be
   slower than recompute by more than noise, and fetch wherever ``always`` wins clearly.
3. Multi-prefix workload: ``--systems`` system prompts x ``--suffixes`` user suffixes, shuffled,
   served by ``--replicas`` engines (simulated replicas: one engine each, all in this process;
   each tick steps every busy engine once and the tick costs the slowest engine's step in CPU
   time, as if the replicas ran in parallel on their own cores; CPU time, not wall time, so
   that other load on the machine does not leak into the comparison). Routing: cache-aware (``serve.router.CacheAwarePolicy``) vs
   power-of-two-choices, and power-of-two with the shared store. Prints prefix hit rate
   (tokens, as vLLM counts it) and throughput.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from cluster.config.engine import EngineConfig
from cluster.config.kvstore import KVStoreConfig, RouterConfig
from cluster.config.model import preset
from cluster.model import Transformer
from serve.engine import LLMEngine, SamplingParams
from serve.engine.hashing import block_hashes
from serve.kv.connector import KVConnector
from serve.kv.memory_backend import MemoryStore
from serve.kv.store import make_keys
from serve.router import CacheAwarePolicy, prompt_block_hashes

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


DEVICE = {"device": "cpu", "dtype": "float32"}  # --device / --dtype


def engine_cfg(num_blocks: int, max_num_seqs: int = 8, budget: int = 2048) -> EngineConfig:
    return EngineConfig(
        device=DEVICE["device"],
        dtype=DEVICE["dtype"],
        num_blocks=num_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        block_size=16,
    )


def make_engine(
    model: Transformer, cfg: EngineConfig, store: Any = None, min_fetch_blocks: int = 1, policy: str = "cost"
) -> LLMEngine:
    conn = None
    if store is not None:
        conn = KVConnector(
            store,
            KVStoreConfig(
                enabled=True, min_fetch_blocks=min_fetch_blocks, fetch_timeout_s=10.0, fetch_policy=policy
            ),
        )
    return LLMEngine(copy.deepcopy(model), cfg, kv_connector=conn)


def ttft(eng: LLMEngine, prompt: list[int]) -> float:
    eng.kv.pool.reset_prefix_cache()  # nothing local: a hit can only come from the store
    return eng.generate([prompt], ONE)[0].ttft_s


# -- backends ---------------------------------------------------------------------------------------
class Backends:
    """Starts what the chosen backends need (a local Ray, a redis-server) and tears it down."""

    def __init__(self, names: list[str], capacity: int) -> None:
        self.names, self.capacity = names, capacity
        self.redis: subprocess.Popen | None = None
        self.ray = False

    def open(self, name: str) -> Any:
        if name == "memory":
            return MemoryStore(self.capacity)
        if name.startswith("ray"):
            import ray

            from serve.kv.ray_backend import RayStore

            if not self.ray:
                ray.init(
                    num_cpus=2,
                    object_store_memory=max(2 * self.capacity, 256 << 20),
                    include_dashboard=False,
                    log_to_driver=False,
                )
                self.ray = True
            return RayStore(
                self.capacity,
                name=f"bench-{name}-{time.monotonic_ns()}",
                namespace="retort-bench",
                mode=name.split("-")[1],
                timeout_s=10.0,
            )
        if name == "redis":
            from serve.kv.redis_backend import RedisStore

            return RedisStore(self._start_redis(), self.capacity, timeout_s=10.0)
        raise SystemExit(f"unknown backend {name!r}")

    def _start_redis(self) -> str:
        import redis

        from cluster.net import free_port

        port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    def close(self, store: Any) -> None:
        if hasattr(store, "destroy"):
            store.destroy()
        store.close()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)
            self.redis = None

    def shutdown(self) -> None:
        if self.ray:
            import ray

            ray.shutdown()


# -- 1 + 2: TTFT and break-even -----------------------------------------------------------------------
POLICIES = ("always", "cost")
DECISIONS = {
    "decided_fetch": "fetch",
    "decided_skip_cost": "skip",
    "decided_probe": "probe",
    "fetch_skipped": "floor",
}


def calibrate(eng: LLMEngine, vocab: int, max_blocks: int, rounds: int) -> None:
    """Serve misses of 1..max_blocks blocks: the prefill steps a replica has seen before it meets a
    shared prefix (they feed the connector's recompute estimate)."""
    rng = random.Random(2)
    sizes = sorted({max(1, max_blocks >> k) for k in range(8)})
    for _ in range(rounds):
        for n in sizes:
            ttft(eng, [rng.randrange(vocab) for _ in range(n * 16 + 1)])


def decision(conn: KVConnector, before: dict[str, int]) -> str:
    after = conn.stats.as_dict()
    return ",".join(label for key, label in DECISIONS.items() if after[key] > before[key]) or "none"


def bench_ttft(model: Transformer, args: argparse.Namespace, backends: Backends) -> list[dict[str, Any]]:
    """Every backend gets a publisher engine (computes the prefix once) and a reader engine per
    fetch policy; then, size by size and run by run, recompute and every reader are timed in turn
    (interleaved, so a burst of other load on the machine hits all of them alike)."""
    rng = random.Random(0)
    vocab = model.cfg.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]
    tail = [rng.randrange(vocab) for _ in range(16)]
    full = args.prefix_tokens // 16
    cfg = engine_cfg(num_blocks=full * 2 + 32)
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < full] + [full]
    engines: dict[str, LLMEngine] = {"recompute": make_engine(model, cfg)}
    stores: dict[str, Any] = {}
    fetch: dict[str, float] = {}
    try:
        for name in backends.names:
            stores[name] = backends.open(name)
            publisher = make_engine(model, cfg, stores[name], policy="always")
            publisher.generate([prefix + tail], ONE)
            publisher.kv_connector.flush(60)
            keys = make_keys(
                publisher.kv_connector.namespace, block_hashes(prefix, 16, publisher.model_id)[:full]
            )
            fetch[name] = get_latency(stores[name], keys, 20)
            publisher.kv_connector.close()
            for policy in POLICIES:
                engines[f"{name}/{policy}"] = make_engine(model, cfg, stores[name], policy=policy)
            calibrate(engines[f"{name}/cost"], vocab, full, args.calibrate)
        runs: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in engines}
        decided: dict[str, dict[int, list[str]]] = {name: {n: [] for n in sizes} for name in engines}
        for n in sizes:
            prompt = prefix[: n * 16] + tail[:1]
            for rep in range(args.repeats + 1):  # run 0 warms up
                for name, eng in engines.items():
                    before = eng.kv_connector.stats.as_dict() if eng.kv_connector is not None else {}
                    t = ttft(eng, prompt)
                    if rep:
                        runs[name][n].append(t)
                        if eng.kv_connector is not None:
                            decided[name][n].append(decision(eng.kv_connector, before))
        stat = min if args.stat == "min" else statistics.median
        res = {name: {n: stat(r[n]) for n in sizes} for name, r in runs.items()}
        rows = []
        for name in backends.names:
            cost = engines[f"{name}/cost"].kv_connector
            rows.append(
                {
                    "backend": name,
                    "get_ms": fetch[name] * 1e3,
                    "hit": {policy: res[f"{name}/{policy}"] for policy in POLICIES},
                    "decisions": {policy: decided[f"{name}/{policy}"] for policy in POLICIES},
                    "predict": {n: cost.predict(n) for n in sizes},
                    "estimates": cost.estimates(),
                }
            )
    finally:
        for name, store in stores.items():
            for policy in POLICIES:
                if f"{name}/{policy}" in engines:
                    engines[f"{name}/{policy}"].kv_connector.close()
            backends.close(store)
    return [{"recompute": res["recompute"], "sizes": sizes}] + rows


def get_latency(store: Any, keys: list[bytes], n: int) -> float:
    """Median wall time of one batched ``get`` of ``keys`` (all present)."""
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        got = store.get(keys)
        times.append(time.perf_counter() - t0)
        assert all(r is not None for r in got), "bench: the store lost blocks"
    return statistics.median(times[1:])


def summarize(decisions: list[str]) -> str:
    """["fetch", "fetch", "skip"] -> "fetch 2, skip 1"."""
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d] = counts.get(d, 0) + 1
    return ", ".join(f"{d} {c}" for d, c in counts.items())


def print_ttft(res: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base, sizes = res[0]["recompute"], res[0]["sizes"]
    full = sizes[-1]
    print(
        f"\n## TTFT, {full * 16}-token prefix computed by another engine ({args.model}, {DEVICE['device']}, "
        f"{DEVICE['dtype']}, {args.stat} of {args.repeats} wall-clock runs)\n"
    )
    print(
        f"| backend | fetch_policy | TTFT (ms) | recompute TTFT (ms) | speedup | decisions | one get of {full} blocks (ms) |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    for row in res[1:]:
        for policy in POLICIES:
            hit = row["hit"][policy][full]
            print(
                f"| {row['backend']} | {policy} | {hit * 1e3:.1f} | {base[full] * 1e3:.1f} | {base[full] / hit:.1f}x | "
                f"{summarize(row['decisions'][policy][full])} | {row['get_ms']:.2f} |"
            )
    print("\n## The `cost` engine's fetch cost model at the end of the run\n")
    print(
        "| backend | prefill steps seen | recompute fixed (ms) | recompute marginal (us/token) | fetches seen | "
        "fetch latency (ms) | fetch throughput (MB/s) | break-even (blocks) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in res[1:]:
        e = row["estimates"]
        mbps = "-" if e["fetch_bytes_per_s"] is None else f"{e['fetch_bytes_per_s'] / 1e6:.0f}"
        print(
            f"| {row['backend']} | {e['recompute_samples']} | {e['recompute_fixed_s'] * 1e3:.2f} | "
            f"{e['recompute_s_per_token'] * 1e6:.1f} | {e['fetch_samples']} | {e['fetch_latency_s'] * 1e3:.2f} | "
            f"{mbps} | {e['break_even_blocks'] if e['break_even_blocks'] is not None else 'never'} |"
        )
        if not e["recompute_samples"]:
            print("\n(the engine reported no prefill steps: the cost model decided on its priors)")
    print(
        "\n## Break-even: TTFT (ms) of a prompt of N blocks (fetched or recomputed) + 1 token, both policies\n"
    )
    head = " | ".join(
        f"{r['backend']} always | {r['backend']} cost | cost decisions | predicted fetch / saved (ms)"
        for r in res[1:]
    )
    print(f"| blocks | recompute | {head} |")
    print("|---:|---:|" + "---:|---:|---|---:|" * (len(res) - 1))
    for n in sizes:
        cells = []
        for r in res[1:]:
            a, c = r["hit"]["always"][n], r["hit"]["cost"][n]
            f_s, saved_s = r["predict"][n]
            cells.append(
                f"{a * 1e3:.1f} ({base[n] / a:.1f}x) | {c * 1e3:.1f} ({base[n] / c:.1f}x) | "
                f"{summarize(r['decisions']['cost'][n])} | {f_s * 1e3:.2f} / {saved_s * 1e3:.2f}"
            )
        print(f"| {n} | {base[n] * 1e3:.1f} | {' | '.join(cells)} |")
    print()
    for r in res[1:]:
        wins = [n for n in sizes if r["hit"]["always"][n] < base[n]]
        worst = max(sizes, key=lambda n: r["hit"]["cost"][n] / base[n])
        print(
            f"{r['backend']}: fetching wins from {wins[0] if wins else 'never'} block(s) measured, "
            f"from {r['estimates']['break_even_blocks'] or 'never'} predicted; cost policy at worst "
            f"{r['hit']['cost'][worst] / base[worst]:.2f}x recompute's TTFT ({worst} blocks)"
        )


# -- 3: routing -----------------------------------------------------------------------------------------
class Replica:
    def __init__(self, eng: LLMEngine) -> None:
        self.eng, self.inflight, self.busy_s = eng, 0, 0.0


def run_routing(
    model: Transformer, args: argparse.Namespace, policy: str, shared_store: bool
) -> dict[str, float]:
    rng = random.Random(1)
    vocab = model.cfg.vocab_size
    systems = [[rng.randrange(vocab) for _ in range(args.system_tokens)] for _ in range(args.systems)]
    reqs = [
        s + [rng.randrange(vocab) for _ in range(args.suffix_tokens)]
        for s in systems
        for _ in range(args.suffixes)
    ]
    rng.shuffle(reqs)
    cfg = engine_cfg(args.replica_blocks, max_num_seqs=args.concurrency, budget=1024)
    store = MemoryStore(1 << 30) if shared_store else None
    reps = [Replica(make_engine(model, cfg, store, min_fetch_blocks=2)) for _ in range(args.replicas)]
    pol = CacheAwarePolicy(RouterConfig(policy="cache_aware", imbalance_abs=args.imbalance_abs))
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    pending, done, sim_s = list(reqs), 0, 0.0
    owner: dict[str, int] = {}
    while done < len(reqs):
        while pending and sum(r.inflight for r in reps) < args.concurrency * args.replicas:
            prompt = pending.pop()
            loads = {i: r.inflight for i, r in enumerate(reps)}
            if policy == "cache_aware":
                hashes = prompt_block_hashes(prompt, 16)
                i = pol.choose(list(loads), loads, hashes).ranked[0][0]
                pol.record(i, hashes)
            else:
                a, b = rng.sample(range(len(reps)), 2)
                i = a if loads[a] <= loads[b] else b
            rid = f"q{len(owner)}"
            owner[rid] = i
            reps[i].eng.add_request(rid, prompt, params)
            reps[i].inflight += 1
        tick = 0.0
        for r in reps:
            if not r.eng.has_unfinished():
                continue
            t0 = time.thread_time()  # CPU time of this step (torch runs in this thread with --threads 1)
            for out in r.eng.step():
                if out.finished:
                    r.inflight -= 1
                    done += 1
            dt = time.thread_time() - t0
            r.busy_s += dt
            tick = max(tick, dt)
        sim_s += tick
    q = sum(r.eng.stats().prefix_queries for r in reps)
    h = sum(r.eng.stats().prefix_hits for r in reps)
    for r in reps:
        if r.eng.kv_connector is not None:
            r.eng.kv_connector.close()
    return {
        "hit_rate": h / q,
        "req_s": len(reqs) / sim_s,
        "tok_s": len(reqs) * args.output_tokens / sim_s,
        "sim_s": sim_s,
    }


def print_routing(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"\n## Multi-prefix workload: {args.systems} system prompts x {args.suffixes} suffixes "
        f"({args.system_tokens}+{args.suffix_tokens} tokens -> {args.output_tokens}), {args.replicas} replicas "
        f"x {args.replica_blocks} KV blocks, {args.concurrency} in flight per replica ({args.model}, CPU)\n"
    )
    print("| routing | prefix hit rate | requests/s | output tok/s | vs pow2 hit rate | vs pow2 throughput |")
    print("|---|---:|---:|---:|---:|---:|")
    base = dict(rows)["pow2"]
    for name, r in rows:
        print(
            f"| {name} | {r['hit_rate']:.1%} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
            f"{r['hit_rate'] / max(base['hit_rate'], 1e-9):.2f}x | {r['req_s'] / base['req_s']:.2f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.kv.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="model preset (random weights)")
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--calibrate",
        type=int,
        default=2,
        help="rounds of misses of 1..N blocks the cost engine serves first",
    )
    p.add_argument("--backends", default="memory,ray-refs,ray-bytes,redis")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--systems", type=int, default=8)
    p.add_argument("--suffixes", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--replica-blocks", type=int, default=48, help="KV blocks per simulated replica")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per replica")
    p.add_argument(
        "--imbalance-abs", type=int, default=RouterConfig().imbalance_abs, help="router.imbalance_abs"
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="engine device (the store stays in host memory)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument("--skip-routing", action="store_true")
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: routing CPU times are exact)"
    )
    p.add_argument(
        "--stat", choices=["median", "min"], default="median", help="TTFT statistic over --repeats"
    )
    args = p.parse_args(argv)
    DEVICE.update(
        device=args.device, dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    )
    torch.set_num_threads(args.threads)
    seq_len = max(args.prefix_tokens + 64, args.system_tokens + args.suffix_tokens + args.output_tokens + 16)
    model = Transformer(preset(args.model, max_seq_len=max(seq_len, 512))).init_weights(0).eval()
    print(
        f"# serve.kv.bench: {args.model} ({model.num_params() / 1e6:.1f}M params), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {DEVICE['device']} {DEVICE['dtype']}, command: python -m serve.kv.bench {' '.join(argv or sys.argv[1:])}"
    )
    if not args.skip_ttft:
        names = [b for b in args.backends.split(",") if b]
        backends = Backends(names, capacity=256 << 20)
        try:
            print_ttft(bench_ttft(model, args, backends), args)
        finally:
            backends.shutdown()
    if not args.skip_routing:
        rows = [
            ("pow2", run_routing(model, args, "pow2", False)),
            ("cache_aware", run_routing(model, args, "cache_aware", False)),
            ("pow2 + shared store", run_routing(model, args, "pow2", True)),
        ]
        print_routing(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
