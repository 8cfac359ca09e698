"""The cache-aware routing policy, and the Serve router adapter driven with fake replicas."""

import asyncio
import random

import pytest

pytest.importorskip("ray")  # the GPU host (`pytest -m gpu`) has no Ray
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from cluster.config.kvstore import RouterConfig
from serve.router import (
    CacheAwarePolicy,
    CacheAwareRouter,
    PrefixIndex,
    prompt_block_hashes,
    prompt_of,
    router_options,
)

BS = 4
CFG = RouterConfig(policy="cache_aware", imbalance_abs=4, imbalance_rel=1.5, min_match_ratio=0.25)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_block_hashes_are_chained_salted_and_deterministic():
    t = tokens(0, 40)
    h = prompt_block_hashes(t, BS)
    assert len(h) == 10 and h == prompt_block_hashes(list(t), BS)
    assert prompt_block_hashes(t[:21], BS) == h[:5]  # a prefix's hashes are a prefix
    assert prompt_block_hashes(t, BS, "tenant")[0] != h[0]
    other = t[:8] + [t[8] + 1] + t[9:]
    assert prompt_block_hashes(other, BS)[:2] == h[:2] and prompt_block_hashes(other, BS)[2:] != h[2:]


def test_prefix_index_lru_cap():
    idx = PrefixIndex(max_blocks=5)
    a, b = prompt_block_hashes(tokens(1, 16), BS), prompt_block_hashes(tokens(2, 16), BS)
    idx.insert(a)
    idx.insert(b)
    assert len(idx) == 5 and idx.match(b) == 4 and idx.match(a) == 0  # a's oldest blocks went first


def test_policy_sends_shared_prefix_to_its_replica_and_spreads_new_ones():
    pol = CacheAwarePolicy(CFG)
    reps = ["r0", "r1", "r2"]
    loads = dict.fromkeys(reps, 0)
    systems = [tokens(100 + i, 32) for i in range(3)]
    owner = {}
    for i, sys_prompt in enumerate(systems):  # three new prefixes land on three different replicas
        h = prompt_block_hashes(sys_prompt + tokens(i, 8), BS)
        d = pol.choose(reps, loads, h)
        assert d.reason == "new_prefix"
        owner[i] = d.ranked[0][0]
        pol.record(owner[i], h)
    assert sorted(owner.values()) == reps
    for i, sys_prompt in enumerate(systems):  # later requests with the same prefix follow it
        d = pol.choose(reps, {**loads, owner[i]: 2}, prompt_block_hashes(sys_prompt + tokens(50 + i, 12), BS))
        assert (d.reason, d.ranked[0], d.matched_blocks) == ("prefix", [owner[i]], 8)
        assert sorted(d.ranked[1]) == sorted(r for r in reps if r != owner[i])


def test_policy_falls_back_to_least_loaded_when_imbalanced():
    pol = CacheAwarePolicy(CFG)
    h = prompt_block_hashes(tokens(7, 40), BS)
    pol.record("hot", h)
    assert pol.choose(["hot", "cold"], {"hot": 4, "cold": 0}, h).ranked[0] == ["hot"]  # 4 - 0 is not > 4
    d = pol.choose(["hot", "cold"], {"hot": 9, "cold": 2}, h)
    assert (d.reason, d.ranked) == ("imbalanced", [["cold"], ["hot"]])
    assert pol.choose(["hot", "cold"], {"hot": 20, "cold": 15}, h).reason == "prefix"  # 20 < 1.5 * 15


def test_policy_min_match_ratio():
    pol = CacheAwarePolicy(CFG)
    shared = tokens(8, 8)
    pol.record("a", prompt_block_hashes(shared + tokens(9, 8), BS))
    pol.record("b", prompt_block_hashes(tokens(10, 40), BS))
    pol.record("b", prompt_block_hashes(tokens(11, 40), BS))
    h = prompt_block_hashes(shared + tokens(12, 40), BS)  # 2 of 12 blocks match "a": below 0.25
    d = pol.choose(["a", "b"], {"a": 0, "b": 0}, h)
    assert d.reason == "new_prefix" and d.ranked[0] == ["a"]  # the replica that has seen less


# -- the Serve adapter with fake replicas -------------------------------------------------------------
DEP = DeploymentID(name="ModelServer", app_name="retort")


