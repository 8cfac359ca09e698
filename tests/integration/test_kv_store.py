"""The shared KV store on real Ray and real Redis.

- Ray: engine A runs in its own Ray actor (process), publishes its prefix and is killed; engine B
  (the driver) imports the prefix from the store actor and decodes exactly what a recompute does.
- Killing the store (the Ray actor, or the redis-server process) while requests are in flight
  fails nothing and changes no output; the store comes back (a new actor / a restarted Redis).
- Redis and Ray hold their capacity (LRU eviction); tenant salts isolate on a real backend.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "serve"))
from engine_helpers import random_prompts, reference_greedy, tiny_model  # noqa: E402

pytestmark = pytest.mark.integration

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def make_engine(store, seed: int = 0, min_fetch_blocks: int = 1, fetch_timeout_s: float = 2.0):
    from cluster.config.engine import EngineConfig
    from cluster.config.kvstore import KVStoreConfig
    from serve.engine import LLMEngine
    from serve.kv.connector import KVConnector

    conn = KVConnector(
        store, KVStoreConfig(enabled=True, min_fetch_blocks=min_fetch_blocks, fetch_timeout_s=fetch_timeout_s)
    )
    eng = LLMEngine(
        tiny_model(seed),
        EngineConfig(device="cpu", dtype="float32", num_blocks=96, block_size=16),
        kv_connector=conn,
    )
    return eng, conn


def monitored(backend, backoff_s: float = 0.2):
    from cluster.config.kvstore import StoreHealthConfig
    from serve.kv.health import MonitoredStore

    return MonitoredStore(backend, StoreHealthConfig(backoff_initial_s=backoff_s, backoff_max_s=backoff_s))


def greedy(n: int = 6):
    from serve.engine import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def prefix_family(n: int, seed: int, prefix_len: int = 64) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, prefix_len, seed=seed)[0]
    return [prefix + tail for tail in random_prompts(n, 3, 12, seed=seed + 1)]


def run_all(eng, prompts, salt=None, kill_after_adds=None) -> dict[str, list[int]]:
    """Add every prompt, call ``kill_after_adds`` (store dies with prefetches in flight), run to the end."""
    ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, p, greedy(), salt=salt)
    if kill_after_adds is not None:
        kill_after_adds()
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    finished = 0
    while finished < len(ids):
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
            if o.finished:
                assert o.finish_reason == "length", o
                finished += 1
    return [out[rid] for rid in ids]


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    import engine_helpers
    import ray
    from ray import cloudpickle

    for mod in (sys.modules[__name__], engine_helpers):  # not importable on workers: ship them by value
        cloudpickle.register_pickle_by_value(mod)
    ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ref_model():
    return tiny_model(0)


class EngineA:
    """Replica A: its own process, its own engine, publishing to the shared store actor."""

    def __init__(self, actor_name: str) -> None:
        from serve.kv.ray_backend import RayStore

        self.store = RayStore(64 << 20, name=actor_name, namespace="retort-test")
        self.eng, self.conn = make_engine(self.store)

    def run(self, prompt: list[int]) -> tuple[list[int], int]:
        out = run_all(self.eng, [prompt])[0]
        assert self.conn.flush(30)
        return out, self.conn.stats.published_blocks


def test_ray_block_from_replica_a_is_used_by_replica_b(ray_driver, ref_model):
    ray = ray_driver
    from serve.kv.ray_backend import RayStore

    name = f"kv-{uuid.uuid4().hex[:8]}"
    prompts = prefix_family(2, seed=21, prefix_len=80)
    a = ray.remote(num_cpus=0)(EngineA).remote(name)
    out_a, published = ray.get(a.run.remote(prompts[0]), timeout=120)
    assert out_a == reference_greedy(ref_model, prompts[0], 6) and published >= 5
    ray.kill(a)  # replica A is gone; the store actor owns its blocks
    store = RayStore(64 << 20, name=name, namespace="retort-test")
    try:
        eng_b, conn_b = make_engine(monitored(store))
        out_b = run_all(eng_b, [prompts[1]])[0]
        assert out_b == reference_greedy(ref_model, prompts[1], 6)
        assert conn_b.stats.imported_blocks == 5 and eng_b.stats().prefix_hits == 80
        conn_b.close()
    finally:
        store.destroy()


def test_ray_store_killed_mid_load_fails_nothing(ray_driver, ref_model):
    from serve.kv.ray_backend import RayStore

    name = f"kv-{uuid.uuid4().hex[:8]}"
    raw = RayStore(64 << 20, name=name, namespace="retort-test")
    store = monitored(raw)
    peer, peer_conn = make_engine(store)
    families = [prefix_family(4, seed=30 + i) for i in range(3)]
    prompts = [p for fam in families for p in fam]
    expected = [reference_greedy(ref_model, p, 6) for p in prompts]
    run_all(peer, [fam[0] for fam in families])  # the store now holds every family's prefix
    assert peer_conn.flush(30) and raw.stats().num_blocks >= 12
    eng, conn = make_engine(store)
    try:
        got = run_all(eng, prompts, kill_after_adds=lambda: raw.destroy())
        assert got == expected  # nothing failed, nothing changed
        assert not store.healthy or conn.stats.imported_blocks > 0
        time.sleep(0.3)  # past the backoff: the next op probes, creates a fresh actor, and publishing resumes
        before = conn.stats.published_blocks
        fresh = prefix_family(1, seed=99)
        assert run_all(eng, fresh) == [reference_greedy(ref_model, fresh[0], 6)]
        deadline = time.monotonic() + 60
        while conn.stats.published_blocks == before and time.monotonic() < deadline:
            run_all(eng, prefix_family(1, seed=int(time.monotonic() * 1000) % 10000))
            conn.flush(10)
        assert conn.stats.published_blocks > before and store.healthy
    finally:
        conn.close(), peer_conn.close()
        raw.destroy()


def test_ray_store_eviction_holds_capacity(ray_driver):
    from serve.kv.ray_backend import RayStore

    cap = 1 << 20
    store = RayStore(cap, name=f"kv-{uuid.uuid4().hex[:8]}", namespace="retort-test", mode="bytes")
    try:
        keys = [os.urandom(48) for _ in range(30)]
        for i in range(0, 30, 10):
            store.put([(k, os.urandom(100_000)) for k in keys[i : i + 10]])
        st = store.stats()
        assert st.used_bytes <= cap and st.num_blocks == 10 and st.evictions == 20
        got = store.get(keys)
        assert got[:20] == [None] * 20 and all(isinstance(r, bytes) and len(r) == 100_000 for r in got[20:])
    finally:
        store.destroy()


# -- Redis ------------------------------------------------------------------------------------------
class RedisServer:
    def __init__(self, tmp: Path) -> None:
        from cluster.net import free_port

        self.port, self.tmp = free_port(), tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_redis_replica_b_uses_a_salts_isolate(redis_server, ref_model):
    from serve.kv.redis_backend import RedisStore

    store = monitored(RedisStore(redis_server.url, 32 << 20))
    a, ca = make_engine(store)
    b, cb = make_engine(store)
    prompts = prefix_family(3, seed=40, prefix_len=80)
    run_all(a, [prompts[0]], salt="tenant-a")
    assert ca.flush(10) and ca.stats.published_blocks >= 5
    assert run_all(b, [prompts[1]], salt="tenant-b") == [reference_greedy(ref_model, prompts[1], 6)]
    assert cb.stats.imported_blocks == 0 and b.stats().prefix_hits == 0  # other tenant: nothing shared
    assert run_all(b, [prompts[2]], salt="tenant-a") == [reference_greedy(ref_model, prompts[2], 6)]
    assert cb.stats.imported_blocks == 5 and b.stats().prefix_hits == 80
    ca.close(), cb.close()


def test_redis_killed_mid_load_fails_nothing_and_recovers(redis_server, ref_model):
    from serve.kv.redis_backend import RedisStore

    store = monitored(RedisStore(redis_server.url, 32 << 20))
    peer, peer_conn = make_engine(store)
    families = [prefix_family(4, seed=50 + i) for i in range(3)]
    prompts = [p for fam in families for p in fam]
    expected = [reference_greedy(ref_model, p, 6) for p in prompts]
    run_all(peer, [fam[0] for fam in families])
    assert peer_conn.flush(10)
    eng, conn = make_engine(store)
    assert run_all(eng, prompts, kill_after_adds=redis_server.kill) == expected
    redis_server.start()  # same port, empty
    time.sleep(0.3)
    deadline, seed = time.monotonic() + 60, 60
    while not (store.healthy and conn.stats.published_blocks > 0) and time.monotonic() < deadline:
        again = prefix_family(1, seed=seed)  # new blocks each round, so there is something to publish
        assert run_all(eng, again) == [reference_greedy(ref_model, again[0], 6)]
        conn.flush(10)
        seed += 2
    assert store.healthy and conn.stats.published_blocks > 0
    conn.close(), peer_conn.close()


def test_redis_eviction_holds_capacity(redis_server):
    import redis

    from serve.kv.redis_backend import RedisStore

    cap = 8 << 20
    store = RedisStore(redis_server.url, cap)
    keys = [os.urandom(48) for _ in range(240)]
    for i in range(0, 240, 20):  # 24 MB into an 8 MB store
        store.put([(k, os.urandom(100_000)) for k in keys[i : i + 20]])
    st = store.stats()
    assert st.extra["maxmemory"] == cap and st.extra["maxmemory_policy"] == "allkeys-lru"
    assert st.used_bytes <= cap and st.evictions > 100 and st.num_blocks < 80
    got = store.get(keys[-5:])
    assert all(r is not None for r in got)  # the newest survive
    info = redis.Redis.from_url(redis_server.url).info("memory")
    assert info["used_memory"] <= cap
    store.close()
