"""``StrictModel`` and ``load_config(path, cls, overrides)``.

Errors name the file, the field path and the offending value, on one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.errors import ConfigError

M = TypeVar("M", bound="StrictModel")


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, protected_namespaces=())


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def _coerce(text: str) -> Any:
    """Parse an override value as YAML (so ``4`` is an int, ``[a, b]`` a list, ``null`` None)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string; users mean a number
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["model.n_layers=4", "seed=1"]`` -> ``{"model": {"n_layers": 4}, "seed": 1}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, value = item.partition("=")
        parts = [k for k in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = _coerce(value)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "<root>"
    msg = first["msg"]
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown field {loc!r}{more}"
    if first["type"] == "missing":
        return f"{source}: {loc}: field required{more}"
    return f"{source}: {loc}: {msg} (got {first.get('input')!r}){more}"


def build(cls: type[M], data: dict[str, Any], source: str) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def load_config(path: str | os.PathLike[str] | None, cls: type[M], overrides: list[str] | None = None) -> M:
    """Load ``path`` (YAML) into ``cls``, applying dotted ``overrides``. ``path=None`` means defaults."""
    data = load_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides))
    return build(cls, data, str(path) if path is not None else "<defaults>")


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
