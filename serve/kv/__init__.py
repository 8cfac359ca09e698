"""The KV block store shared by replicas: backends (Ray actor, Redis, in-process), a health
monitor that turns a failing store into a no-op, and the engine connector that publishes and
fetches blocks. ``open_store(cfg)`` builds the configured backend behind the health monitor."""

from __future__ import annotations

from serve.kv.store import BadBlock, BlockLayout, KVStore, StoreStats

__all__ = ["BadBlock", "BlockLayout", "KVStore", "StoreStats", "open_store"]


def open_store(cfg, *, redis_url: str | None = None) -> KVStore:  # noqa: ANN001 - KVStoreConfig
    """The configured backend wrapped in the health monitor (cfg: ``KVStoreConfig``)."""
    from serve.kv.health import MonitoredStore

    if cfg.backend == "memory":
        from serve.kv.memory_backend import MemoryStore

        backend: KVStore = MemoryStore(cfg.capacity_bytes)
    elif cfg.backend == "ray":
        from serve.kv.ray_backend import RayStore

        backend = RayStore(
            cfg.capacity_bytes,
            name=cfg.actor_name,
            namespace=cfg.namespace,
            mode=cfg.ray_mode,
            timeout_s=cfg.fetch_timeout_s,
        )
    else:
        from serve.kv.redis_backend import RedisStore

        backend = RedisStore(
            redis_url or cfg.redis_url or _cluster_redis_url(),
            cfg.capacity_bytes,
            prefix=cfg.namespace,
            timeout_s=cfg.fetch_timeout_s,
            manage_maxmemory=cfg.manage_redis_maxmemory,
        )
    return MonitoredStore(backend, cfg.health)


def _cluster_redis_url() -> str:
    from cluster.errors import ConfigError
    from cluster.local_cluster import redis_url

    url = redis_url()
    if url is None:
        raise ConfigError(
            "kv_store.backend is redis but kv_store.redis_url is unset and `retort up` runs no Redis "
            "(set redis.enabled: true in the cluster config)"
        )
    return url
