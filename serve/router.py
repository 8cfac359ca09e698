"""Cache-aware request routing for the model-server deployment (a Ray Serve ``RequestRouter``).

``CacheAwarePolicy`` is the decision, free of Ray (SGLang's cache-aware policy at block
granularity): the router remembers, per replica, the chained hashes of the prompt blocks it has
sent there (an approximate radix tree: a chained hash names a whole prefix, so "the longest
prefix this replica has seen" is the longest run of leading hashes found in its set; LRU-capped).
For each request:

1. if load is imbalanced (``max - min > imbalance_abs`` and ``max > imbalance_rel * min``, in
   requests in flight) -> the least loaded replica ("imbalanced");
2. else the replica with the longest matched prefix, if it covers at least ``min_match_ratio``
   of the prompt's blocks ("prefix"; ties -> least loaded);
3. else the replica that has seen the least ("new_prefix"), so new prefixes spread out.

The chosen replica is rank 1; the others follow by load, so Serve falls through to them when the
chosen one is full. ``CacheAwareRouter`` is the Serve adapter: it reads the prompt token ids and
the tenant salt from ``ModelServer.generate``'s arguments, counts in-flight requests per replica
(``on_request_routed`` / ``on_request_completed``, combined with Serve's queue-length cache), and
falls back to power-of-two-choices for other methods or when policy is ``pow2``.
Decisions are counted in ``retort_router_decisions_total{reason}``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cluster import metrics as M
from cluster.config.kvstore import RouterConfig

log = logging.getLogger("retort.router")

ROUTER_CLASS = "serve.router:CacheAwareRouter"


def prompt_block_hashes(tokens: Sequence[int], block_size: int, salt: str | None = None) -> list[bytes]:
    """Chained 16-byte hashes of the full blocks of ``tokens`` (the salt enters the first block)."""
    out: list[bytes] = []
    prev = b"\x01" + salt.encode() if salt else b"\x00"
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        prev = hashlib.blake2b(prev + b"|" + ",".join(map(str, block)).encode(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixIndex:
    """The block hashes one replica has been sent, least recently used first out."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._hashes: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.max_blocks:
            self._hashes.popitem(last=False)


@dataclass
class Decision:
    ranked: list[list[Any]]  # replica ids, rank 1 first
    reason: str  # imbalanced | prefix | new_prefix | pow2
    matched_blocks: int = 0


class CacheAwarePolicy:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.indexes: dict[Hashable, PrefixIndex] = {}

    def index(self, replica: Hashable) -> PrefixIndex:
        if replica not in self.indexes:
            self.indexes[replica] = PrefixIndex(self.cfg.max_blocks_per_replica)
        return self.indexes[replica]

    def is_imbalanced(self, loads: Sequence[float]) -> bool:
        hi, lo = max(loads), min(loads)
        return hi - lo > self.cfg.imbalance_abs and hi > self.cfg.imbalance_rel * lo

    def choose(
        self, candidates: Sequence[Hashable], loads: Mapping[Any, float], hashes: Sequence[bytes]
    ) -> Decision:
        """Rank ``candidates`` (``loads``: requests in flight per replica) for a prompt's block hashes."""
        by_load = sorted(candidates, key=lambda r: loads.get(r, 0))
        if len(candidates) <= 1:
            return Decision([list(candidates)], "single")
        if self.is_imbalanced([loads.get(r, 0) for r in candidates]):
            return Decision([[by_load[0]], by_load[1:]], "imbalanced")
        matches = {r: self.index(r).match(hashes) for r in candidates}
        best = max(candidates, key=lambda r: (matches[r], -loads.get(r, 0)))
        if hashes and matches[best] > 0 and matches[best] / len(hashes) >= self.cfg.min_match_ratio:
            reason, chosen = "prefix", best
        else:
            reason = "new_prefix"
            chosen = min(candidates, key=lambda r: (len(self.index(r)), loads.get(r, 0)))
        return Decision([[chosen], [r for r in by_load if r != chosen]], reason, matches[chosen])

    def record(self, replica: Hashable, hashes: Sequence[bytes]) -> None:
        self.index(replica).insert(hashes)

    def forget(self, replica: Hashable) -> None:
        self.indexes.pop(replica, None)


# -- the Serve adapter ------------------------------------------------------------------------------
def router_options(policy: RouterConfig, block_size: int) -> dict[str, Any] | None:
    """``request_router_config`` for the model-server deployment, or None for Serve's default."""
    if policy.policy != "cache_aware":
        return None
    return {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {"router": policy.model_dump(mode="json"), "block_size": block_size},
        "request_routing_stats_period_s": policy.routing_stats_period_s,
    }


