"""In-process KV store: an LRU dict of records. For engine-level tests and benchmarks, and for
several engines in one process (they share the same ``MemoryStore`` object)."""

from __future__ import annotations

from serve.kv.store import LRUIndex, StoreStats


class MemoryStore:
    name = "memory"

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._index = LRUIndex(capacity_bytes)
        self._stats = StoreStats(self.name, capacity_bytes)

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        out = self._index.get(keys)
        hits = [r for r in out if r is not None]
        self._stats.hits += len(hits)
        self._stats.misses += len(out) - len(hits)
        self._stats.bytes_out += sum(len(r) for r in hits)
        return out

    def put(self, items: list[tuple[bytes, bytes]]) -> None:
        for key, record in items:
            self._index.put(key, bytes(record), len(record))
            self._stats.puts += 1
            self._stats.bytes_in += len(record)

    def stats(self) -> StoreStats:
        s = self._stats
        s.used_bytes, s.num_blocks, s.evictions = (
            self._index.used_bytes,
            len(self._index),
            self._index.evictions,
        )
        return StoreStats(**{**s.as_dict()})

    def close(self) -> None:
        self._index.clear()
