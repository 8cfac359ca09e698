"""The store's health monitor (LMCache style): a store that fails never fails a request.

``MonitoredStore`` wraps any backend. An op that raises, returns the wrong number of records or
takes longer than ``slow_op_s`` marks the store DOWN for a backoff that doubles on each
consecutive failure (``backoff_initial_s`` .. ``backoff_max_s``). While down, ``get`` answers
"nothing cached" and ``put`` drops its blocks at once, so requests recompute and publishing
costs nothing. When the backoff has passed, exactly one op goes through as a probe: success
marks the store UP again, failure doubles the backoff. Metrics (``cluster.metrics``): hits,
misses, bytes in/out, fetch latency, evictions (backend-reported deltas), errors by op.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cluster import metrics as M
from cluster.config.kvstore import StoreHealthConfig
from serve.kv.store import KVStore, StoreStats

log = logging.getLogger("retort.kv")


class StoreMetrics:
    """The KV-store metrics of ``cluster.metrics`` for one backend."""

    def __init__(self, backend: str) -> None:
        tags = {"backend": backend}
        self.hits, self.misses = M.make(M.STORE_HITS, tags), M.make(M.STORE_MISSES, tags)
        self.bytes_in, self.bytes_out = M.make(M.STORE_BYTES_IN, tags), M.make(M.STORE_BYTES_OUT, tags)
        self.fetch_latency, self.evictions = (
            M.make(M.STORE_FETCH_LATENCY, tags),
            M.make(M.STORE_EVICTIONS, tags),
        )
        self._backend = backend
        self._errors: dict[str, Any] = {}
        self._evictions_seen = 0

    def error(self, op: str) -> None:
        if op not in self._errors:
            self._errors[op] = M.make(M.STORE_ERRORS, {"backend": self._backend, "op": op})
        self._errors[op].inc(1)


class MonitoredStore:
    """A ``KVStore`` that turns its backend's failures into no-ops with backoff (see module doc)."""

    def __init__(
        self,
        backend: KVStore,
        cfg: StoreHealthConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: bool = True,
    ) -> None:
        self.backend = backend
        self.cfg = cfg or StoreHealthConfig()
        self.name = backend.name
        self.capacity_bytes = backend.capacity_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0  # consecutive
        self._down_until: float | None = None  # None: up
        self._probing = False
        self.num_errors: dict[str, int] = {}
        self.num_skipped = 0  # ops answered as no-ops while down
        self.last_error: str | None = None
        self.metrics = StoreMetrics(backend.name) if metrics else None

    # -- state -------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._down_until is None

    @property
    def available(self) -> bool:
        """Up, or down with its backoff elapsed (the next op will be the probe)."""
        down_until = self._down_until
        return down_until is None or self._clock() >= down_until

    def _admit(self) -> bool:
        with self._lock:
            if self._down_until is None:
                return True
            if self._clock() >= self._down_until and not self._probing:
                self._probing = True  # this op is the probe
                return True
            self.num_skipped += 1
            return False

    def _succeeded(self, op: str, elapsed: float) -> None:
        if elapsed > self.cfg.slow_op_s:
            self._failed(op, f"{op} took {elapsed:.3f} s (slow_op_s {self.cfg.slow_op_s:g})")
            return
        with self._lock:
            if self._down_until is not None:
                log.warning("kv store %s is back up", self.name)
            self._failures, self._down_until, self._probing = 0, None, False

    def _failed(self, op: str, why: str) -> None:
        with self._lock:
            self._failures += 1
            backoff = min(self.cfg.backoff_initial_s * 2 ** (self._failures - 1), self.cfg.backoff_max_s)
            self._down_until = self._clock() + backoff
            self._probing = False
            self.num_errors[op] = self.num_errors.get(op, 0) + 1
            self.last_error = why
        log.warning("kv store %s marked down for %.1f s after %s failure: %s", self.name, backoff, op, why)
        if self.metrics is not None:
            self.metrics.error(op)

    # -- ops ---------------------------------------------------------------------------------
    def get(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys or not self._admit():
            return [None] * len(keys)
        t0 = self._clock()
        try:
            out = self.backend.get(keys)
            if not isinstance(out, list) or len(out) != len(keys):
                raise ValueError(
                    f"get returned {type(out).__name__} of {len(out) if hasattr(out, '__len__') else '?'} "
                    f"records for {len(keys)} keys"
                )
        except Exception as e:  # noqa: BLE001 - any store failure = recompute
            self._failed("get", f"{type(e).__name__}: {e}")
            return [None] * len(keys)
        elapsed = self._clock() - t0
        self._succeeded("get", elapsed)
        if self.metrics is not None:
            hits = [r for r in out if r is not None]
            self.metrics.fetch_latency.observe(elapsed)
            if hits:
                self.metrics.hits.inc(len(hits))
                self.metrics.bytes_out.inc(sum(len(r) for r in hits))
            if len(hits) < len(out):
                self.metrics.misses.inc(len(out) - len(hits))
        return out

    def put(self, items: list[tuple[bytes, bytes]]) -> bool:
        """True if the backend took the batch; False when down or failed (blocks dropped)."""
        if not items or not self._admit():
            return False
        t0 = self._clock()
        try:
            self.backend.put(items)
        except Exception as e:  # noqa: BLE001
            self._failed("put", f"{type(e).__name__}: {e}")
            return False
        self._succeeded("put", self._clock() - t0)
        if self.metrics is not None:
            self.metrics.bytes_in.inc(sum(len(r) for _, r in items))
        return True

    def stats(self) -> StoreStats:
        extra: dict[str, Any] = {
            "healthy": self.healthy,
            "errors_by_op": dict(self.num_errors),
            "skipped_while_down": self.num_skipped,
            "last_error": self.last_error,
        }
        if self.healthy:
            try:
                s = self.backend.stats()
                s.extra.update(extra)
                self._report_evictions(s.evictions)
                return s
            except Exception as e:  # noqa: BLE001
                self._failed("stats", f"{type(e).__name__}: {e}")
        return StoreStats(self.name, self.capacity_bytes, errors=sum(self.num_errors.values()), extra=extra)

    def _report_evictions(self, total: int) -> None:
        m = self.metrics
        if m is not None and total > m._evictions_seen:
            m.evictions.inc(total - m._evictions_seen)
            m._evictions_seen = total

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead store is fine
            self.backend.close()
