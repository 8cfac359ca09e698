"""The engine's side of the shared KV store: publish full blocks, fetch prefixes on admission.

The engine calls three hooks (all optional: an engine without a connector is unchanged):

- ``bind(kv)`` once: subscribes to ``KVCacheManager.on_blocks_cached``. Every block that
  becomes full and cached is copied out of the pool at once (in the step thread: the pool block
  may be reused right after) and queued; a background thread encodes and ``put``s the queue in
  batches. Publishing never waits: a full queue or a store that is down drops blocks.
- ``prefetch(seq)`` when a request is added (any thread): a worker thread hashes the prompt,
  skips the blocks the local pool already has, and, if at least ``min_fetch_blocks`` blocks
  remain and the fetch policy says so, asks the store for them in ONE batched ``get`` and
  verifies the leading run of hits (key echo, layout, dtype, length, checksum). The fetch
  overlaps with the request's queueing. (When the policy would not fetch even all of the prompt's
  blocks, that is decided at once, with no worker.)
- ``load(seq)`` at admission (the step thread, before the local prefix match): waits for that
  fetch until ``fetch_timeout_s`` after arrival at the latest, then imports the verified blocks
  into the pool as cached blocks, so the prefix match that follows finds them.
- ``observe_prefill(num_tokens, seconds)`` after every engine step that computed prefill tokens
  (the step thread): feeds the recompute side of the cost model.

Fetch policy (``fetch_policy``): ``always`` fetches every candidate of ``min_fetch_blocks`` or more
blocks. ``cost`` (the default) fetches only when ``FetchCostModel`` predicts that fetching is
cheaper than recomputing: a GPU prefills a 1k-token prefix in a few ms, less than moving its
~40 MB of KV through a store (LMCache#914: a shared cache slower than recompute), while on a CPU
the store wins by 20x and more. The model learns both sides online: the engine's prefill steps
(``a + b * tokens`` through their fastest recent times, ``EnvelopeFit``; fetching saves ``b * tokens``) and this connector's own fetches (worker
hand-off + get + verify + import: ``latency + bytes / throughput``). Until it has measured a fetch
it fetches (today's behaviour; the first fetch teaches it what the store costs). Skipped candidates are counted; after a run of skips
one is fetched anyway (a probe: after 1 skip, then 2, 4, .. up to ``fetch_cost.probe_every``),
which restarts the fetch estimate from its fresh measurement, so that a store that got faster, or
one slow first call, does not keep the connector recomputing.

Any store error, timeout, miss or bad record leaves the request to recompute its prefix: the
result is the same tokens, only slower (a timeout also teaches the cost model that the store is
slow).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import queue
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cluster import metrics as M
from cluster.config.kvstore import FetchCostConfig, KVStoreConfig
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
    decided_fetch: int = 0  # candidates fetched because the policy said so (cost model, or always)
    decided_skip_cost: int = 0  # candidates recomputed because fetching was predicted to be slower
    decided_probe: int = 0  # candidates fetched anyway after probe_every cost skips

    def as_dict(self) -> dict[str, Any]:
        """The counters, and the cost model's current estimates under ``cost_model``."""
        out: dict[str, Any] = asdict(self)
        estimates = getattr(self, "estimates", None)  # set by the connector (not a dataclass field)
        if estimates is not None:
            out["cost_model"] = estimates()
        return out


