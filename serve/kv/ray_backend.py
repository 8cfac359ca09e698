"""The Ray backend: KV block records in Ray's object store behind one named, detached actor.

The actor (``KVStoreActor``, found or created with ``get_if_exists``) holds the LRU index and
OWNS the blocks, so they outlive the replica that computed them:

- ``mode="refs"`` (default): the publishing replica sends a batch of records in one call; the
  actor ``ray.put``s each one, so the objects live in the node's shared-memory object store and
  the actor owns them (``ray.put(_owner=...)`` is gone since Ray 2.56: owning means putting); a
  fetch asks the actor for the refs of a batch of keys in one call, then reads the objects from
  the object store.
- ``mode="bytes"``: the records stay in the actor's heap; a fetch is one call that returns them.

Eviction drops the actor's refs (``refs``) or bytes (``bytes``) past ``capacity_bytes``; Ray then
frees the objects. If the actor dies, every op fails (the health monitor turns the store into a
no-op and retries with backoff); the next probe creates a fresh, empty actor under the same name.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from serve.kv.store import LRUIndex, StoreStats

log = logging.getLogger("retort.kv")
_DEAD = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)


class StoreStarting(RuntimeError):
    """The store actor was (re)created and has not answered yet."""


class KVStoreActor:
    """The index (and, in bytes mode, the records). Threaded: ops on the index take a lock."""

    def __init__(self, capacity_bytes: int, mode: str = "refs") -> None:
        self.index = LRUIndex(capacity_bytes)
        self.mode = mode
        self.stats = StoreStats("ray", capacity_bytes, extra={"mode": mode})

    def put(self, items: list[tuple[bytes, bytes]]) -> int:
        for key, record in items:
            if self.index.get([key])[0] is not None:
                continue  # the same key is the same block: keep the stored one
            value = ray.put(record) if self.mode == "refs" else record  # refs: owned by this actor
            self.index.put(key, value, len(record))
            self.stats.puts += 1
            self.stats.bytes_in += len(record)
        return len(items)

    def get(self, keys: list[bytes]) -> list[Any]:
        """Refs (each wrapped in a list) or bytes, None where absent."""
        out = self.index.get(keys)
        hits = sum(1 for x in out if x is not None)
        self.stats.hits += hits
        self.stats.misses += len(out) - hits
        return [None if x is None else ([x] if isinstance(x, ray.ObjectRef) else x) for x in out]

    def get_stats(self) -> dict[str, Any]:
        s = self.stats
        s.used_bytes, s.num_blocks, s.evictions = self.index.used_bytes, len(self.index), self.index.evictions
        return s.as_dict()

    def clear(self) -> None:
        self.index.clear()


class RayStore:
    """Client of the store actor (``KVStore`` protocol); call from a Ray driver, task or actor."""

    name = "ray"

    def __init__(
        self,
        capacity_bytes: int,
        *,
        name: str = "retort-kv-store",
        namespace: str = "retort",
        mode: str = "refs",
        timeout_s: float = 0.5,
        put_timeout_s: float = 10.0,
    ) -> None:
        if mode not in ("refs", "bytes"):
            raise ValueError(f"ray store mode must be refs or bytes, got {mode!r}")
        if not ray.is_initialized():
            raise RuntimeError("the ray KV store needs a connected Ray driver or worker (ray.init)")
        self.capacity_bytes = capacity_bytes
        self.actor_name, self.namespace, self.mode = name, namespace, mode
        self.timeout_s, self.put_timeout_s = timeout_s, put_timeout_s
        self._actor: Any = None
        self._ready: Any = None  # ref that resolves once the actor answers
        self._lock = threading.Lock()
        try:  # find or create it now and wait for it: fail early on a misconfigured cluster
            self.actor()
        except StoreStarting:
            self._wait_ready(120.0)

    def _wait_ready(self, timeout_s: float) -> None:
        if self._ready is not None:
            ray.get(self._ready, timeout=timeout_s)
            self._ready = None

    def actor(self) -> Any:
        """The store actor; raises ``StoreStarting`` while a (re)created actor is not up yet, so a
        replacement's start-up time is spent in the health monitor's backoff, not in a request."""
        with self._lock:
            if self._actor is None:
                cls = ray.remote(KVStoreActor)
                self._actor = cls.options(
                    name=self.actor_name,
                    namespace=self.namespace,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                    max_concurrency=8,
                    max_restarts=0,
                ).remote(self.capacity_bytes, self.mode)
                self._ready = self._actor.get_stats.remote()
            if self._ready is not None:
                done, _ = ray.wait([self._ready], timeout=0)
                if not done:
                    raise StoreStarting(f"kv store actor {self.actor_name!r} is starting")
                ray.get(done[0])  # raises if it died while starting
                self._ready = None
            return self._actor

    def _forget_actor(self) -> None:
        with self._lock:
            self._actor = None  # the next op looks it up again (get_if_exists creates a new one)

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        try:
            actor = self.actor()
            found = ray.get(actor.get.remote(keys), timeout=self.timeout_s)
            if self.mode == "bytes":
                return found
            idx = [i for i, x in enumerate(found) if x is not None]
            values = ray.get([found[i][0] for i in idx], timeout=self.timeout_s) if idx else []
        except _DEAD:
            self._forget_actor()
            raise
        out: list[bytes | None] = [None] * len(keys)
        for i, val in zip(idx, values, strict=True):
            out[i] = val
        return out

    def put(self, items: list[tuple[bytes, bytes]]) -> None:
        try:
            actor = self.actor()
            ray.get(actor.put.remote(items), timeout=self.put_timeout_s)
        except _DEAD:
            self._forget_actor()
            raise

    def stats(self) -> StoreStats:
        d = ray.get(self.actor().get_stats.remote(), timeout=max(self.timeout_s, 5.0))
        return StoreStats(**d)

    def clear(self) -> None:
        ray.get(self.actor().clear.remote(), timeout=10)

    def close(self) -> None:
        """Detach from the actor (it stays up for the other replicas)."""
        self._actor = None

    def destroy(self) -> None:
        """Kill the shared actor (every replica loses the store until a new one is created)."""
        actor = self._actor or ray.get_actor(self.actor_name, namespace=self.namespace)
        ray.kill(actor, no_restart=True)
        self._forget_actor()