def prompt_of(pending_request: Any) -> tuple[list[int], str | None] | None:
    """(prompt token ids, salt) of a ``ModelServer.generate|complete(request_id, prompt_token_ids, params,
    salt, ...)`` call; None for anything else."""
    if pending_request is None or getattr(pending_request.metadata, "call_method", "") not in (
        "generate",
        "complete",
    ):
        return None
    args, kwargs = list(pending_request.args or []), pending_request.kwargs or {}
    tokens = args[1] if len(args) > 1 else kwargs.get("prompt_token_ids")
    salt = args[3] if len(args) > 3 else kwargs.get("salt")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens[:4]):
        return None
    return tokens, salt if isinstance(salt, str) else None


try:
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
    from ray.serve.request_router import LocalityMixin, MultiplexMixin, RequestRouter
except ImportError:  # pragma: no cover - ray always present in serve
    # machines without Ray (the GPU host) still import the policy and the hashing
    class RequestRouter:  # type: ignore[no-redef]
        pass

    class LocalityMixin:  # type: ignore[no-redef]
        pass

    class MultiplexMixin:  # type: ignore[no-redef]
        pass


class CacheAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):  # type: ignore[misc,valid-type]
    """Serve request router running ``CacheAwarePolicy`` (see the module doc)."""

    def initialize_state(  # type: ignore[override]  # Serve passes request_router_kwargs
        self, router: dict[str, Any] | None = None, block_size: int = 16
    ) -> None:
        self.cfg = RouterConfig.model_validate(router or {"policy": "cache_aware"})
        self.block_size = block_size
        self.policy = CacheAwarePolicy(self.cfg)
        self.inflight: dict[Any, int] = {}
        self._routed: dict[str, Any] = {}  # internal request id -> replica id
        self._decisions: dict[str, Any] = {}

    def _count(self, reason: str) -> None:
        if reason not in self._decisions:
            self._decisions[reason] = M.make(M.ROUTER_DECISIONS, {"reason": reason})
        self._decisions[reason].inc()

    def _hashes(self, pending_request: Any) -> list[bytes] | None:
        cached = getattr(pending_request, "_retort_block_hashes", None)
        if cached is not None:
            return cached
        prompt = prompt_of(pending_request)
        if prompt is None:
            return None
        hashes = prompt_block_hashes(prompt[0], self.block_size, prompt[1])
        pending_request._retort_block_hashes = hashes
        return hashes

    def load(self, replica: Any) -> int:
        """Requests in flight on ``replica``: ours, or Serve's cached queue length if larger."""
        queued = self._replica_queue_len_cache.get(replica.replica_id)
        return max(self.inflight.get(replica.replica_id, 0), queued or 0)

    async def choose_replicas(
        self, candidate_replicas: list[Any], pending_request: Any = None
    ) -> list[list[Any]]:
        hashes = self._hashes(pending_request) if self.cfg.policy == "cache_aware" else None
        if hashes is None or not candidate_replicas:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(
                self,  # type: ignore[arg-type]  # same mixins, Ray's LLM router does the same
                candidate_replicas,
                pending_request,
            )
        pending_request.routing_context.should_backoff = True  # all candidates are considered at once
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {rid: self.load(r) for rid, r in by_id.items()}
        decision = self.policy.choose(list(by_id), loads, hashes)
        self._count(decision.reason)
        return [[by_id[rid] for rid in rank] for rank in decision.ranked if rank]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        hashes = self._hashes(pending_request) if self.cfg.policy == "cache_aware" else None
        if hashes is None:
            return
        self.policy.record(replica_id, hashes)
        self.inflight[replica_id] = self.inflight.get(replica_id, 0) + 1
        self._routed[pending_request.metadata.internal_request_id] = replica_id

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        rid = self._routed.pop(internal_request_id, None)
        if rid is not None and self.inflight.get(rid, 0) > 0:
            self.inflight[rid] -= 1

    def update_replicas(self, replicas: list[Any]) -> None:
        super().update_replicas(replicas)
        live = set(self._replica_id_set)
        for rid in [r for r in self.policy.indexes if r not in live]:
            self.policy.forget(rid)
            self.inflight.pop(rid, None)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id)
        self.inflight.pop(replica_id, None)
