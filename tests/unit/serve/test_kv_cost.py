"""The connector's fetch-or-recompute cost model: the fits, the decision, and engines that follow it.

The store's speed is what is under test, so the slow store is a real ``MemoryStore`` whose ``get``
sleeps, and fetches are timed for real. The recompute side is what the test teaches: the per-token
cost of a fast (10 us/token: the tiny model on an idle core) or a slow (1 ms) model, fed through the cost model exactly as ``observe_prefill`` feeds it; the engine's own step
reports are dropped there (``Taught``), since on a shared CPU they measure the neighbours' load.
``test_engine_reports_prefill_steps`` checks those reports. Every engine's greedy output must equal
a full recompute whatever was decided."""

import random
import time

import pytest
import torch
from engine_helpers import random_prompts, reference_greedy, tiny_model

from cluster.config.engine import EngineConfig
from cluster.config.kvstore import FetchCostConfig, KVStoreConfig
from cluster.config.model import preset
from serve.engine import LLMEngine, SamplingParams
from serve.kv.connector import EWLinearFit, FetchCostModel, KVConnector
from serve.kv.memory_backend import MemoryStore
from serve.kv.store import BlockLayout

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
FAST_RECOMPUTE, SLOW_RECOMPUTE = 10e-6, 1e-3  # seconds per prefill token


@pytest.fixture(scope="module")
def ref():
    return tiny_model()


class SlowStore(MemoryStore):
    """A real in-process store whose every ``get`` takes ``delay`` seconds longer."""

    def __init__(self, delay: float) -> None:
        super().__init__(1 << 24)
        self.delay, self.gets = delay, 0

    def get(self, keys):
        self.gets += 1
        time.sleep(self.delay)
        return super().get(keys)


def cfg(policy: str = "cost", timeout: float = 2.0, **cost) -> KVStoreConfig:
    return KVStoreConfig(
        enabled=True,
        backend="memory",
        min_fetch_blocks=1,
        fetch_timeout_s=timeout,
        fetch_policy=policy,
        fetch_cost=FetchCostConfig(**cost),
    )


class Taught(KVConnector):
    """A connector whose recompute cost is only what the test teaches (``teach_recompute``)."""

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        pass  # the engine's reports: the shared CPU's load of the moment


def engine(store, c: KVStoreConfig, connector: type[KVConnector] = Taught) -> tuple[LLMEngine, KVConnector]:
    conn = connector(store, c)
    eng = LLMEngine(
        tiny_model(),
        EngineConfig(device="cpu", dtype="float32", num_blocks=64, block_size=16),
        kv_connector=conn,
    )
    return eng, conn


def teach_recompute(conn: KVConnector, s_per_token: float) -> None:
    """What the engine reports after prefill steps of 16..256 tokens (1 ms fixed per step)."""
    for n in (16, 64, 128, 256) * 2:
        conn.cost.observe_prefill(n, 1e-3 + s_per_token * n)


def published_prefix(store, blocks: int, seed: int) -> list[int]:
    """A prefix of ``blocks`` full blocks, computed and published by another engine."""
    prefix = random_prompts(1, blocks * 16, blocks * 16, seed=seed)[0]
    a, ca = engine(store, cfg())
    a.generate([prefix + [1]], GREEDY)
    assert ca.flush() and ca.stats.published_blocks >= blocks
    ca.close()
    return prefix


def ask(eng: LLMEngine, ref, prompt: list[int]) -> int:
    """Serve ``prompt`` with nothing cached locally; check it against a recompute; cached tokens."""
    eng.kv.pool.reset_prefix_cache()
    out = eng.generate([prompt], GREEDY)[0]
    assert out.token_ids == reference_greedy(ref, prompt, 4)
    return out.num_cached_tokens


# -- the fit -------------------------------------------------------------------------------------
def test_fit_recovers_line_from_noisy_steps():
    rng = random.Random(0)
    fit = EWLinearFit(0.0, 1e-3, window=32)
    assert (fit.a, fit.b) == (0.0, 1e-3)  # the prior until there is data
    for _ in range(200):
        x = rng.randrange(1, 2048)
        fit.observe(x, 7e-3 + 2e-6 * x + rng.uniform(-2e-4, 2e-4))
    assert fit.a == pytest.approx(7e-3, rel=0.05) and fit.b == pytest.approx(2e-6, rel=0.05)


def test_fit_without_spread_keeps_slope_and_fits_level():
    fit = EWLinearFit(0.0, 1e-6, window=8)
    for _ in range(20):
        fit.observe(1024, 0.009)  # every step the same size: the slope is not identifiable
    assert fit.b == 1e-6 and fit.a == pytest.approx(0.009 - 1024e-6)
    fit = EWLinearFit(0.0, 1e-4, window=8)  # a prior slope too steep for the level: through the origin
    fit.observe(1024, 0.009)
    assert fit.a == 0.0 and fit.b == pytest.approx(0.009 / 1024)


