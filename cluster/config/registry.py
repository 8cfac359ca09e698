"""Where the model registry lives; embedded in every job config that reads or writes models."""

from __future__ import annotations

from pydantic import Field

from cluster.config.base import StrictModel


class RegistryConfig(StrictModel):
    root: str = Field(
        "~/.retort/registry",
        description="Registry root: a local path or an fsspec/pyarrow URI (s3://bucket/prefix). "
        "The RETORT_REGISTRY environment variable overrides it.",
    )
    cache_dir: str = Field(
        "~/.retort/cache", description="Local cache for remote roots (verified before use)."
    )
