"""The Redis backend: one ``MGET`` per fetch, one pipelined batch of ``SET`` per publish.

Capacity and LRU are Redis's own: with ``manage_maxmemory`` the client sets ``maxmemory`` to the
store capacity and ``maxmemory-policy allkeys-lru`` when it connects (``retort up`` starts Redis
with both already; turn it off on a Redis shared with other users). Keys are
``<namespace>:kv:<48-byte key>``. Socket timeouts are the fetch timeout, so a hung Redis fails
fast and the health monitor takes it out of the path.
"""

from __future__ import annotations

import logging
from typing import Any

from serve.kv.store import StoreStats

log = logging.getLogger("retort.kv")


class RedisStore:
    name = "redis"

    def __init__(
        self,
        url: str,
        capacity_bytes: int,
        *,
        prefix: str = "retort",
        timeout_s: float = 0.5,
        put_timeout_s: float = 5.0,
        manage_maxmemory: bool = True,
    ) -> None:
        import redis

        self.url = url
        self.capacity_bytes = capacity_bytes
        self.prefix = prefix.encode() + b":kv:"
        self.manage_maxmemory = manage_maxmemory
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.put_client = redis.Redis.from_url(
            url, socket_timeout=put_timeout_s, socket_connect_timeout=timeout_s
        )
        self._configured = False
        self._stats = StoreStats(self.name, capacity_bytes)
        try:
            self._configure()
        except redis.RedisError as e:  # not fatal: the health monitor keeps retrying the store
            log.warning("redis KV store at %s not reachable yet: %s", url, e)

    def _configure(self) -> None:
        if self.manage_maxmemory and not self._configured:
            self.put_client.config_set("maxmemory", self.capacity_bytes)
            self.put_client.config_set("maxmemory-policy", "allkeys-lru")
        self._configured = True

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        values = self.client.mget([self.prefix + k for k in keys])
        hits = [v for v in values if v is not None]
        self._stats.hits += len(hits)
        self._stats.misses += len(values) - len(hits)
        self._stats.bytes_out += sum(len(v) for v in hits)
        return [v if isinstance(v, bytes) else None for v in values]  # bytes (no decode_responses)

    def put(self, items: list[tuple[bytes, bytes]]) -> None:
        if not self._configured:
            self._configure()
        pipe = self.put_client.pipeline(transaction=False)
        for key, record in items:
            pipe.set(self.prefix + key, record)
        pipe.execute()
        self._stats.puts += len(items)
        self._stats.bytes_in += sum(len(r) for _, r in items)

    def stats(self) -> StoreStats:
        info: dict[str, Any] = self.put_client.info()
        s = StoreStats(**self._stats.as_dict())
        s.used_bytes = int(info.get("used_memory", 0))
        s.evictions = int(info.get("evicted_keys", 0))
        s.num_blocks = int(self.put_client.dbsize())
        s.extra = {
            "maxmemory": int(info.get("maxmemory", 0)),
            "maxmemory_policy": info.get("maxmemory_policy"),
        }
        return s

    def clear(self) -> None:
        for key in self.put_client.scan_iter(match=self.prefix + b"*", count=1000):
            self.put_client.delete(key)

    def close(self) -> None:
        self.client.close()
        self.put_client.close()
