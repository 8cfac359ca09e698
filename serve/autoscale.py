"""Our YAML's scaling and limit settings -> Ray Serve deployment options for the model server."""

from __future__ import annotations

from typing import Any

from cluster.config.serve import ServeConfig


def autoscaling_config(cfg: ServeConfig) -> dict[str, Any] | None:
    """Serve ``AutoscalingConfig`` fields, or None for a fixed-size deployment."""
    a = cfg.autoscaling
    if not a.enabled:
        return None
    out: dict[str, Any] = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
        "metrics_interval_s": a.metrics_interval_s,  # deprecated in Serve 2.60 but still honoured
    }
    if a.initial_replicas is not None:
        out["initial_replicas"] = a.initial_replicas
    return out


def model_server_options(cfg: ServeConfig) -> dict[str, Any]:
    """``Deployment.options(**...)`` for the model server: replicas, limits, resources, health."""
    r = cfg.replica
    opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.limits.max_ongoing_requests,
        "max_queued_requests": cfg.limits.max_queued_requests,
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "health_check_period_s": r.health_check_period_s,
        "graceful_shutdown_timeout_s": r.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    auto = autoscaling_config(cfg)
    if auto is not None:
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = cfg.autoscaling.min_replicas
    return opts


def ingress_options(cfg: ServeConfig) -> dict[str, Any]:
    """The ingress is async and light: it admits far more than the model servers and lets their
    handle queue (``max_queued_requests``) decide backpressure, which it maps to 503."""
    a = cfg.autoscaling
    admitted = cfg.limits.max_ongoing_requests * a.max_replicas + max(cfg.limits.max_queued_requests, 0)
    return {
        "num_replicas": cfg.replica.ingress_replicas,
        "max_ongoing_requests": max(admitted * 2, 64),
        "ray_actor_options": {"num_cpus": cfg.replica.ingress_num_cpus},
        "graceful_shutdown_timeout_s": cfg.replica.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
