"""Compare two manifests: files, config.json, metrics, lineage and the headline facts."""

from __future__ import annotations

from typing import Any

HEADLINE = (
    "architecture",
    "model_type",
    "num_parameters",
    "num_tensors",
    "size_bytes",
    "quantization",
    "pruning",
)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1]}`` -> ``{"a.b": 1, "c": [1]}`` (lists stay whole)."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def changed(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Keys whose (flattened) values differ: ``{key: {"a": old, "b": new}}`` (missing = None)."""
    fa, fb = flatten(a or {}), flatten(b or {})
    return {
        k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)
    }


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def diff_manifests(ma: dict[str, Any], mb: dict[str, Any]) -> dict[str, Any]:
    fa, fb = ma["files"], mb["files"]
    files = {
        "added": sorted(fb.keys() - fa.keys()),
        "removed": sorted(fa.keys() - fb.keys()),
        "changed": [
            {
                "path": p,
                "a_sha256": fa[p]["sha256"],
                "b_sha256": fb[p]["sha256"],
                "a_size": fa[p]["size"],
                "b_size": fb[p]["size"],
            }
            for p in sorted(fa.keys() & fb.keys())
            if fa[p]["sha256"] != fb[p]["sha256"]
        ],
        "unchanged": sorted(p for p in fa.keys() & fb.keys() if fa[p]["sha256"] == fb[p]["sha256"]),
    }
    metrics = changed(ma.get("metrics"), mb.get("metrics"))
    for rec in metrics.values():
        if _number(rec["a"]) and _number(rec["b"]):
            rec["delta"] = rec["b"] - rec["a"]
            if rec["a"]:
                rec["ratio"] = rec["b"] / rec["a"]
    return {
        "a": ma["ref"],
        "b": mb["ref"],
        "identical_files": not files["added"] and not files["removed"] and not files["changed"],
        "files": files,
        "summary": changed({k: ma.get(k) for k in HEADLINE}, {k: mb.get(k) for k in HEADLINE}),
        "config": changed(ma.get("config"), mb.get("config")),
        "metrics": metrics,
        "lineage": changed(ma.get("lineage"), mb.get("lineage")),
    }
