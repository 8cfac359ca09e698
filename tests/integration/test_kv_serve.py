"""The real Serve app with two model-server replicas, the cache-aware router and the shared KV
store (Ray actor backend): new prefixes spread over the replicas, requests sharing a prefix
follow it (every follower reports cached prompt tokens), both replicas publish to the store."""

from __future__ import annotations

import contextlib
import uuid

import httpx
import pytest
from serve_support import ServeInstance, publish_tiny, serve_args

pytestmark = pytest.mark.integration

APP = "kvapp"


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv_serve")
    registry = tmp / "registry"
    publish_tiny(registry, tmp)
    inst = ServeInstance(ray_cluster)
    actor = f"kv-serve-{uuid.uuid4().hex[:6]}"
    try:
        url = inst.deploy(
            serve_args(
                registry,
                **{
                    "app_name": APP,
                    "route_prefix": "/kv",
                    "autoscaling.min_replicas": 2,
                    "autoscaling.max_replicas": 2,
                    "replica.num_cpus": 0.25,
                    "router.policy": "cache_aware",
                    "router.routing_stats_period_s": 1.0,
                    "kv_store.enabled": True,
                    "kv_store.backend": "ray",
                    "kv_store.actor_name": actor,
                    "kv_store.namespace": "retort-test",
                    "kv_store.capacity_bytes": 32 << 20,
                    "kv_store.fetch_timeout_s": 2.0,
                },
            )
        )
        yield url
    finally:
        import ray

        with contextlib.suppress(ValueError):  # never created
            ray.kill(ray.get_actor(actor, namespace="retort-test"), no_restart=True)
        inst.close()


def complete(url: str, prompt: str) -> dict:
    r = httpx.post(
        url + "/v1/completions",
        timeout=60,
        json={"model": "student", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    return r.json()


def replica_stats(n_replicas: int = 2, tries: int = 40) -> dict[str, dict]:
    """Each replica's ``stats()`` (the stats call is routed by power of two: ask until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name=APP)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        st = handle.stats.remote().result(timeout_s=30)
        seen[st["replica"]] = st
        if len(seen) == n_replicas:
            break
    return seen


def test_cache_aware_router_and_shared_store(app):
    families = ["The quick brown fox jumps over the lazy dog. " * 6, "def add(a, b):\n    return a + b\n" * 8]
    for fam in families:
        first = complete(app, fam + "Question zero?")
        assert first["usage"]["prompt_tokens"] > 48
        for i in range(4):  # followers share the prefix: the router sends them where it is cached
            u = complete(app, fam + f"Question {i + 1} is different?")["usage"]
            assert u["prompt_tokens_details"]["cached_tokens"] >= 32, u
    stats = replica_stats()
    assert len(stats) == 2
    for st in stats.values():  # the two new prefixes went to two replicas; each one's followers hit there
        assert st["num_finished"] == 5 and st["prefix_hits"] >= 4 * 32, st
        assert st["kv_connector"]["published_blocks"] > 0, st  # and both published to the shared store


def test_killing_the_store_actor_under_load_fails_nothing(app):
    from concurrent.futures import ThreadPoolExecutor

    import ray

    base = "Sphinx of black quartz, judge my vow. " * 6
    prompts = [base + f"Item {i}?" for i in range(8)]
    before = [complete(app, p)["choices"][0]["text"] for p in prompts]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("kv-serve-")]
    assert len(actors) == 1
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    fresh = ["Pack my box with five dozen liquor jugs. " * 5 + f"Row {i}." for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # the same prompts again plus new ones, concurrently, store gone
        after = list(pool.map(lambda p: complete(app, p)["choices"][0]["text"], prompts + fresh))
    assert after[: len(prompts)] == before  # every request answered (complete() asserts 200), same text
    assert all(isinstance(t, str) for t in after[len(prompts) :])