class FakeReplica:
    def __init__(self, name: str, queue_len: int = 0) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEP)
        self.node_id, self.availability_zone = "node", None
        self.multiplexed_model_ids: set[str] = set()
        self.max_ongoing_requests = 16
        self.routing_stats: dict = {}
        self.queue_len = queue_len

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len

    def push_proxy_handle(self, handle) -> None:
        pass


def request(prompt: list[int], method: str = "generate", salt: str | None = None) -> PendingRequest:
    rid = f"req-{random.random()}"
    meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method=method)
    return PendingRequest(args=[rid, prompt, {"max_tokens": 4}, salt], kwargs={}, metadata=meta)


def make_router(replicas, **cfg) -> CacheAwareRouter:
    r = CacheAwareRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(
        router={"policy": "cache_aware", "imbalance_abs": 2, "imbalance_rel": 1.5, **cfg}, block_size=BS
    )
    r.update_replicas(replicas)
    return r


def test_router_routes_shared_prefix_and_tracks_inflight():
    async def run():
        reps = [FakeReplica("a"), FakeReplica("b")]
        router = make_router(reps)
        sys_prompt = tokens(20, 32)
        first = request(sys_prompt + [1, 2, 3])
        ranked = await router.choose_replicas(reps, first)
        owner = ranked[0][0]
        router.on_request_routed(first, owner.replica_id, None)
        assert router.inflight[owner.replica_id] == 1
        for i in range(2):  # within the imbalance threshold the prefix wins
            pr = request(sys_prompt + tokens(30 + i, 6))
            ranked = await router.choose_replicas(reps, pr)
            assert ranked[0] == [owner] and ranked[1] != [owner]
            router.on_request_routed(pr, owner.replica_id, None)
        pr = request(sys_prompt + tokens(40, 6))  # owner has 3 in flight, the other 0: imbalanced
        assert (await router.choose_replicas(reps, pr))[0] != [owner]
        for rid in list(router._routed):
            router.on_request_completed(owner.replica_id, rid)
        assert router.inflight[owner.replica_id] == 0
        assert (await router.choose_replicas(reps, pr))[0] == [owner]

    asyncio.run(run())


def test_router_salt_separates_tenants_and_other_methods_use_pow2():
    async def run():
        reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
        router = make_router(reps)
        p = tokens(50, 40)
        assert prompt_of(request(p, salt="t1")) == (p, "t1") and prompt_of(request(p, method="info")) is None
        r1 = request(p, salt="t1")
        owner = (await router.choose_replicas(reps, r1))[0][0]
        router.on_request_routed(r1, owner.replica_id, None)
        assert (await router.choose_replicas(reps, request(p, salt="t1")))[0] == [owner]
        other = (await router.choose_replicas(reps, request(p, salt="t2")))[0][0]
        assert other != owner  # another tenant's identical prompt is a new prefix
        ranked = await router.choose_replicas(reps, request(p, method="stats"))
        assert len(ranked) == 1 and len(ranked[0]) == 2  # power of two choices

    asyncio.run(run())


def test_router_forgets_dead_and_removed_replicas():
    async def run():
        reps = [FakeReplica("a"), FakeReplica("b")]
        router = make_router(reps)
        pr = request(tokens(60, 40))
        owner = (await router.choose_replicas(reps, pr))[0][0]
        router.on_request_routed(pr, owner.replica_id, None)
        router.on_replica_actor_died(owner.replica_id)
        assert owner.replica_id not in router.policy.indexes
        rest = [r for r in reps if r is not owner]
        router.update_replicas(rest)
        assert (await router.choose_replicas(rest, request(tokens(60, 40))))[0] == rest

    asyncio.run(run())


def test_router_options():
    assert router_options(RouterConfig(), 16) is None
    opts = router_options(RouterConfig(policy="cache_aware"), 16)
    assert opts["request_router_class"] == "serve.router:CacheAwareRouter"
    assert opts["request_router_kwargs"]["block_size"] == 16


@pytest.mark.parametrize("policy", ["pow2"])
def test_router_policy_switch_off(policy):
    async def run():
        reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
        router = make_router(reps, policy=policy)
        ranked = await router.choose_replicas(reps, request(tokens(70, 40)))
        assert len(ranked) == 1 and len(ranked[0]) == 2 and not router.policy.indexes

    asyncio.run(run())
