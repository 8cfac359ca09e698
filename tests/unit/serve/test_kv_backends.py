"""The store boundary: record codec and its verification, key namespaces, LRU capacity, the
in-process backend, and the health monitor's down/backoff/probe cycle."""

import pytest
import torch

from cluster.config.kvstore import StoreHealthConfig
from serve.kv.health import MonitoredStore
from serve.kv.memory_backend import MemoryStore
from serve.kv.store import (
    BadBlock,
    BlockLayout,
    KVStore,
    LRUIndex,
    decode_blocks,
    encode_blocks,
    layout_namespace,
    make_keys,
)

LAYOUT = BlockLayout(n_layers=2, block_size=4, n_kv_heads=2, head_dim=8, dtype=torch.float32)


def blocks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (LAYOUT.n_layers, n, LAYOUT.block_size, LAYOUT.n_kv_heads, LAYOUT.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def keys(n: int, ns: bytes = b"N" * 16) -> list[bytes]:
    return make_keys(ns, [bytes([i]) * 32 for i in range(n)])


def test_codec_round_trip_is_exact():
    k, v = blocks(3)
    ks = keys(3)
    recs = encode_blocks(LAYOUT, ks, k, v)
    assert all(len(r) == LAYOUT.record_bytes for r in recs)
    k2, v2 = decode_blocks(LAYOUT, ks, recs)
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_codec_round_trip_bfloat16():
    lay = BlockLayout(2, 4, 2, 8, torch.bfloat16)
    k, v = (t.to(torch.bfloat16) for t in blocks(2))
    ks = keys(2)
    k2, v2 = decode_blocks(lay, ks, encode_blocks(lay, ks, k, v))
    assert k2.dtype == torch.bfloat16 and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize(
    "damage", ["truncate", "flip", "swap_words", "other_key", "other_layout", "not_bytes"]
)
def test_decode_refuses_bad_records(damage):
    k, v = blocks(1)
    ks = keys(1)
    rec = encode_blocks(LAYOUT, ks, k, v)[0]
    if damage == "truncate":
        rec = rec[:-10]
    elif damage == "flip":
        rec = rec[:-1] + bytes([rec[-1] ^ 0xFF])
    elif damage == "swap_words":  # same words, other order: a plain sum would not see it
        rec = rec[:-8] + rec[-4:] + rec[-8:-4]
        assert rec != encode_blocks(LAYOUT, ks, k, v)[0]
    elif damage == "other_key":
        ks = keys(2)[1:]
    elif damage == "other_layout":
        lay = BlockLayout(2, 4, 2, 8, torch.float16)
        rec = encode_blocks(lay, ks, k.half(), v.half())[0] + bytes(LAYOUT.record_bytes - lay.record_bytes)
    else:
        rec = "garbage"
    with pytest.raises(BadBlock):
        decode_blocks(LAYOUT, ks, [rec])


def test_namespace_separates_models_dtypes_layouts():
    base = layout_namespace("model-a", LAYOUT)
    assert base == layout_namespace("model-a", LAYOUT)  # deterministic
    others = {
        layout_namespace("model-b", LAYOUT),
        layout_namespace("model-a", BlockLayout(2, 4, 2, 8, torch.bfloat16)),
        layout_namespace("model-a", BlockLayout(3, 4, 2, 8, torch.float32)),
        layout_namespace("model-a", BlockLayout(2, 8, 2, 8, torch.float32)),
    }
    assert base not in others and len(others) == 4


def test_lru_index_holds_capacity_and_evicts_oldest():
    idx = LRUIndex(capacity_bytes=1000)
    for i in range(5):
        assert idx.put(bytes([i]), f"v{i}", 300) == ([] if i < 3 else [f"v{i - 3}"])
    assert idx.used_bytes == 900 and len(idx) == 3 and idx.evictions == 2
    idx.get([bytes([2])])  # refresh 2: now 3 is the oldest
    assert idx.put(bytes([9]), "v9", 300) == ["v3"]
    assert idx.get([bytes([2]), bytes([3])]) == ["v2", None]
    assert idx.put(b"big", "x", 5000) == ["x"] and idx.used_bytes <= 1000  # never fits


def test_memory_store_eviction_holds_capacity():
    cap = 10 * LAYOUT.record_bytes
    store = MemoryStore(cap)
    assert isinstance(store, KVStore)
    k, v = blocks(25)
    ks = keys(25)
    store.put(list(zip(ks, encode_blocks(LAYOUT, ks, k, v), strict=True)))
    st = store.stats()
    assert st.used_bytes <= cap and st.num_blocks == 10 and st.evictions == 15
    got = store.get(ks)
    assert got[:15] == [None] * 15 and all(r is not None for r in got[15:])  # the newest survive
    assert store.stats().hits == 10 and store.stats().misses == 15


class FlakyStore:
    name = "flaky"
    capacity_bytes = 1 << 20

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0
        self.inner = MemoryStore(1 << 20)

    def get(self, keys):
        self.calls += 1
        if self.fail:
            raise ConnectionError("store is gone")
        return self.inner.get(keys)

    def put(self, items):
        self.calls += 1
        if self.fail:
            raise ConnectionError("store is gone")
        self.inner.put(items)

    def stats(self):
        return self.inner.stats()

    def close(self):
        pass


def test_health_monitor_marks_down_backs_off_and_recovers():
    now = [0.0]
    flaky = FlakyStore()
    store = MonitoredStore(
        flaky,
        StoreHealthConfig(backoff_initial_s=1.0, backoff_max_s=4.0),
        clock=lambda: now[0],
        metrics=False,
    )
    ks = keys(2)
    k, v = blocks(2)
    assert store.put(list(zip(ks, encode_blocks(LAYOUT, ks, k, v), strict=True))) is True
    flaky.fail = True
    assert store.get(ks) == [None, None] and not store.healthy
    calls = flaky.calls
    assert store.get(ks) == [None, None] and store.put([(ks[0], b"x")]) is False
    assert flaky.calls == calls  # no-ops while down: the backend is not touched
    for expected_backoff in (2.0, 4.0, 4.0):  # each failed probe doubles the wait, capped
        now[0] += 100
        store.get(ks)
        assert store._down_until == pytest.approx(now[0] + expected_backoff)
    flaky.fail = False
    now[0] += 100
    assert all(r is not None for r in store.get(ks)) and store.healthy
    assert store.stats().extra["errors_by_op"] == {"get": 4}


def test_health_monitor_counts_slow_ops_as_failures():
    now = [0.0]

    class Slow(FlakyStore):
        def get(self, keys):
            now[0] += 5.0  # the op "takes" 5 s
            return [None] * len(keys)

    store = MonitoredStore(Slow(), StoreHealthConfig(slow_op_s=1.0), clock=lambda: now[0], metrics=False)
    store.get(keys(1))
    assert not store.healthy and "slow" in store.last_error


def test_health_monitor_refuses_wrong_answer_length():
    class Short(FlakyStore):
        def get(self, keys):
            return []

    store = MonitoredStore(Short(), metrics=False)
    assert store.get(keys(3)) == [None] * 3 and not store.healthy


def test_config_defaults_keep_a_plain_deployment_and_validate():
    from pydantic import ValidationError

    from cluster.config.kvstore import KVStoreConfig
    from cluster.config.serve import ServeConfig
    from serve.router import router_options

    cfg = ServeConfig()
    assert cfg.kv_store.enabled is False and cfg.router.policy == "pow2"
    assert router_options(cfg.router, cfg.engine.block_size) is None
    with pytest.raises(ValidationError):
        StoreHealthConfig(backoff_initial_s=10, backoff_max_s=1)
    with pytest.raises(ValidationError):
        KVStoreConfig(backend="s3")
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"kv_store": {"enabled": True, "capacity": 5}})


def test_open_store_wraps_the_backend_in_the_health_monitor():
    from cluster.config.kvstore import KVStoreConfig
    from serve.kv import open_store
    from serve.kv.connector import build_connector

    store = open_store(KVStoreConfig(enabled=True, backend="memory", capacity_bytes=4096))
    assert isinstance(store, MonitoredStore) and isinstance(store.backend, MemoryStore)
    assert store.capacity_bytes == 4096 and store.healthy
    assert build_connector(KVStoreConfig()) is None