class EWLinearFit:
    """``y = a + b * x`` by exponentially weighted least squares over recent observations.

    Each observation multiplies the weight of the earlier ones by ``1 - 1/window``. Until the first
    observation the prior line is returned. While the recent x values are too alike to determine a
    slope (weighted std < 25% of their mean), the last well-determined slope (initially the prior's)
    is kept and only the level is fitted. Neither a nor b is ever negative: a negative slope becomes
    0, a negative intercept a line through the origin. Not thread-safe (``FetchCostModel`` locks)."""

    MIN_REL_SPREAD = 0.25

    def __init__(self, prior_a: float, prior_b: float, window: int) -> None:
        self.prior_a, self.prior_b = prior_a, prior_b
        self.decay = 1.0 - 1.0 / window
        self.slope = prior_b  # the last well-determined slope
        self.a, self.b = prior_a, prior_b
        self.n = 0  # observations since the last reset
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def reset(self) -> None:
        """Forget the observations (keeps the last well-determined slope as the fallback)."""
        self.n = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, x: float, y: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        self.n += 1
        mx, my = self._x / self._w, self._y / self._w
        var = max(self._xx / self._w - mx * mx, 0.0)
        if self.n >= 2 and var > (self.MIN_REL_SPREAD * mx) ** 2:
            self.slope = max((self._xy / self._w - mx * my) / var, 0.0)
        b = self.slope
        a = my - b * mx
        if a < 0:  # the old slope overshoots the level: the steepest line consistent with a >= 0
            a, b = 0.0, (self._xy / self._xx if self._xx > 0 else b)
        self.a, self.b = a, b

    def __call__(self, x: float) -> float:
        return self.a + self.b * x


class EnvelopeFit:
    """``y = a + b * x`` through the lower envelope of the last ``window`` observations: per size
    class (x rounded down to a power of two) the fastest recent time, then a Theil-Sen line (median
    of pairwise slopes, median intercept) through those minima.

    For step times: interference only ever adds time (a compile on first use of a shape, another
    process on the CPU), so the minimum is the step's cost and one stall cannot tilt the line. On
    an H200 the least-squares fit took 40 µs/token from the warm-up steps' stalls where the steps
    themselves cost ~3 µs/token, and fetched 64 blocks at 2.6x the recompute time. Until two size
    classes are seen the slope is the prior (or the last determined one) and only the level is fitted.
    Neither a nor b is negative. Same interface as ``EWLinearFit``."""

    def __init__(self, prior_a: float, prior_b: float, window: int) -> None:
        self.a, self.b, self.slope = prior_a, prior_b, prior_b
        self.obs: deque[tuple[float, float]] = deque(maxlen=max(2, window))
        self.n = 0

    def reset(self) -> None:
        self.obs.clear()
        self.n = 0

    def observe(self, x: float, y: float) -> None:
        self.obs.append((x, y))
        self.n += 1
        low: dict[int, tuple[float, float]] = {}
        for ox, oy in self.obs:
            k = int(ox).bit_length()
            if k not in low or oy < low[k][1]:
                low[k] = (ox, oy)
        pts = list(low.values())
        if len(pts) >= 2:
            self.slope = max(
                statistics.median(
                    (y2 - y1) / (x2 - x1)
                    for i, (x1, y1) in enumerate(pts)
                    for x2, y2 in pts[i + 1 :]
                    if x2 != x1
                ),
                0.0,
            )
        self.b = self.slope
        self.a = max(statistics.median(py - self.b * px for px, py in pts), 0.0)

    def __call__(self, x: float) -> float:
        return self.a + self.b * x


@dataclass(frozen=True)
class FetchDecision:
    fetch: bool
    reason: str  # fetch | skip_cost | probe
    fetch_s: float  # predicted time to fetch, verify and import the blocks
    saved_s: float  # predicted prefill time they save


