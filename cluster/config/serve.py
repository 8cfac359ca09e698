"""The Serve app: which model, which engine settings, autoscaling, limits, auth, HTTP.

``retort serve deploy -c configs/serve/tiny.yaml`` validates this schema, resolves
``model.ref`` in the registry to a concrete version and hands the whole resolved config to
``serve.app:build_app`` as the application's ``args`` (so a promoted alias changes the args and
Serve performs a rolling update).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config.base import StrictModel
from cluster.config.engine import EngineConfig
from cluster.config.kvstore import KVStoreConfig, RouterConfig
from cluster.config.registry import RegistryConfig


class HTTPConfig(StrictModel):
    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="Port of Serve's HTTP proxy (one per Ray cluster).")


class ServedModelConfig(StrictModel):
    ref: str = Field(
        "student@production",
        min_length=1,
        description="Registry reference: name@alias, name:version or name (latest).",
    )
    served_name: str | None = Field(
        None,
        min_length=1,
        description="Model id clients send and /v1/models lists; default: the registry name.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory; default: the model's own directory."
    )

    @property
    def registry_name(self) -> str:
        return self.ref.split("@", 1)[0].split(":", 1)[0]

    @property
    def public_name(self) -> str:
        return self.served_name or self.registry_name


class AutoscalingSpec(StrictModel):
    """Ray Serve's request-based autoscaling of the model-server deployment."""

    min_replicas: int = Field(
        1, ge=1, description="Replicas kept at all times (no scale to zero: model load is slow)."
    )
    max_replicas: int = Field(
        1, ge=1, description="Upper bound on replicas; equal to min_replicas = fixed size."
    )
    initial_replicas: int | None = Field(
        None, ge=1, description="Replicas at first deploy; default min_replicas."
    )
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Requests in flight per replica Serve aims for."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="Load must stay high this long before adding replicas."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Load must stay low this long before removing replicas."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which ongoing requests are averaged."
    )
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report their load.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if (
            self.initial_replicas is not None
            and not self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie in [min_replicas, max_replicas]"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.max_replicas > self.min_replicas


class LimitsConfig(StrictModel):
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request bodies above this size get 413.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still running after this gets 408.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one model-server replica runs at once.")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests queued per caller before 503 + Retry-After; -1 = unbounded."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After header value on 503/429.")
    default_max_tokens: int = Field(
        16, ge=1, description="max_tokens when the request leaves it out (OpenAI: 16)."
    )
    max_stop_strings: int = Field(4, ge=0, description="Most stop strings one request may give (OpenAI: 4).")

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1")
        return self


class AuthConfig(StrictModel):
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted bearer keys; empty and env unset = no auth (bind to loopback).",
    )
    env_var: str = Field(
        "RETORT_API_KEYS",
        min_length=1,
        description="Environment variable with comma-separated keys, added to api_keys.",
    )


class ReplicaConfig(StrictModel):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model-server replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per model-server replica.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads in each replica; default torch's."
    )
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per ingress replica.")
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve calls check_health.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="In-flight requests get this long when a replica stops."
    )


class ServeConfig(StrictModel):
    app_name: str = Field("retort", min_length=1, description="Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP prefix of the app's routes.")
    http: HTTPConfig = Field(default_factory=HTTPConfig, description="Serve's HTTP proxy address.")
    model: ServedModelConfig = Field(default_factory=ServedModelConfig, description="What to serve.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Engine settings of every replica."
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Model-server replica scaling."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits and backpressure.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Bearer API keys.")
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Replica resources and health.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Where model.ref is resolved."
    )
    deploy_timeout_s: float = Field(
        600.0, gt=0, description="`retort serve deploy` waits this long for RUNNING."
    )
    kv_store: KVStoreConfig = Field(
        default_factory=KVStoreConfig, description="KV block store shared by replicas."
    )
    router: RouterConfig = Field(
        default_factory=RouterConfig, description="How requests pick a model-server replica."
    )
    topology: Literal["split", "collocated"] = Field(
        "split",
        description="split: HTTP ingress replicas call model-server replicas through a DeploymentHandle "
        "(cache-aware routing; ingress and engines scale apart); collocated: every model-server replica serves "
        "HTTP itself (one process hop less; Serve's proxy routes by load only).",
    )

    @model_validator(mode="after")
    def _check_topology(self) -> ServeConfig:
        if self.topology == "collocated" and self.router.policy == "cache_aware":
            raise ValueError(
                "router.policy cache_aware needs topology split: with collocated replicas Serve's proxy "
                "picks the replica before the prompt is tokenized"
            )
        return self
