"""A locust load test of the OpenAI-compatible endpoint: target, workload, load shape, SLOs.

``retort loadtest -c configs/loadtest/tiny.yaml`` validates this schema, writes the resolved
config as JSON and runs ``locust -f serve/loadtest/locustfile.py --headless`` in its own process
with ``RETORT_LOADTEST_CONFIG`` pointing at it; the plain locust UI reads the same variable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config.base import StrictModel


class TargetConfig(StrictModel):
    base_url: str = Field(
        "http://127.0.0.1:8000",
        pattern=r"^https?://",
        description="Base URL of the app (routes /v1/completions, /v1/chat/completions).",
    )
    model: str | None = Field(
        None, min_length=1, description="Model id sent in requests; None: the first id of GET /v1/models."
    )
    api_key: str | None = Field(
        None, description="Bearer key; None: the RETORT_API_KEY environment variable, if set."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Reachability check and connection timeout.")
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request still streaming after this is a failure."
    )


class WorkloadConfig(StrictModel):
    kind: Literal["fixed", "corpus", "shared_prefix"] = Field(
        "fixed",
        description="fixed: `prompts` in turn; corpus: random windows of the Python standard library's "
        "source files; shared_prefix: n_prefixes x n_suffixes prompts (a prefix-cache workload).",
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["Hello, my name is", "The capital of France is", "def fibonacci(n):"],
        description="Prompts of the fixed workload (also the suffixes of shared_prefix if given).",
    )
    prompt_words: int = Field(32, ge=1, description="corpus: words per sampled prompt.")
    n_prefixes: int = Field(4, ge=1, description="shared_prefix: number of distinct shared prefixes.")
    n_suffixes: int = Field(8, ge=1, description="shared_prefix: distinct suffixes per prefix.")
    prefix_words: int = Field(48, ge=1, description="shared_prefix: words per prefix (from the corpus).")
    suffix_words: int = Field(8, ge=1, description="shared_prefix: words per suffix (from the corpus).")
    max_tokens: int = Field(32, ge=1, description="max_tokens of every request.")
    ignore_eos: bool = Field(
        True, description="Generate exactly max_tokens (vLLM extension) so lengths are fixed."
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    stream: bool = Field(True, description="Stream (SSE); TTFT/TPOT/ITL are measured only when streaming.")
    chat_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of requests sent to /v1/chat/completions."
    )
    wait_s: tuple[float, float] = Field(
        (0.0, 0.0), description="Think time between a user's requests [min, max] s."
    )
    seed: int = Field(0, description="Seed of prompt sampling (per user: seed + user index).")

    @model_validator(mode="after")
    def _check(self) -> WorkloadConfig:
        if self.kind == "fixed" and not self.prompts:
            raise ValueError("workload.kind fixed needs at least one prompt")
        if self.wait_s[0] < 0 or self.wait_s[1] < self.wait_s[0]:
            raise ValueError(f"wait_s must be [min, max] with 0 <= min <= max (got {list(self.wait_s)})")
        return self


class Stage(StrictModel):
    duration_s: float = Field(..., gt=0, description="Length of this stage.")
    users: int = Field(..., ge=0, description="Concurrent users during this stage.")
    spawn_rate: float = Field(
        10.0, gt=0, description="Users started (or stopped) per second to reach `users`."
    )


class ShapeConfig(StrictModel):
    kind: Literal["steady", "ramp", "spike", "stages"] = Field(
        "steady",
        description="steady: `users` for duration_s; ramp: 1 -> users linearly over duration_s; "
        "spike: base_users, then users for spike_s, then base_users again; stages: the explicit list.",
    )
    users: int = Field(4, ge=1, description="Peak concurrent users.")
    spawn_rate: float = Field(10.0, gt=0, description="Users started per second.")
    duration_s: float = Field(30.0, gt=0, description="Total length of the test (steady, ramp, spike).")
    base_users: int = Field(1, ge=0, description="spike: users before and after the spike.")
    spike_start_s: float = Field(5.0, ge=0, description="spike: when the spike starts.")
    spike_s: float = Field(15.0, gt=0, description="spike: how long the spike lasts.")
    stages: list[Stage] = Field(default_factory=list, description="stages: run these in order, then stop.")

    @model_validator(mode="after")
    def _check(self) -> ShapeConfig:
        if self.kind == "stages" and not self.stages:
            raise ValueError("shape.kind stages needs at least one stage")
        if self.kind == "spike" and self.spike_start_s + self.spike_s > self.duration_s:
            raise ValueError(
                f"spike ends at {self.spike_start_s + self.spike_s} s, after duration_s {self.duration_s}"
            )
        return self

    def total_s(self) -> float:
        return sum(s.duration_s for s in self.stages) if self.kind == "stages" else self.duration_s


class SLOConfig(StrictModel):
    """Service-level objectives checked on the summary; None = not checked."""

    p99_ttft_s: float | None = Field(
        None, gt=0, description="99th percentile time to first token must be <= this."
    )
    p99_e2e_s: float | None = Field(
        None, gt=0, description="99th percentile end-to-end latency must be <= this."
    )
    p99_tpot_s: float | None = Field(
        None, gt=0, description="99th percentile time per output token must be <= this."
    )
    max_error_ratio: float | None = Field(
        None, ge=0, le=1, description="Failed / all requests must be <= this."
    )
    min_output_tok_s: float | None = Field(
        None, ge=0, description="Output tokens per second must be >= this."
    )


class LoadTestConfig(StrictModel):
    target: TargetConfig = Field(default_factory=TargetConfig, description="Which endpoint to load.")
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig, description="What each request asks.")
    shape: ShapeConfig = Field(default_factory=ShapeConfig, description="How many users, when.")
    slo: SLOConfig = Field(
        default_factory=SLOConfig, description="Pass/fail thresholds (exit 1 when broken)."
    )
    prometheus_url: str | None = Field(
        None,
        description="Prometheus for replica/throughput plots; None: the "
        "cluster of `retort up` if it runs, else no Prometheus plots.",
    )
    app_name: str = Field("retort", min_length=1, description="Serve application whose replicas are plotted.")
    deployment: str = Field(
        "ModelServer", min_length=1, description="Serve deployment whose replicas are counted."
    )
    out_dir: str = Field(
        "runs/loadtest", description="Each run writes <out_dir>/<timestamp>/ (CSV, summary, plots)."
    )
    time_limit_s: float | None = Field(
        None, gt=0, description="Hard limit on the locust process; default: the shape's length + 60 s."
    )
    loglevel: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="locust's log level."
    )
