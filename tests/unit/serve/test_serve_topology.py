"""The app topologies: config validation, and what ``build_app`` deploys for each (no Ray cluster:
``build_app`` only builds the application graph)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.config.serve import ServeConfig
from cluster.errors import ConfigError
from serve.app import INGRESS, MODEL_SERVER, build_app, collocated_options, load_serve_config
from serve.autoscale import model_server_options

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))


def test_cache_aware_routing_needs_the_split_topology():
    assert ServeConfig.model_validate({}).topology == "split"
    with pytest.raises(ValueError, match="cache_aware needs topology split"):
        ServeConfig.model_validate({"topology": "collocated", "router": {"policy": "cache_aware"}})
    with pytest.raises(ConfigError, match="cache_aware needs topology split"):
        load_serve_config({"topology": "collocated", "router.policy": "cache_aware"})
    with pytest.raises(ConfigError):
        load_serve_config({"topology": "sideways"})


def test_collocated_replicas_admit_more_than_their_own_limit():
    cfg = ServeConfig.model_validate(
        {
            "topology": "collocated",
            "limits": {"max_ongoing_requests": 8, "max_queued_requests": 40},
            "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        }
    )
    opts = collocated_options(cfg, model_server_options(cfg))
    assert (
        opts["max_ongoing_requests"] == 96 and opts["max_queued_requests"] == -1
    )  # the replica answers 503 itself
    assert opts["autoscaling_config"]["max_replicas"] == 3  # the model server's autoscaling, unchanged


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    from serve_support import publish_tiny

    tmp = tmp_path_factory.mktemp("topology")
    publish_tiny(tmp / "registry", tmp)
    return tmp / "registry"


def _deployments(app) -> dict[str, object]:
    """name -> Deployment of an Application graph (its init args hold the downstream applications)."""
    found, todo = {}, [app._bound_deployment]
    while todo:
        dep = todo.pop()
        found[dep.name] = dep
        todo += [a._bound_deployment for a in dep.init_args if hasattr(a, "_bound_deployment")]
    return found


@pytest.mark.parametrize(
    "topology,expected", [("split", {INGRESS, MODEL_SERVER}), ("collocated", {MODEL_SERVER})]
)
def test_build_app_per_topology(registry, topology, expected):
    args = {
        "registry.root": str(registry),
        "registry.cache_dir": str(registry / ".cache"),
        "topology": topology,
        "autoscaling.max_replicas": 2,
    }
    deps = _deployments(build_app(args))
    assert set(deps) == expected
    server = deps[MODEL_SERVER]
    assert (
        server._deployment_config.autoscaling_config.max_replicas == 2
    )  # the engine replicas autoscale either way
    # collocated: the Ingress class under the model server's name, with no handle (the engine lives in it)
    assert len(server.init_args) == (2 if topology == "collocated" else 1)
    assert topology == "split" or server.init_args[0] is None


def test_bench_http_puts_replica_env_on_every_deployment(registry):
    """``python -m serve.bench_http --replica-env K=V`` measures a variant whose replicas all carry K=V."""
    from serve.bench_http import _with_env

    args = {
        "registry.root": str(registry),
        "registry.cache_dir": str(registry / ".cache"),
        "topology": "split",
    }
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    before = _deployments(build_app(args))
    after = _deployments(_with_env(build_app(args), env))
    assert set(after) == {INGRESS, MODEL_SERVER}
    for name, dep in after.items():
        assert dep.ray_actor_options["runtime_env"]["env_vars"] == env
        assert dep.ray_actor_options["num_cpus"] == before[name].ray_actor_options["num_cpus"]
        assert (
            dep._deployment_config.max_ongoing_requests
            == before[name]._deployment_config.max_ongoing_requests
        )
    assert "runtime_env" not in (before[MODEL_SERVER].ray_actor_options or {})  # the app itself sets none
