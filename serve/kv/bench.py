"""Shared KV store + cache-aware routing benchmark: ``python -m serve.kv.bench``.

1. TTFT of a request whose ``--prefix-tokens`` prefix another engine computed and published:
   fetched from the store (memory / Ray actor refs / Ray actor bytes / Redis) vs recomputed, on
   the ``--model`` preset (random weights), same process, same weights, local prefix cache
   emptied before every measured request.
2. Break-even: TTFT with the store vs recompute for prefixes of 1..64 blocks; the smallest
   size at which fetching wins is what ``kv_store.min_fetch_blocks`` should be.
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
    model: Transformer, cfg: EngineConfig, store: Any = None, min_fetch_blocks: int = 1
) -> LLMEngine:
    conn = None
    if store is not None:
        conn = KVConnector(
            store, KVStoreConfig(enabled=True, min_fetch_blocks=min_fetch_blocks, fetch_timeout_s=10.0)
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
def bench_ttft(model: Transformer, args: argparse.Namespace, backends: Backends) -> list[dict[str, Any]]:
    """Every backend gets a publisher engine (computes the prefix once) and a reader engine; then,
    size by size and run by run, recompute and every reader are timed in turn (interleaved, so a
    burst of other load on the machine hits all of them alike)."""
    rng = random.Random(0)
    vocab = model.cfg.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]
    tail = [rng.randrange(vocab) for _ in range(16)]
    cfg = engine_cfg(num_blocks=args.prefix_tokens // 16 * 2 + 32)
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n * 16 < args.prefix_tokens] + [args.prefix_tokens // 16]
    engines: dict[str, LLMEngine] = {"recompute": make_engine(model, cfg)}
    stores: dict[str, Any] = {}
    fetch: dict[str, float] = {}
    try:
        for name in backends.names:
            stores[name] = backends.open(name)
            publisher = make_engine(model, cfg, stores[name])
            publisher.generate([prefix + tail], ONE)
            publisher.kv_connector.flush(60)
            keys = make_keys(
                publisher.kv_connector.namespace,
                block_hashes(prefix, 16, publisher.model_id)[: args.prefix_tokens // 16],
            )
            fetch[name] = get_latency(stores[name], keys, 20)
            publisher.kv_connector.close()
            engines[name] = make_engine(model, cfg, stores[name])
        runs: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in engines}
        for n in sizes:
            prompt = prefix[: n * 16] + tail[:1]
            for rep in range(args.repeats + 1):  # run 0 warms up
                for name, eng in engines.items():
                    t = ttft(eng, prompt)
                    if rep:
                        runs[name][n].append(t)
        stat = min if args.stat == "min" else statistics.median
        res = {name: {n: stat(r[n]) for n in sizes} for name, r in runs.items()}
    finally:
        for name, store in stores.items():
            if name in engines:
                engines[name].kv_connector.close()
            backends.close(store)
    return [{"recompute": res["recompute"], "sizes": sizes}] + [
        {"backend": name, "hit": res[name], "get_ms": fetch[name] * 1e3} for name in backends.names
    ]


def get_latency(store: Any, keys: list[bytes], n: int) -> float:
    """Median wall time of one batched ``get`` of ``keys`` (all present)."""
    times = []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        got = store.get(keys)
        times.append(time.perf_counter() - t0)
        assert all(r is not None for r in got), "bench: the store lost blocks"
    return statistics.median(times[1:])


def print_ttft(res: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base, sizes = res[0]["recompute"], res[0]["sizes"]
    full = sizes[-1]
    print(
        f"\n## TTFT, {full * 16}-token prefix computed by another engine ({args.model}, {DEVICE['device']}, {DEVICE['dtype']}, "
        f"{args.stat} of {args.repeats} wall-clock runs)\n"
    )
    print(
        f"| backend | store hit TTFT (ms) | recompute TTFT (ms) | speedup | one get of {full} blocks (ms) |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in res[1:]:
        print(
            f"| {row['backend']} | {row['hit'][full] * 1e3:.1f} | {base[full] * 1e3:.1f} | "
            f"{base[full] / row['hit'][full]:.1f}x | {row['get_ms']:.1f} |"
        )
    print("\n## Break-even: TTFT (ms) of a prompt of N cached blocks + 1 token\n")
    print("| blocks | recompute | " + " | ".join(r["backend"] for r in res[1:]) + " |")
    print("|---:|---:|" + "---:|" * (len(res) - 1))
    for n in sizes:
        cells = " | ".join(f"{r['hit'][n] * 1e3:.1f} ({base[n] / r['hit'][n]:.1f}x)" for r in res[1:])
        print(f"| {n} | {base[n] * 1e3:.1f} | {cells} |")
    for r in res[1:]:
        wins = [n for n in sizes if r["hit"][n] < base[n]]
        print(f"break-even {r['backend']}: fetching wins from {wins[0] if wins else 'never'} block(s)")


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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="engine device (the store stays in host memory)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument("--skip-routing", action="store_true")
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: routing CPU times are exact)"
    )
    p.add_argument(
        "--stat", choices=["median", "min"], default="median", help="TTFT statistic over --repeats"
    )
    args = p.parse_args(argv)
    DEVICE.update(device=args.device, dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
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