def test_fit_forgets_old_observations():
    fit = EWLinearFit(0.0, 0.0, window=4)
    for x in (100, 1000) * 10:
        fit.observe(x, 1e-3 * x)
    for x in (100, 1000) * 20:
        fit.observe(x, 1e-5 * x)
    assert fit.b == pytest.approx(1e-5, rel=0.01)


# -- the decision --------------------------------------------------------------------------------
def test_decision_compares_fetch_time_with_recompute_saved():
    m = FetchCostModel(FetchCostConfig(safety_factor=1.5, probe_every=100))
    for n in (100, 1000) * 4:
        m.observe_prefill(n, 5e-3 + 1e-5 * n)  # 10 us/token marginal
    m.observe_fetch(1_000_000, 2e-3)
    m.observe_fetch(10_000_000, 11e-3)  # 1 ms + 1 GB/s
    assert m.decide(tokens=1024, nbytes=1_000_000).fetch  # 2 ms * 1.5 < 10.2 ms
    d = m.decide(tokens=1024, nbytes=10_000_000)  # 11 ms * 1.5 > 10.2 ms
    assert not d.fetch and d.reason == "skip_cost"
    assert d.fetch_s == pytest.approx(11e-3) and d.saved_s == pytest.approx(10.24e-3)
    assert m.decide(tokens=1024, nbytes=1_000_000, upfront=True) is None  # the worker decides what remains
    assert m.decide(tokens=1024, nbytes=10_000_000, upfront=True).reason == "probe"  # after 1 skip
    # break-even at 1 MB per block of 100 tokens: 1.5 * (1 ms + n ms) < n ms never holds
    assert m.break_even_blocks(block_size=100, record_bytes=1_000_000) is None
    assert m.break_even_blocks(block_size=100, record_bytes=100_000) == 2  # 1.5 * (1 + 0.1n) < n from n = 2


def test_probes_back_off_to_probe_every_skips_and_reset_the_fetch_estimate():
    m = FetchCostModel(FetchCostConfig(probe_every=3))
    m.observe_prefill(100, 1e-3)
    m.observe_fetch(1000, 1.0)  # a slow store (or one slow first call)
    reasons = [m.decide(100, 1000).reason[0] for _ in range(14)]  # s(kip_cost), p(robe)
    assert "".join(reasons) == "sp" + "ssp" + "sssp" + "sssp" + "s"  # after 1, 2, then 3 skips
    m.observe_fetch(1000, 1e-5, probe=True)  # the store got fast: the probe replaces the stale history
    assert m.fetch(1000) < 2e-5 and m.decide(100, 1000).reason == "fetch"


def test_always_fetches_whatever_the_costs():
    m = FetchCostModel(FetchCostConfig(), policy="always")
    m.observe_prefill(100, 1e-6)
    m.observe_fetch(1000, 10.0)
    assert all(m.decide(100, 1000).reason == "fetch" for _ in range(50))


@pytest.mark.parametrize("preset_name", ["tiny", "small", "base"])
def test_cold_start_fetches_like_min_fetch_blocks_until_a_fetch_is_measured(preset_name):
    m = preset(preset_name)
    layout = BlockLayout(m.n_layers, 16, m.n_kv_heads, m.dim_head, torch.float32)
    c = KVStoreConfig()
    model = FetchCostModel(c.fetch_cost, c.fetch_policy)
    model.observe_prefill(1024, 1e-3)  # even a fast engine: the store's cost is unknown yet
    assert model.break_even_blocks(16, layout.record_bytes) == 1
    assert model.decide(16, layout.record_bytes).reason == "fetch"
    model.observe_fetch(layout.record_bytes, 5e-3)
    assert model.decide(16, layout.record_bytes).reason == "skip_cost"  # measured: now it is the model's call


def test_observe_prefill_refuses_bad_input():
    conn = KVConnector(MemoryStore(1 << 20), cfg())
    for bad in [(0, 1.0), (-3, 1.0), (10, -1.0), (10, float("nan")), (1.5, 1.0), (True, 1.0)]:
        with pytest.raises(ValueError, match="observe_prefill"):
            conn.observe_prefill(*bad)


# -- engines -------------------------------------------------------------------------------------
def test_slow_store_fast_recompute_stops_fetching(ref):
    store = SlowStore(delay=0.05)
    prefix = published_prefix(store, 12, seed=1)
    b, cb = engine(store, cfg(probe_every=100))
    teach_recompute(cb, FAST_RECOMPUTE)
    assert ask(b, ref, prefix + [7]) == 192  # cold start: the priors say fetch; it takes 50 ms
    assert cb.stats.decided_fetch == 1 and cb.estimates()["fetch_latency_s"] > 0.02
    gets = store.gets
    # recomputed, same tokens; the 2nd is the first probe (after 1 skip), which confirms the store is slow
    assert [ask(b, ref, prefix + [t]) for t in (8, 9, 10, 11)] == [0, 192, 0, 0]
    assert store.gets == gets + 1 and cb.stats.decided_fetch == 1
    assert cb.stats.decided_skip_cost == 3 and cb.stats.decided_probe == 1
    st = cb.stats.as_dict()
    be = st["cost_model"]["break_even_blocks"]
    assert st["decided_skip_cost"] == 3 and (be is None or be > 12)  # worth it for longer prefixes only
    assert st["cost_model"]["probe_after_skips"] == 2  # the probe still said slow: back off
    cb.close()


