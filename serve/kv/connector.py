"""The engine's side of the shared KV store: publish full blocks, fetch prefixes on admission.

The engine calls three hooks (all optional: an engine without a connector is unchanged):

- ``bind(kv)`` once: subscribes to ``KVCacheManager.on_blocks_cached``. Every block that
  becomes full and cached is copied out of the pool at once (in the step thread: the pool block
  may be reused right after) and queued; a background thread encodes and ``put``s the queue in
  batches. Publishing never waits: a full queue or a store that is down drops blocks.
- ``prefetch(seq)`` when a request is added (any thread): a worker thread hashes the prompt,
  skips the blocks the local pool already has, and, if at least ``min_fetch_blocks`` blocks
  remain, asks the store for them in ONE batched ``get`` and verifies the leading run of hits
  (key echo, layout, dtype, length, checksum). The fetch overlaps with the request's queueing.
- ``load(seq)`` at admission (the step thread, before the local prefix match): waits for that
  fetch until ``fetch_timeout_s`` after arrival at the latest, then imports the verified blocks
  into the pool as cached blocks, so the prefix match that follows finds them.

Any store error, timeout, miss or bad record leaves the request to recompute its prefix: the
result is the same tokens, only slower. ``min_fetch_blocks`` is the break-even below which
fetching is no cheaper than recomputing (``python -m serve.kv.bench`` measures it).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cluster.config.kvstore import KVStoreConfig
from serve.engine.hashing import block_hashes
from serve.kv.store import (
    BadBlock,
    BlockLayout,
    KVStore,
    decode_blocks,
    encode_blocks,
    layout_namespace,
    make_keys,
)

log = logging.getLogger("retort.kv")


@dataclass
class ConnectorStats:
    published_blocks: int = 0  # handed to the store
    dropped_blocks: int = 0  # not published: queue full or store down/failing
    fetch_requests: int = 0  # batched gets issued
    fetched_blocks: int = 0  # verified blocks received
    imported_blocks: int = 0  # of which put into the pool
    bad_blocks: int = 0  # records refused by verification
    fetch_timeouts: int = 0  # fetches abandoned at fetch_timeout_s
    fetch_skipped: int = 0  # requests with fewer than min_fetch_blocks candidate blocks

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Fetch:
    seq: Any
    deadline: float
    future: cf.Future


class KVConnector:
    def __init__(self, store: KVStore, cfg: KVStoreConfig | None = None, *, fetch_workers: int = 2) -> None:
        self.store = store
        self.cfg = cfg or KVStoreConfig(enabled=True)
        self.stats = ConnectorStats()
        self.kv: Any = None
        self._layout: BlockLayout | None = None
        self.namespace = b""
        self._fetches: dict[str, _Fetch] = {}
        self._fetch_lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(fetch_workers, thread_name_prefix="kv-fetch")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.publish_queue_blocks // 16))
        self._queued_blocks = (
            0  # blocks in the queue (step thread adds, publisher subtracts: under _count_lock)
        )
        self._count_lock = threading.Lock()
        self._published: OrderedDict[bytes, None] = OrderedDict()  # recently published hashes
        self._publisher: threading.Thread | None = None
        self._closed = False

    # -- wiring --------------------------------------------------------------------------------
    def bind(self, kv: Any) -> None:
        """Attach to a ``KVCacheManager`` (its pool layout fixes the record layout and key namespace)."""
        ref = kv.kv[0]  # (2, num_blocks + 1, block_size, n_kv_heads, head_dim)
        self.kv = kv
        self._layout = BlockLayout(len(kv.kv), kv.block_size, ref.shape[3], ref.shape[4], ref.dtype)
        self.namespace = layout_namespace(kv.model_id, self.layout)
        kv.on_blocks_cached.append(self._on_blocks_cached)
        self._publisher = threading.Thread(target=self._publish_loop, name="kv-publish", daemon=True)
        self._publisher.start()

    @property
    def layout(self) -> BlockLayout:
        if self._layout is None:
            raise RuntimeError("KVConnector used before bind(kv)")
        return self._layout

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._publisher is not None:
            self._queue.put(None)
            self._publisher.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _store_up(self) -> bool:
        return bool(getattr(self.store, "available", True))

    # -- publish -------------------------------------------------------------------------------
    def _on_blocks_cached(self, hashes: list[bytes], block_ids: list[int]) -> None:
        """Step thread: copy the new blocks out of the pool and queue them (never blocks)."""
        fresh = [(h, b) for h, b in zip(hashes, block_ids, strict=True) if h not in self._published]
        if not fresh or self._closed:
            return
        if not self._store_up():  # it may come back empty (a restarted actor): publish again then
            self._published.clear()
            self.stats.dropped_blocks += len(fresh)
            return
        if self._queued_blocks + len(fresh) > self.cfg.publish_queue_blocks:
            self.stats.dropped_blocks += len(fresh)
            return
        ids = torch.tensor([b for _, b in fresh], dtype=torch.long, device=self.kv.kv[0].device)
        k = torch.stack([layer[0].index_select(0, ids) for layer in self.kv.kv]).cpu()  # (L, n, bs, h, d)
        v = torch.stack([layer[1].index_select(0, ids) for layer in self.kv.kv]).cpu()
        try:
            self._queue.put_nowait(([h for h, _ in fresh], k, v))
        except queue.Full:
            self.stats.dropped_blocks += len(fresh)
            return
        with self._count_lock:
            self._queued_blocks += len(fresh)
        for h, _ in fresh:
            self._published[h] = None
        while len(self._published) > 4 * self.cfg.publish_queue_blocks:
            self._published.popitem(last=False)

    def _publish_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._publish(*item)
            except Exception:  # noqa: BLE001 - the publisher must outlive any one bad batch
                log.exception("kv publish failed")
            finally:
                if item is not None:
                    with self._count_lock:
                        self._queued_blocks -= len(item[0])
                self._queue.task_done()

    def _publish(self, hashes: list[bytes], k: torch.Tensor, v: torch.Tensor) -> None:
        step = self.cfg.publish_batch_blocks
        for i in range(0, len(hashes), step):
            keys = make_keys(self.namespace, hashes[i : i + step])
            records = encode_blocks(self.layout, keys, k[:, i : i + step], v[:, i : i + step])
            if self.store.put(list(zip(keys, records, strict=True))) is False:
                self.stats.dropped_blocks += len(keys)
                for h in hashes[i : i + step]:  # let a later request publish them again
                    self._published.pop(h, None)
            else:
                self.stats.published_blocks += len(keys)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued block was handed to the store (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    # -- fetch ---------------------------------------------------------------------------------
    def prefetch(self, seq: Any) -> None:
        """Any thread, when a request arrives: start fetching its prompt's blocks from the store."""
        if self._closed or self.kv is None or not self.kv.enable_prefix_caching or not self._store_up():
            return
        max_blocks = (seq.num_prompt_tokens - 1) // self.layout.block_size  # >= 1 token is always computed
        if max_blocks < self.cfg.min_fetch_blocks:
            self.stats.fetch_skipped += 1
            return
        tokens = list(seq.prompt_token_ids[: max_blocks * self.layout.block_size])
        fut = self._pool.submit(self._fetch, tokens, seq.salt)
        with self._fetch_lock:
            self._sweep()
            self._fetches[seq.request_id] = _Fetch(seq, time.monotonic() + self.cfg.fetch_timeout_s, fut)

    def _sweep(self) -> None:
        """Forget fetches of requests that never reached admission (aborted while waiting)."""
        stale = time.monotonic() - 60.0
        for rid in [r for r, f in self._fetches.items() if f.deadline < stale]:
            self._fetches.pop(rid).future.cancel()

    def _fetch(
        self, tokens: list[int], salt: str | None
    ) -> tuple[list[bytes], torch.Tensor, torch.Tensor] | None:
        """Worker thread: one batched get for the blocks beyond the local prefix; verified or None."""
        hashes = block_hashes(tokens, self.layout.block_size, self.kv.model_id, salt)
        local = self.kv.cached_prefix_length(hashes)  # a racy read is fine: it only trims the request
        want = hashes[local:]
        if len(want) < self.cfg.min_fetch_blocks:
            self.stats.fetch_skipped += 1
            return None
        keys = make_keys(self.namespace, want)
        self.stats.fetch_requests += 1
        records = self.store.get(keys)
        n = 0
        while n < len(records) and records[n] is not None:
            n += 1
        if n < self.cfg.min_fetch_blocks:
            return None
        try:
            k, v = decode_blocks(self.layout, keys[:n], records[:n], device=self.kv.kv[0].device)
        except BadBlock as e:
            self.stats.bad_blocks += 1
            log.warning("kv store returned a bad block; recomputing the prefix: %s", e)
            return None
        self.stats.fetched_blocks += n
        return want[:n], k, v

    def load(self, seq: Any) -> int:
        """Step thread, at admission: import the request's fetched blocks (waiting at most until its
        fetch deadline). Returns the number of blocks imported."""
        with self._fetch_lock:
            f = self._fetches.pop(seq.request_id, None)
        if f is None or f.seq is not seq:
            return 0
        try:
            result = f.future.result(timeout=max(0.0, f.deadline - time.monotonic()))
        except cf.TimeoutError:
            f.future.cancel()
            self.stats.fetch_timeouts += 1
            return 0
        except Exception:  # noqa: BLE001 - a failed fetch is a recompute
            log.exception("kv fetch failed")
            return 0
        if result is None:
            return 0
        hashes, k, v = result
        try:
            n = self.kv.import_blocks(hashes, k, v)
        except ValueError as e:  # layout mismatch: verification should have caught it
            log.warning("kv import refused: %s", e)
            self.stats.bad_blocks += 1
            return 0
        self.stats.imported_blocks += n
        return n


def build_connector(cfg: KVStoreConfig) -> KVConnector | None:
    """The connector a model-server replica passes to its engine; None when the store is off."""
    if not cfg.enabled:
        return None
    from serve.kv import open_store

    return KVConnector(open_store(cfg), cfg)