class FetchCostModel:
    """Predicts whether fetching n blocks beats recomputing them (see the module doc). Thread-safe:
    the step thread observes, fetch workers decide, anyone reads ``estimates()``."""

    def __init__(self, cfg: FetchCostConfig, policy: str = "cost") -> None:
        self.cfg, self.policy = cfg, policy
        self.recompute = EnvelopeFit(0.0, cfg.prior_recompute_s_per_token, cfg.window)  # tokens -> s
        self.fetch = EWLinearFit(0.0, 1.0 / cfg.prior_fetch_bytes_per_s, cfg.window)  # bytes -> s
        self.fetches_measured = 0  # until the first, every candidate is fetched: the store is unknown
        # cost skips since the last fetch or probe, and how many make a probe: 1 after a fetch, doubling
        # up to probe_every while probes keep confirming (one slow first call must not stick for long)
        self.skips, self.probe_after = 0, 1
        self._lock = threading.Lock()

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        with self._lock:
            self.recompute.observe(num_tokens, seconds)

    def observe_fetch(self, nbytes: int, seconds: float, probe: bool = False) -> None:
        """A fetch of ``nbytes`` took ``seconds``. A probe's measurement replaces the history: that
        is stale by construction (nothing was fetched for ``probe_every`` candidates)."""
        with self._lock:
            if probe:
                self.fetch.reset()
            self.fetch.observe(nbytes, seconds)
            self.fetches_measured += 1

    def predict(self, tokens: int, nbytes: int) -> tuple[float, float]:
        """(seconds to fetch ``nbytes`` of records, prefill seconds that saves for ``tokens`` tokens)."""
        with self._lock:
            return self.fetch(nbytes), self.recompute.b * tokens

    def decide(self, tokens: int, nbytes: int, *, upfront: bool = False) -> FetchDecision | None:
        """Fetch ``tokens`` tokens' blocks (``nbytes`` of records) or recompute them?

        ``upfront``: the most a request could fetch, before its local prefix is known. A skip (or
        probe) then holds for any fewer blocks too (fetching wins from a break-even size up, if
        ever); where fetching the most wins, None: the fetch worker decides on what remains."""
        with self._lock:
            fetch_s, saved_s = self.fetch(nbytes), self.recompute.b * tokens
            if (
                self.policy == "always"
                or not self.fetches_measured
                or fetch_s * self.cfg.safety_factor < saved_s
            ):
                if upfront:
                    return None
                self.skips, self.probe_after = 0, 1
                return FetchDecision(True, "fetch", fetch_s, saved_s)
            if self.skips >= self.probe_after:
                self.skips, self.probe_after = 0, min(2 * self.probe_after, self.cfg.probe_every)
                return FetchDecision(True, "probe", fetch_s, saved_s)
            self.skips += 1
            return FetchDecision(False, "skip_cost", fetch_s, saved_s)

    def break_even_blocks(self, block_size: int, record_bytes: int) -> int | None:
        """The fewest blocks the policy fetches at the current estimates (None: never, bar probes)."""
        with self._lock:
            gain = self.recompute.b * block_size - self.cfg.safety_factor * self.fetch.b * record_bytes
            if self.policy == "always" or not self.fetches_measured:
                return 1
            if gain <= 0:
                return None
            return math.floor(self.cfg.safety_factor * self.fetch.a / gain) + 1

    def estimates(self) -> dict[str, Any]:
        with self._lock:
            return {
                "policy": self.policy,
                "recompute_fixed_s": self.recompute.a,
                "recompute_s_per_token": self.recompute.b,
                "recompute_samples": self.recompute.n,
                "fetch_latency_s": self.fetch.a,
                "fetch_bytes_per_s": 1.0 / self.fetch.b if self.fetch.b > 0 else None,
                "fetch_samples": self.fetch.n,  # since the last probe
                "fetches_measured": self.fetches_measured,
                "skips_since_probe": self.skips,
                "probe_after_skips": self.probe_after,
            }


class _Attempt:
    """What a fetch worker decided, for ``load`` to learn from when the fetch times out."""

    nbytes = 0  # expected record bytes of a fetch in flight (0: none started)
    probe = False

    def __init__(self) -> None:
        self.submitted = time.perf_counter()  # the fetch's cost includes waiting for a worker


@dataclass
class _Fetch:
    seq: Any
    deadline: float
    future: cf.Future
    started: float  # when the fetch was submitted (monotonic)
    attempt: _Attempt


@dataclass
class _Fetched:
    """A fetch worker's verified result."""

    hashes: list[bytes]
    k: torch.Tensor
    v: torch.Tensor
    nbytes: int  # record bytes received
    seconds: float  # from submission: worker hand-off, store get, verify (load adds the import)
    probe: bool


STAGING_BLOCKS = 128  # blocks each pinned gather buffer holds (a larger fetch pins its own)


