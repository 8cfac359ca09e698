"""The Serve application builder: ``serve.app:build_app``.

Works the three ways Serve runs apps::

    serve run serve.app:build_app config=configs/serve/tiny.yaml model.ref=student:3
    serve deploy serve-config.yaml          # applications[].args = {"serve_config": {...}}
    retort serve deploy -c configs/serve/tiny.yaml   # builds that Serve config and deploys it

``args`` may hold ``config`` (a YAML path), ``serve_config`` (a whole config mapping, what
``retort serve deploy`` sends) and dotted overrides (``model.ref: student:3``); overrides win.
The model reference is pinned to one registry version here and passed to the deployments as
init args: re-deploying after a promotion changes them, so Serve rolls the replicas over (new
ones up, then old ones drained).

Two topologies (``topology`` in the config):

* ``split`` (default): Serve's proxy -> ``Ingress`` replicas (HTTP, tokenization) -> ``ModelServer``
  replicas (engine) through a ``DeploymentHandle``. The handle's request router sees token ids, so
  the cache-aware router can send a prompt where its prefix is cached; ingress and engines scale
  apart. Costs one more process hop per request (Ray Serve LLM's default layout).
* ``collocated``: Serve's proxy -> ``ModelServer`` replicas that serve HTTP themselves (the
  ``Ingress`` class hosting the engine in-process; vLLM's API server + engine layout, and Ray Serve
  LLM's "direct streaming"). One hop less; the autoscaling, limits and resources are the model
  server's, but the proxy routes by load only (power of two choices): cache-aware routing needs
  ``split`` (the config refuses the combination).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config.base import _coerce, build, deep_merge, load_yaml
from cluster.config.serve import ServeConfig
from cluster.errors import ConfigError
from serve.autoscale import ingress_options, model_server_options
from serve.router import router_options

MODEL_SERVER = "ModelServer"
INGRESS = "Ingress"


def load_serve_config(args: dict[str, Any] | None) -> ServeConfig:
    """``build_app`` args -> a validated ``ServeConfig`` (one-line ConfigError otherwise)."""
    args = dict(args or {})
    path = args.pop("config", None)
    inline = args.pop("serve_config", None)
    if inline is not None and not isinstance(inline, dict):
        raise ConfigError(f"build_app arg serve_config must be a mapping, got {type(inline).__name__}")
    data: dict[str, Any] = load_yaml(path) if path else {}
    data = deep_merge(data, inline or {})
    overrides: dict[str, Any] = {}
    for (
        key,
        value,
    ) in args.items():  # `serve run ... k=v` gives strings (parsed as YAML); a Serve YAML typed values
        _set_dotted(overrides, key, _coerce(value) if isinstance(value, str) else value)
    data = deep_merge(data, overrides)
    return build(ServeConfig, data, str(path) if path else "build_app args")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"build_app arg {key!r} conflicts with another argument")
    tree[last] = value


def pin_model(cfg: ServeConfig) -> ServeConfig:
    """Rewrite ``model.ref`` (an alias, or a bare name = latest) as the exact ``name:version``
    it points to now, so every replica of this deployment serves the same weights."""
    from cluster.registry import open_registry

    ref = open_registry(cfg.registry).ref(cfg.model.ref)
    pinned = cfg.model_copy(deep=True)
    pinned.model.ref = str(ref)
    if pinned.model.served_name is None:
        pinned.model.served_name = cfg.model.public_name
    return pinned


def build_app(args: dict[str, Any] | None = None) -> Application:
    from serve.ingress import Ingress
    from serve.server import ModelServer

    cfg = pin_model(load_serve_config(args))
    config = cfg.model_dump(mode="json")
    options = model_server_options(cfg)
    if cfg.topology == "collocated":
        return (
            serve.deployment(Ingress, name=MODEL_SERVER)
            .options(**collocated_options(cfg, options))
            .bind(None, config)
        )
    routing = router_options(cfg.router, cfg.engine.block_size)  # cache-aware router when configured
    if routing is not None:
        options["request_router_config"] = routing
    server = serve.deployment(ModelServer, name=MODEL_SERVER).options(**options).bind(config)
    ingress = serve.deployment(Ingress, name=INGRESS).options(**ingress_options(cfg))
    return ingress.bind(server, config)


def collocated_options(cfg: ServeConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The model server's options for a replica that also serves HTTP. The replica itself admits
    ``max_ongoing_requests + max_queued_requests`` generations and answers 503 (OpenAI-style, with
    Retry-After) past that, so Serve must hand it more than that: cheap routes (/health, 4xx
    answers) and the requests it refuses pass through the same slots."""
    lim = cfg.limits
    admitted = lim.max_ongoing_requests + max(lim.max_queued_requests, 0)
    return {**options, "max_ongoing_requests": max(2 * admitted, 64), "max_queued_requests": -1}
