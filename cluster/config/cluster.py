"""The local cluster ``retort up`` starts: a Ray head, Prometheus, and optionally Redis.

Every server binds 127.0.0.1 by default (Ray runs arbitrary code for whoever reaches its
dashboard: keep it on loopback, with token auth on). A port of 0 means "pick a free port at
``up`` time"; the chosen ports are recorded in ``$RETORT_HOME/cluster/state.json``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cluster.config.base import StrictModel

Port = int  # 0 = choose a free port when the cluster starts


def _port(default: int, what: str) -> Any:
    return Field(default, ge=0, le=65535, description=f"{what} (0 = a free port chosen at `retort up`).")


class RayHeadConfig(StrictModel):
    """The Ray head node (``ray start --head``), single machine."""

    gcs_port: Port = _port(6390, "GCS port; not Ray's default 6379, which Redis users expect free")
    dashboard_host: str = Field(
        "127.0.0.1", description="Address the dashboard and Jobs API bind to (keep loopback)."
    )
    dashboard_port: Port = _port(8265, "Dashboard / Jobs REST API port (RAY_API_SERVER_ADDRESS)")
    metrics_export_port: Port = _port(8080, "Port where the node serves Prometheus metrics (/metrics)")
    client_server_port: Port = _port(10001, "Ray Client server port (ray://)")
    node_manager_port: Port = _port(0, "Raylet node manager port")
    object_manager_port: Port = _port(0, "Object manager port")
    dashboard_agent_listen_port: Port = _port(
        0, "Dashboard agent HTTP port (Ray's default 52365 collides between heads)"
    )
    dashboard_agent_grpc_port: Port = _port(0, "Dashboard agent gRPC port")
    runtime_env_agent_port: Port = _port(0, "Runtime-env agent port")
    autoscaler_metrics_port: Port = _port(
        0, "Autoscaler's metrics port (AUTOSCALER_METRIC_PORT; Ray's 44217 collides between heads)"
    )
    dashboard_metrics_port: Port = _port(
        0, "Dashboard's own metrics port (DASHBOARD_METRIC_PORT; Ray's 44227 collides)"
    )
    min_worker_port: Port = _port(
        0, "Lowest worker port; 0 here or in max_worker_port = a free 200-port block"
    )
    max_worker_port: Port = _port(0, "Highest worker port")
    num_cpus: int = Field(
        4, ge=1, description="Logical CPUs Ray schedules (may exceed the cores: actors mostly wait)."
    )
    object_store_memory: int = Field(
        512 * 1024**2, ge=78 * 1024**2, description="Object store size in bytes (Ray's minimum is ~75 MiB)."
    )
    temp_dir: str | None = Field(
        None,
        description="Ray's --temp-dir (logs, sockets); default /tmp/retort-<uid>-<hash of "
        "RETORT_HOME>; must be short: Ray's socket paths are limited to 107 bytes.",
    )
    auth_token_path: str | None = Field(
        None,
        description="Token file for Ray's token auth; default Ray's own "
        "~/.ray/auth_token (created if missing), so plain `ray` commands find it.",
    )
    startup_timeout_s: float = Field(
        120.0, gt=0, description="Give up if the head is not answering after this."
    )

    @field_validator("temp_dir")
    @classmethod
    def _short(cls, v: str | None) -> str | None:
        if v is not None and len(v) > 40:
            raise ValueError(
                f"temp_dir must be at most 40 characters (Ray's socket paths are length-limited), got {len(v)}"
            )
        return v


class PrometheusConfig(StrictModel):
    """Prometheus as a plain process scraping Ray's metrics (Ray's Serve and ray.util.metrics included)."""

    enabled: bool = Field(True, description="Start Prometheus with the cluster.")
    binary: str = Field("prometheus", description="Prometheus executable (looked up on PATH, then /usr/bin).")
    host: str = Field("127.0.0.1", description="Address Prometheus's web UI and API bind to.")
    port: Port = _port(9090, "Prometheus web / API port")
    scrape_interval: str = Field("5s", pattern=r"^\d+(ms|s|m)$", description="How often targets are scraped.")
    retention: str = Field(
        "15d",
        pattern=r"^\d+(h|d|w|y)$",
        description="How long samples are kept (--storage.tsdb.retention.time).",
    )
    data_dir: str | None = Field(None, description="TSDB directory; default $RETORT_HOME/prometheus.")
    extra_targets: list[str] = Field(
        default_factory=list, description="More host:port /metrics endpoints to scrape (job 'retort-extra')."
    )
    startup_timeout_s: float = Field(
        30.0, gt=0, description="Give up if /-/ready does not answer after this."
    )


class RedisConfig(StrictModel):
    """Redis, the external backend of the shared KV store (off unless a serve config uses it)."""

    enabled: bool = Field(False, description="Start redis-server with the cluster.")
    binary: str = Field(
        "redis-server", description="redis-server executable (looked up on PATH, then /usr/bin)."
    )
    host: str = Field("127.0.0.1", description="Address Redis binds to.")
    port: Port = _port(6400, "Redis port; not 6379, where Ray's GCS and system Redis usually sit")
    maxmemory: str = Field(
        "256mb", pattern=r"^\d+(b|kb|mb|gb)?$", description="Memory cap (KV blocks are evicted past it)."
    )
    maxmemory_policy: Literal["allkeys-lru", "allkeys-lfu", "volatile-lru", "noeviction"] = Field(
        "allkeys-lru", description="What Redis evicts at maxmemory (LRU suits a cache)."
    )
    startup_timeout_s: float = Field(15.0, gt=0, description="Give up if PING does not answer after this.")


class ServeHTTPDefaults(StrictModel):
    """Where Serve's HTTP proxy listens by default on this cluster (Serve starts with the first deploy)."""

    http_host: str = Field("127.0.0.1", description="Serve HTTP proxy address.")
    http_port: Port = _port(8000, "Serve HTTP proxy port")
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="What answers Serve's HTTP port: Serve's proxy actor, or Ray 2.60's HAProxy ingress "
        "(HAProxy -> the replicas' own HTTP servers; `python -m serve.bench_http --ingress proxy,haproxy`).",
    )


class ClusterConfig(StrictModel):
    """``retort up -c configs/cluster/local.yaml [key=value ...]``. State lives in $RETORT_HOME/cluster."""

    ray: RayHeadConfig = Field(default_factory=RayHeadConfig, description="The Ray head.")
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig, description="Prometheus.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis (optional).")
    serve: ServeHTTPDefaults = Field(default_factory=ServeHTTPDefaults, description="Serve HTTP defaults.")