class KVConnector:
    def __init__(self, store: KVStore, cfg: KVStoreConfig | None = None, *, fetch_workers: int = 2) -> None:
        self.store = store
        self.cfg = cfg or KVStoreConfig(enabled=True)
        self.stats = ConnectorStats()
        self.cost = FetchCostModel(self.cfg.fetch_cost, self.cfg.fetch_policy)
        self.stats.estimates = self.estimates  # type: ignore[attr-defined] - shown by stats.as_dict()
        self._stats_lock = threading.Lock()  # the step thread, fetch workers and the publisher all count
        self._decision_metrics: dict[str, Any] | None = (
            {} if getattr(store, "metrics", None) is not None else None
        )
        self.kv: Any = None
        self._layout: BlockLayout | None = None
        self.namespace = b""
        self._fetches: dict[str, _Fetch] = {}
        self._fetch_lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(fetch_workers, thread_name_prefix="kv-fetch")
        self._fetch_workers = fetch_workers
        self._staging: queue.SimpleQueue = queue.SimpleQueue()  # pinned gather buffers (CUDA), one per worker
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
        if ref.is_cuda:  # pinned once here, not per fetch (38 MB took milliseconds to pin on an H200 host)
            nbytes = min(kv.pool.num_blocks, STAGING_BLOCKS) * self._layout.payload_bytes
            for _ in range(self._fetch_workers):
                self._staging.put(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
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
            self._count(dropped_blocks=len(fresh))
            return
        if self._queued_blocks + len(fresh) > self.cfg.publish_queue_blocks:
            self._count(dropped_blocks=len(fresh))
            return
        ids = torch.tensor([b for _, b in fresh], dtype=torch.long, device=self.kv.kv[0].device)
        k = torch.stack([layer[0].index_select(0, ids) for layer in self.kv.kv]).cpu()  # (L, n, bs, h, d)
        v = torch.stack([layer[1].index_select(0, ids) for layer in self.kv.kv]).cpu()
        try:
            self._queue.put_nowait(([h for h, _ in fresh], k, v))
        except queue.Full:
            self._count(dropped_blocks=len(fresh))
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
                self._count(dropped_blocks=len(keys))
                for h in hashes[i : i + step]:  # let a later request publish them again
                    self._published.pop(h, None)
            else:
                self._count(published_blocks=len(keys))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued block was handed to the store (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    # -- cost model ----------------------------------------------------------------------------
    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """The engine, after every step that computed prefill tokens: ``num_tokens`` tokens computed in
        that step (all of them, decode included) took ``seconds`` (model forward + sampling,
        synchronized)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"observe_prefill: num_tokens must be a positive int, got {num_tokens!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"observe_prefill: seconds must be finite and >= 0, got {seconds!r}")
        self.cost.observe_prefill(num_tokens, seconds)

    def decide(self, num_blocks: int, *, upfront: bool = False) -> FetchDecision | None:
        """The policy's decision for ``num_blocks`` candidate blocks now (counts a skip toward a probe);
        ``upfront``: see ``FetchCostModel.decide``."""
        return self.cost.decide(
            num_blocks * self.layout.block_size, num_blocks * self.layout.record_bytes, upfront=upfront
        )

    def predict(self, num_blocks: int) -> tuple[float, float]:
        """(predicted fetch seconds, predicted recompute seconds saved) for ``num_blocks`` blocks now."""
        return self.cost.predict(num_blocks * self.layout.block_size, num_blocks * self.layout.record_bytes)

    def estimates(self) -> dict[str, Any]:
        """The cost model's current estimates and the break-even they imply for this engine's blocks."""
        out = self.cost.estimates()
        if self._layout is not None:
            out["break_even_blocks"] = self.cost.break_even_blocks(
                self.layout.block_size, self.layout.record_bytes
            )
            out["min_fetch_blocks"] = self.cfg.min_fetch_blocks
        return out

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, n in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def _count_decision(self, reason: str) -> None:
        self._count(**{f"decided_{reason}": 1})
        if self._decision_metrics is not None:
            m = self._decision_metrics.get(reason)
            if m is None:
                m = self._decision_metrics[reason] = M.make(
                    M.KV_FETCH_DECISIONS, {"backend": self.store.name, "decision": reason}
                )
            m.inc(1)

    # -- fetch ---------------------------------------------------------------------------------
    def prefetch(self, seq: Any) -> None:
        """Any thread, when a request arrives: start fetching its prompt's blocks from the store."""
        if self._closed or self.kv is None or not self.kv.enable_prefix_caching or not self._store_up():
            return
        max_blocks = (seq.num_prompt_tokens - 1) // self.layout.block_size  # >= 1 token is always computed
        if max_blocks < self.cfg.min_fetch_blocks:
            self._count(fetch_skipped=1)
            return
        # a sure skip is decided here, so that the request does not wait at admission for a worker
        # to say so (on a fast GPU that hand-off would be a visible part of the recompute it chose)
        upfront = self.decide(max_blocks, upfront=True)
        if upfront is not None and not upfront.fetch:
            self._count_decision(upfront.reason)
            return
        tokens = list(seq.prompt_token_ids[: max_blocks * self.layout.block_size])
        attempt = _Attempt()
        fut = self._pool.submit(self._fetch, tokens, seq.salt, attempt, upfront)
        with self._fetch_lock:
            self._sweep()
            now = time.monotonic()
            self._fetches[seq.request_id] = _Fetch(seq, now + self.cfg.fetch_timeout_s, fut, now, attempt)

    def _sweep(self) -> None:
        """Forget fetches of requests that never reached admission (aborted while waiting)."""
        stale = time.monotonic() - 60.0
        for rid in [r for r, f in self._fetches.items() if f.deadline < stale]:
            self._fetches.pop(rid).future.cancel()

    def _fetch(
        self, tokens: list[int], salt: str | None, attempt: _Attempt, probe: FetchDecision | None
    ) -> _Fetched | None:
        """Worker thread: decide (unless ``prefetch`` already decided on a probe), then one batched
        get for the blocks beyond the local prefix; verified or None."""
        hashes = block_hashes(tokens, self.layout.block_size, self.kv.model_id, salt)
        local = self.kv.cached_prefix_length(hashes)  # a racy read is fine: it only trims the request
        want = hashes[local:]
        if len(want) < self.cfg.min_fetch_blocks:
            self._count(fetch_skipped=1)
            return None
        decision = probe or self.decide(len(want))
        self._count_decision(decision.reason)
        if not decision.fetch:
            return None
        attempt.nbytes, attempt.probe = len(want) * self.layout.record_bytes, decision.reason == "probe"
        keys = make_keys(self.namespace, want)
        self._count(fetch_requests=1)
        records = self.store.get(keys)
        n = 0
        while n < len(records) and records[n] is not None:
            n += 1
        if n < self.cfg.min_fetch_blocks:
            return None
        device = self.kv.kv[0].device
        staging = self._staging.get() if device.type == "cuda" else None  # one per worker: never waits
        try:
            k, v = decode_blocks(self.layout, keys[:n], records[:n], device=device, staging=staging)
        except BadBlock as e:
            self._count(bad_blocks=1)
            log.warning("kv store returned a bad block; recomputing the prefix: %s", e)
            return None
        finally:
            if staging is not None:
                self._staging.put(staging)
        self._count(fetched_blocks=n)
        seconds = time.perf_counter() - attempt.submitted
        return _Fetched(want[:n], k, v, n * self.layout.record_bytes, seconds, attempt.probe)

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
            self._count(fetch_timeouts=1)
            if f.attempt.nbytes:  # it costs at least this much: the cost model learns the store is slow
                self.cost.observe_fetch(f.attempt.nbytes, time.monotonic() - f.started, f.attempt.probe)
            return 0
        except Exception:  # noqa: BLE001 - a failed fetch is a recompute
            log.exception("kv fetch failed")
            return 0
        if result is None:
            return 0
        t0 = time.perf_counter()
        try:
            n = self.kv.import_blocks(result.hashes, result.k, result.v)
        except ValueError as e:  # layout mismatch: verification should have caught it
            log.warning("kv import refused: %s", e)
            self._count(bad_blocks=1)
            return 0
        self.cost.observe_fetch(result.nbytes, result.seconds + time.perf_counter() - t0, result.probe)
        self._count(imported_blocks=n)
        return n


def build_connector(cfg: KVStoreConfig) -> KVConnector | None:
    """The connector a model-server replica passes to its engine; None when the store is off."""
    if not cfg.enabled:
        return None
    from serve.kv import open_store

    return KVConnector(open_store(cfg), cfg)
