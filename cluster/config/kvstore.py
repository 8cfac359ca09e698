"""The shared KV cache store that replicas publish blocks to and fetch blocks from, and the
cache-aware request router. Both are embedded in ``ServeConfig`` (``kv_store:``, ``router:``);
the defaults keep a plain deployment: no store, Serve's power-of-two-choices router.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config.base import StrictModel


class StoreHealthConfig(StrictModel):
    """LMCache-style health monitor: a failed or slow op marks the store down; while down every
    get/put is a no-op (requests recompute); it is retried after an exponential backoff."""

    slow_op_s: float = Field(1.0, gt=0, description="An op slower than this counts as a failure.")
    backoff_initial_s: float = Field(1.0, gt=0, description="First wait before retrying a store marked down.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between retries (doubles up to this).")

    @model_validator(mode="after")
    def _check(self) -> StoreHealthConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) < backoff_initial_s ({self.backoff_initial_s})"
            )
        return self


class FetchCostConfig(StrictModel):
    """The online cost model behind ``fetch_policy: cost`` (``serve.kv.connector.FetchCostModel``).

    Recompute: ``seconds = a + b * tokens``, fitted to the engine's prefill steps; fetching n blocks
    saves the marginal ``b * n * block_size`` (the fixed part of a step is paid anyway: at least one
    token is always computed). Fetch: ``seconds = latency + bytes / bytes_per_s``, fitted to the
    batched fetches (worker hand-off + store get + verify + import). Both fits weight recent observations
    exponentially. Until its first fetch was measured the connector fetches every candidate (the
    plain ``min_fetch_blocks`` behaviour); the priors below stand in for slopes the data does not
    determine yet (the ``small`` model recomputes ~100-200 us per token on a CPU core; a fetch from
    memory costs ~0.3 ms + 1 ms/MB). ``python -m serve.kv.bench`` prints the fitted estimates and
    the break-even they imply."""

    safety_factor: float = Field(
        1.5,
        ge=1.0,
        description="Fetch only if predicted fetch time x this < predicted recompute time saved (a linear "
        "fit overstates what a short prefix costs to recompute; near break-even both are the same TTFT).",
    )
    window: int = Field(
        32,
        ge=2,
        description="Observations the estimates average over (exponential weights, decay 1 - 1/window).",
    )
    probe_every: int = Field(
        16,
        ge=1,
        description="Longest run of candidates skipped as too costly before one is fetched anyway (a probe, "
        "so that a store that got faster is noticed); probes come after 1 skip, then 2, 4, .. up to this.",
    )
    prior_recompute_s_per_token: float = Field(
        1e-4, gt=0, description="Marginal prefill seconds per token until the engine reported a step."
    )
    prior_fetch_bytes_per_s: float = Field(
        1e9,
        gt=0,
        description="Fetch throughput (get + verify + import) assumed until fetches of different sizes "
        "were measured (until the first fetch, every candidate is fetched).",
    )


class KVStoreConfig(StrictModel):
    enabled: bool = Field(
        False,
        description="Publish full KV blocks to a store shared by replicas and fetch "
        "prefixes from it on admission.",
    )
    backend: Literal["ray", "redis", "memory"] = Field(
        "ray",
        description="ray: Ray's object store behind a named detached actor (the default on a cluster); "
        "redis: an external Redis; memory: in-process (tests, benchmarks).",
    )
    capacity_bytes: int = Field(
        256 * 1024**2, ge=1024, description="Store capacity; least recently used blocks are evicted past it."
    )
    namespace: str = Field(
        "retort", min_length=1, description="Ray namespace of the store actor / Redis key prefix."
    )
    actor_name: str = Field("retort-kv-store", min_length=1, description="Name of the Ray store actor.")
    ray_mode: Literal["refs", "bytes"] = Field(
        "refs",
        description="ray backend: refs = blocks are Ray objects owned by the store actor (zero-copy reads "
        "from the local object store); bytes = blocks are held in the actor's heap.",
    )
    redis_url: str | None = Field(None, description="redis://host:port[/db]; None: the Redis of `retort up`.")
    manage_redis_maxmemory: bool = Field(
        True,
        description="Set Redis maxmemory=capacity_bytes and allkeys-lru at connect (turn off on a shared Redis).",
    )
    min_fetch_blocks: int = Field(
        2,
        ge=1,
        description="Never fetch fewer than this many blocks beyond the local prefix (a floor under "
        "fetch_policy; see `python -m serve.kv.bench`).",
    )
    fetch_policy: Literal["cost", "always"] = Field(
        "cost",
        description="cost: fetch only when the online cost model predicts the fetch is cheaper than "
        "recomputing those blocks (a shared store can be slower than a GPU's prefill); always: fetch "
        "every candidate of at least min_fetch_blocks blocks.",
    )
    fetch_cost: FetchCostConfig = Field(
        default_factory=FetchCostConfig, description="Knobs and priors of the fetch cost model."
    )
    fetch_timeout_s: float = Field(
        0.5,
        gt=0,
        description="A fetch not done this long after the request arrived is "
        "abandoned and the prefix recomputed.",
    )
    publish_queue_blocks: int = Field(
        4096,
        ge=1,
        description="Blocks waiting to be published; more are dropped (publishing never blocks a request).",
    )
    publish_batch_blocks: int = Field(64, ge=1, description="Most blocks per put call.")
    health: StoreHealthConfig = Field(
        default_factory=StoreHealthConfig, description="Failure detection and backoff."
    )


class RouterConfig(StrictModel):
    policy: Literal["cache_aware", "pow2"] = Field(
        "pow2",
        description="cache_aware: send a request where its prompt prefix is cached (unless load is "
        "imbalanced); pow2: Serve's power-of-two-choices.",
    )
    imbalance_abs: int = Field(
        8, ge=0, description="Load is imbalanced when max - min in-flight requests exceeds this ..."
    )
    imbalance_rel: float = Field(
        1.5, ge=1.0, description="... and max > imbalance_rel * min; then the least loaded replica wins."
    )
    min_match_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Below this fraction of matched prompt blocks the "
        "request goes to the replica with the least cached.",
    )
    max_blocks_per_replica: int = Field(65536, ge=1, description="Block hashes remembered per replica (LRU).")
    routing_stats_period_s: float = Field(
        2.0, gt=0, description="How often replicas report load and KV usage."
    )
