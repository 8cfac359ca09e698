"""Every metric name Retort emits, defined once.

Emitted with ``ray.util.metrics`` (Ray prefixes ``ray_`` on export, so ``retort_ttft_seconds``
is scraped as ``ray_retort_ttft_seconds``); dashboards and tests use ``exported(name)``.
Histograms get ``_bucket``/``_sum``/``_count`` suffixes in Prometheus as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EXPORT_PREFIX = "ray_"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
SERVE_TAGS = ("model", "replica")

# --- serving engine / ingress -------------------------------------------------------------
TTFT = Metric(
    "retort_time_to_first_token_seconds",
    "histogram",
    "Time from arrival to first output token.",
    SERVE_TAGS,
    LATENCY_BUCKETS,
)
TPOT = Metric(
    "retort_time_per_output_token_seconds",
    "histogram",
    "Mean time per output token after the first.",
    SERVE_TAGS,
    TOKEN_LATENCY_BUCKETS,
)
ITL = Metric(
    "retort_inter_token_latency_seconds",
    "histogram",
    "Gap between consecutive output tokens.",
    SERVE_TAGS,
    TOKEN_LATENCY_BUCKETS,
)
E2E = Metric(
    "retort_e2e_request_latency_seconds", "histogram", "Arrival to last token.", SERVE_TAGS, LATENCY_BUCKETS
)
QUEUE_TIME = Metric(
    "retort_request_queue_time_seconds",
    "histogram",
    "Arrival to first scheduling.",
    SERVE_TAGS,
    LATENCY_BUCKETS,
)
PROMPT_TOKENS = Metric("retort_prompt_tokens_total", "counter", "Prompt tokens processed.", SERVE_TAGS)
GENERATION_TOKENS = Metric(
    "retort_generation_tokens_total", "counter", "Output tokens generated.", SERVE_TAGS
)
RUNNING = Metric("retort_num_requests_running", "gauge", "Sequences in the running batch.", SERVE_TAGS)
WAITING = Metric("retort_num_requests_waiting", "gauge", "Sequences waiting for admission.", SERVE_TAGS)
KV_USAGE = Metric("retort_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use (0-1).", SERVE_TAGS)
PREFIX_QUERIES = Metric(
    "retort_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", SERVE_TAGS
)
PREFIX_HITS = Metric(
    "retort_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", SERVE_TAGS
)
PREEMPTIONS = Metric(
    "retort_num_preemptions_total",
    "counter",
    "Sequences preempted (recompute) for lack of KV blocks.",
    SERVE_TAGS,
)
RESPONSES = Metric(
    "retort_http_responses_total",
    "counter",
    "HTTP responses by route and status code.",
    ("model", "route", "status"),
)
DEPLOYED_VERSION = Metric(
    "retort_deployed_model_version",
    "gauge",
    "Registry version served (value = version number).",
    ("model", "app", "ref"),
)

# --- shared KV store / router ----------------------------------------------------------------
STORE_HITS = Metric(
    "retort_kv_store_hit_blocks_total", "counter", "Blocks fetched from the shared KV store.", ("backend",)
)
STORE_MISSES = Metric(
    "retort_kv_store_miss_blocks_total", "counter", "Blocks asked of the store and not found.", ("backend",)
)
STORE_BYTES_IN = Metric(
    "retort_kv_store_bytes_in_total", "counter", "Bytes put into the store.", ("backend",)
)
STORE_BYTES_OUT = Metric(
    "retort_kv_store_bytes_out_total", "counter", "Bytes read from the store.", ("backend",)
)
STORE_FETCH_LATENCY = Metric(
    "retort_kv_store_fetch_seconds", "histogram", "Batched fetch latency.", ("backend",), LATENCY_BUCKETS
)
STORE_EVICTIONS = Metric(
    "retort_kv_store_evictions_total", "counter", "Blocks evicted by the store's LRU.", ("backend",)
)
STORE_ERRORS = Metric(
    "retort_kv_store_errors_total",
    "counter",
    "Store operations that failed (request recomputed).",
    ("backend", "op"),
)
KV_FETCH_DECISIONS = Metric(
    "retort_kv_fetch_decisions_total",
    "counter",
    "Fetch-or-recompute decisions of the KV connector's policy (fetch, skip_cost, probe).",
    ("backend", "decision"),
)
ROUTER_DECISIONS = Metric(
    "retort_router_decisions_total", "counter", "Routing decisions by reason.", ("reason",)
)

# --- training ---------------------------------------------------------------------------------
TRAIN_TAGS = ("job", "mode")
TRAIN_LOSS = Metric("retort_train_loss", "gauge", "Total training loss of the last step.", TRAIN_TAGS)
TRAIN_KD_LOSS = Metric("retort_train_kd_loss", "gauge", "Distillation (KD) part of the loss.", TRAIN_TAGS)
TRAIN_CE_LOSS = Metric("retort_train_ce_loss", "gauge", "Cross-entropy part of the loss.", TRAIN_TAGS)
TRAIN_TOKENS_PER_S = Metric(
    "retort_train_tokens_per_second", "gauge", "Training throughput (all workers).", TRAIN_TAGS
)
TRAIN_STEP_TIME = Metric(
    "retort_train_step_seconds", "gauge", "Wall time of the last optimizer step.", TRAIN_TAGS
)
TRAIN_STEP = Metric("retort_train_step", "gauge", "Optimizer steps done.", TRAIN_TAGS)
TRAIN_WORKERS = Metric("retort_train_workers", "gauge", "Training workers alive.", TRAIN_TAGS)

# --- registry ---------------------------------------------------------------------------------
REGISTRY_PROMOTIONS = Metric(
    "retort_registry_promotions_total", "counter", "Alias moves in the registry.", ("model", "alias")
)

ALL: tuple[Metric, ...] = tuple(v for v in globals().values() if isinstance(v, Metric))


def exported(metric: Metric, suffix: str = "") -> str:
    """The name Prometheus sees, e.g. ``exported(TTFT, "_bucket")``."""
    return f"{EXPORT_PREFIX}{metric.name}{suffix}"


def make(metric: Metric, default_tags: dict[str, str] | None = None):
    """Create the ``ray.util.metrics`` object for ``metric`` (import of ray deferred)."""
    from ray.util import metrics as rm

    if metric.kind == "counter":
        m = rm.Counter(metric.name, description=metric.description, tag_keys=metric.tags)
    elif metric.kind == "gauge":
        m = rm.Gauge(metric.name, description=metric.description, tag_keys=metric.tags)
    else:
        m = rm.Histogram(
            metric.name, description=metric.description, boundaries=list(metric.buckets), tag_keys=metric.tags
        )
    if default_tags:
        m.set_default_tags(default_tags)
    return m
