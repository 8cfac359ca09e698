"""Engine + connector + in-process store: a prefix computed by engine A is imported by engine B,
B's greedy output equals a full recompute, and no store failure ever changes or fails a request."""

import time

import pytest
import torch
from engine_helpers import random_prompts, reference_greedy, tiny_model

from cluster.config.engine import EngineConfig
from cluster.config.kvstore import KVStoreConfig, StoreHealthConfig
from serve.engine import LLMEngine, SamplingParams
from serve.kv.connector import KVConnector
from serve.kv.health import MonitoredStore
from serve.kv.memory_backend import MemoryStore

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
CFG = KVStoreConfig(enabled=True, backend="memory", min_fetch_blocks=1, fetch_timeout_s=2.0)


@pytest.fixture(scope="module")
def ref():
    return tiny_model()


def engine(store, cfg: KVStoreConfig = CFG, seed: int = 0) -> tuple[LLMEngine, KVConnector]:
    conn = KVConnector(store, cfg)
    eng = LLMEngine(
        tiny_model(seed),
        EngineConfig(device="cpu", dtype="float32", num_blocks=64, block_size=16),
        kv_connector=conn,
    )
    return eng, conn


def shared_prefix_prompts(seed: int = 3) -> tuple[list[int], list[int]]:
    prefix = random_prompts(1, 100, 100, seed=seed)[0]
    return prefix + [1, 2, 3], prefix + [7, 8, 9, 10]


def test_block_published_by_a_is_used_by_b(ref):
    store = MemoryStore(1 << 24)
    a, ca = engine(store)
    b, cb = engine(store)
    pa, pb = shared_prefix_prompts()
    assert a.generate([pa], GREEDY)[0].token_ids == reference_greedy(ref, pa, 8)
    assert ca.flush() and ca.stats.published_blocks >= 6  # 103 prompt tokens + 8 -> 6 full blocks
    out = b.generate([pb], GREEDY)[0]
    assert out.token_ids == reference_greedy(ref, pb, 8)
    assert cb.stats.imported_blocks == 6 and cb.stats.bad_blocks == 0
    assert out.num_cached_tokens == 96 and b.stats().prefix_hits == 96
    cb.close(), ca.close()


def test_tenant_salt_isolates():
    store = MemoryStore(1 << 24)
    a, ca = engine(store)
    b, cb = engine(store)
    pa, pb = shared_prefix_prompts(seed=4)
    a.generate([pa], GREEDY, salt="tenant-a")
    ca.flush()
    hits_before = store.stats().hits
    out = b.generate([pb], GREEDY, salt="tenant-b")[0]
    assert out.num_cached_tokens == 0 and cb.stats.imported_blocks == 0
    assert store.stats().hits == hits_before  # asked, and nothing matched
    assert (
        b.generate([pb], GREEDY, salt="tenant-a", prefix="again")[0].num_cached_tokens == 96
    )  # same tenant hits
    ca.close(), cb.close()


def test_different_weights_never_share():
    store = MemoryStore(1 << 24)
    a, ca = engine(store, seed=0)
    b, cb = engine(store, seed=1)  # same architecture, other weights -> other model identity
    pa, pb = shared_prefix_prompts(seed=5)
    a.generate([pa], GREEDY)
    ca.flush()
    assert b.generate([pb], GREEDY)[0].num_cached_tokens == 0 and cb.stats.imported_blocks == 0
    ca.close(), cb.close()


class Corrupting(MemoryStore):
    """Returns real records with one byte of the payload flipped (or cut short)."""

    def __init__(self, mode: str) -> None:
        super().__init__(1 << 24)
        self.mode = mode

    def get(self, keys):
        out = super().get(keys)
        if self.mode == "flip":
            return [None if r is None else r[:-1] + bytes([r[-1] ^ 1]) for r in out]
        return [None if r is None else r[:100] for r in out]


@pytest.mark.parametrize("mode", ["flip", "truncate"])
def test_garbage_from_store_is_refused_and_recomputed(ref, mode):
    store = Corrupting(mode)
    a, ca = engine(store)
    b, cb = engine(store)
    pa, pb = shared_prefix_prompts(seed=6)
    a.generate([pa], GREEDY)
    ca.flush()
    out = b.generate([pb], GREEDY)[0]
    assert out.token_ids == reference_greedy(ref, pb, 8)
    assert cb.stats.bad_blocks == 1 and cb.stats.imported_blocks == 0 and out.num_cached_tokens == 0
    ca.close(), cb.close()


class Broken(MemoryStore):
    def __init__(self, delay: float = 0.0, fail: bool = True) -> None:
        super().__init__(1 << 24)
        self.delay, self.fail = delay, fail

    def get(self, keys):
        time.sleep(self.delay)
        if self.fail:
            raise ConnectionError("connection refused")
        return super().get(keys)

    def put(self, items):
        if self.fail:
            raise ConnectionError("connection refused")
        super().put(items)


def test_failing_store_costs_only_a_recompute(ref):
    store = MonitoredStore(Broken(), StoreHealthConfig(backoff_initial_s=30.0), metrics=False)
    eng, conn = engine(store)
    prompts = random_prompts(4, 40, 90, seed=7)
    out = eng.generate(prompts, GREEDY)
    assert [c.token_ids for c in out] == [reference_greedy(ref, p, 8) for p in prompts]
    conn.flush()
    assert not store.healthy and conn.stats.dropped_blocks > 0 and conn.stats.imported_blocks == 0
    conn.close()


def test_slow_store_times_out_and_recomputes(ref):
    store = Broken(delay=3.0, fail=False)
    eng, conn = engine(
        store, KVStoreConfig(enabled=True, backend="memory", min_fetch_blocks=1, fetch_timeout_s=0.05)
    )
    prompt = random_prompts(1, 80, 80, seed=8)[0]
    t0 = time.monotonic()
    out = eng.generate([prompt], GREEDY)[0]
    assert out.token_ids == reference_greedy(ref, prompt, 8)
    assert conn.stats.fetch_timeouts == 1 and out.ttft_s < 2.5  # did not wait for the 3 s store
    assert time.monotonic() - t0 < 10
    conn.close()


def test_min_fetch_blocks_skips_short_prefixes():
    store = MemoryStore(1 << 24)
    cfg = KVStoreConfig(enabled=True, backend="memory", min_fetch_blocks=8)
    a, ca = engine(store, cfg)
    b, cb = engine(store, cfg)
    pa, pb = shared_prefix_prompts(seed=9)  # 6 shareable blocks < 8
    a.generate([pa], GREEDY)
    ca.flush()
    assert b.generate([pb], GREEDY)[0].num_cached_tokens == 0
    assert cb.stats.fetch_requests == 0 and cb.stats.fetch_skipped == 1
    ca.close(), cb.close()


def test_local_prefix_is_not_refetched():
    store = MemoryStore(1 << 24)
    a, ca = engine(store)
    pa, pb = shared_prefix_prompts(seed=10)
    a.generate([pa], GREEDY)
    ca.flush()
    gets = store.stats().hits + store.stats().misses
    assert a.generate([pb], GREEDY)[0].num_cached_tokens == 96
    assert store.stats().hits + store.stats().misses == gets  # all local: nothing asked of the store
    assert torch.is_tensor(a.kv.kv[0])
    ca.close()