def test_fast_store_slow_recompute_fetches(ref):
    store = MemoryStore(1 << 24)
    prefix = published_prefix(store, 12, seed=2)
    b, cb = engine(store, cfg())
    teach_recompute(cb, SLOW_RECOMPUTE)  # 192 ms for 12 blocks; a fetch from memory: ~1 ms
    for tail in ([7], [8, 9], [10]):
        assert ask(b, ref, prefix + tail) == 192
    assert cb.stats.decided_fetch == 3 and cb.stats.decided_skip_cost == 0 and cb.stats.imported_blocks == 36
    est = cb.estimates()
    assert est["fetch_samples"] == 3 and est["break_even_blocks"] == 1
    cb.close()


def test_probe_notices_a_store_that_got_faster(ref):
    store = SlowStore(delay=0.5)
    prefix = published_prefix(store, 12, seed=3)
    b, cb = engine(store, cfg(probe_every=2))
    teach_recompute(cb, SLOW_RECOMPUTE)  # 192 ms for 12 blocks: far more than a fast fetch, less than 500 ms
    assert ask(b, ref, prefix + [7]) == 192  # cold start fetch: learns the store is slow
    assert [ask(b, ref, prefix + [t]) for t in (8, 9, 10, 11)] == [
        0,
        192,
        0,
        0,
    ]  # skip, probe (slow), 2 skips
    store.delay = 0.0  # the store gets fast; only a probe can tell
    assert ask(b, ref, prefix + [12]) == 192 and cb.stats.decided_probe == 2
    assert cb.estimates()["fetch_latency_s"] < 0.1
    assert ask(b, ref, prefix + [13]) == 192  # fetched on the cost model's word now
    assert cb.stats.decided_fetch == 2 and cb.stats.decided_skip_cost == 3
    cb.close()


def test_always_keeps_fetching_from_a_slow_store(ref):
    store = SlowStore(delay=0.05)
    prefix = published_prefix(store, 12, seed=4)
    b, cb = engine(store, cfg(policy="always"))
    teach_recompute(cb, FAST_RECOMPUTE)
    gets = store.gets
    for tail in ([7], [8], [9]):
        assert ask(b, ref, prefix + tail) == 192
    assert cb.stats.decided_fetch == 3 and cb.stats.decided_skip_cost == 0 and store.gets == gets + 3
    cb.close()


def test_timeout_teaches_that_the_store_is_slow(ref):
    store = SlowStore(delay=1.0)
    prefix = published_prefix(store, 12, seed=5)
    b, cb = engine(store, cfg(timeout=0.05, probe_every=100))
    teach_recompute(cb, FAST_RECOMPUTE)
    assert ask(b, ref, prefix + [7]) == 0 and cb.stats.fetch_timeouts == 1
    assert cb.estimates()["fetch_latency_s"] >= 0.04
    t0 = time.monotonic()
    assert ask(b, ref, prefix + [8]) == 0
    assert cb.stats.decided_skip_cost == 1 and cb.stats.fetch_timeouts == 1  # not asked, not waited for
    assert time.monotonic() - t0 < 1.0
    cb.close()


def test_engine_reports_prefill_steps():
    store = MemoryStore(1 << 24)
    eng, conn = engine(store, cfg(), connector=KVConnector)
    for prompt in random_prompts(4, 20, 200, seed=6):  # one at a time: steps of several sizes
        eng.generate([prompt], GREEDY)
    est = conn.estimates()
    assert est["recompute_samples"] >= 4
    assert est["recompute_s_per_token"] != FetchCostConfig().prior_recompute_s_per_token  # fitted
    conn.close()


def test_recompute_envelope_ignores_stalls():
    """Warm-up stalls (a compile on first use of a shape) do not tilt the recompute line: on an H200
    a least-squares fit took 40 us/token from them where the steps cost ~3 us/token."""
    from serve.kv.connector import EnvelopeFit

    fit = EnvelopeFit(0.0, 1e-6, window=32)
    fit.observe(1024, 0.009)  # one size only: prior slope, fitted level
    assert fit.b == 1e-6 and fit.a == pytest.approx(0.009 - 1024e-6)
    fit = EnvelopeFit(0.0, 1e-6, window=32)
    rng = random.Random(1)
    for i in range(60):
        n = rng.choice((17, 33, 65, 129, 257, 513, 1025))
        t = 2e-3 + 3e-6 * n + rng.uniform(0, 2e-4)
        if i % 7 == 0:
            t += rng.uniform(0.05, 1.0)  # a stall
        fit.observe(n, t)
    assert fit.b == pytest.approx(3e-6, rel=0.15) and fit.a == pytest.approx(2e-3, rel=0.15)
    assert len(fit.obs) == 32 and fit.n == 60
