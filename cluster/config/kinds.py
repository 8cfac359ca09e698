"""Which schema validates which config file: the folder under ``configs/`` names the kind."""

from __future__ import annotations

import importlib
from pathlib import Path

from cluster.config.base import StrictModel, build, load_yaml
from cluster.errors import ConfigError

# kind -> "module:Class"; the module imports only pydantic.
KINDS: dict[str, str] = {
    "data": "cluster.config.data:DataConfig",
    "teacher": "cluster.config.teacher:TeacherConfig",
    "distill": "cluster.config.distill:DistillConfig",
    "compress": "cluster.config.compress:CompressConfig",
    "serve": "cluster.config.serve:ServeConfig",
    "loadtest": "cluster.config.loadtest:LoadTestConfig",
    "pipeline": "cluster.config.pipeline:PipelineConfig",
    "cluster": "cluster.config.cluster:ClusterConfig",
}


def schema_for(kind: str) -> type[StrictModel]:
    if kind not in KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    mod, _, cls = KINDS[kind].partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config kind {kind!r} is not available in this build ({e})") from None


def kind_of(path: Path) -> str:
    """``configs/distill/small.yaml`` -> ``distill``; a ``kind:`` key is not used, the folder is."""
    return path.resolve().parent.name


def validate_file(path: str | Path, kind: str | None = None) -> StrictModel:
    p = Path(path)
    k = kind or kind_of(p)
    return build(schema_for(k), load_yaml(p), str(p))
