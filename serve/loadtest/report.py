"""Summary JSON, SLO verdict and PNG plots of one load-test run.

The summary is computed from the exact per-request samples the locustfile writes (locust's own
stats round to whole milliseconds). Keys read by the pipeline report (keep them)::

    requests, failures, duration_s, requests_per_s, output_tokens_per_s,
    ttft_s / tpot_s / itl_s / e2e_s: {p50, p90, p99, mean}, max_replicas,
    slo: {passed, checks: [{name, threshold, value, passed}]}, plots: [absolute PNG paths],
    csv_prefix, target

Replica counts come from Prometheus (``ray_serve_deployment_replica_healthy`` summed over the
deployment's replicas) when a Prometheus URL is known.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cluster.config.loadtest import LoadTestConfig

REPLICAS_QUERY = 'sum(ray_serve_deployment_replica_healthy{{application="{app}",deployment="{deployment}"}})'


def load_samples(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill at the time limit
            continue
    return out


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation) and mean; None for no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def q(p: float) -> float:
        x = p * (len(v) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return v[lo] + (v[hi] - v[lo]) * (x - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(v) / len(v)}


def prometheus_url(cfg: LoadTestConfig) -> str | None:
    if cfg.prometheus_url:
        return cfg.prometheus_url.rstrip("/")
    try:
        from cluster.local_cluster import prometheus_url as running

        return running()
    except Exception:  # noqa: BLE001 - no cluster state: no Prometheus plots
        return None


def query_range(
    url: str, query: str, start: float, end: float, step: float, timeout_s: float = 10.0
) -> list[dict]:
    """Prometheus ``/api/v1/query_range``; the ``result`` list (matrix)."""
    qs = urllib.parse.urlencode(
        {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{qs}", timeout=timeout_s) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query failed: {body.get('error')}")
    return body["data"]["result"]


def replica_timeline(cfg: LoadTestConfig, start: float, end: float) -> tuple[list[tuple[float, float]], str]:
    """[(t, healthy replicas)] over the run from Prometheus, and a note when unavailable."""
    url = prometheus_url(cfg)
    if not url:
        return [], "no Prometheus URL (set prometheus_url or run `retort up`)"
    q = REPLICAS_QUERY.format(app=cfg.app_name, deployment=cfg.deployment)
    try:
        result = query_range(url, q, start, end, 1.0)
    except Exception as e:  # noqa: BLE001 - plots are best effort, the verdict does not depend on them
        return [], f"Prometheus at {url} failed: {e}"
    if not result:
        return [], f"Prometheus at {url} has no samples of {q}"
    return [(float(t), float(v)) for t, v in result[0]["values"]], ""


def slo_checks(cfg: LoadTestConfig, s: dict[str, Any]) -> list[dict[str, Any]]:
    """One check per configured SLO; a missing value (no data) fails the check."""
    slo = cfg.slo
    error_ratio = s["failures"] / s["requests"] if s["requests"] else 1.0
    specs = [
        ("p99_ttft_s", slo.p99_ttft_s, s["ttft_s"]["p99"], "<="),
        ("p99_tpot_s", slo.p99_tpot_s, s["tpot_s"]["p99"], "<="),
        ("p99_e2e_s", slo.p99_e2e_s, s["e2e_s"]["p99"], "<="),
        ("max_error_ratio", slo.max_error_ratio, error_ratio, "<="),
        ("min_output_tok_s", slo.min_output_tok_s, s["output_tokens_per_s"], ">="),
    ]
    checks = []
    for name, threshold, value, op in specs:
        if threshold is None:
            continue
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        checks.append({"name": name, "threshold": threshold, "value": value, "passed": bool(ok)})
    return checks


def summarize(run_dir: Path, cfg: LoadTestConfig, facts: dict[str, Any]) -> dict[str, Any]:
    samples = load_samples(run_dir)
    ok = [x for x in samples if x.get("ok")]
    if samples:
        t0 = min(x["t"] for x in samples)
        t1 = max(x["t"] + (x.get("e2e_s") or 0.0) for x in samples)
        duration = max(t1 - t0, 1e-9)
    else:
        t0, t1, duration = facts["t_start"], facts["t_end"], 0.0
    tokens = sum(int(x.get("output_tokens") or 0) for x in ok)
    s: dict[str, Any] = {
        "requests": len(samples),
        "failures": len(samples) - len(ok),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else 0.0,
        "output_tokens_per_s": tokens / duration if duration else 0.0,
        "output_tokens": tokens,
        "ttft_s": percentiles([x["ttft_s"] for x in ok if x.get("ttft_s") is not None]),
        "tpot_s": percentiles([x["tpot_s"] for x in ok if x.get("tpot_s") is not None]),
        "itl_s": percentiles([g for x in ok for g in x.get("itl_s") or []]),
        "e2e_s": percentiles([x["e2e_s"] for x in ok if x.get("e2e_s") is not None]),
        "errors": _error_counts(samples),
        # streamed requests whose tokens all decoded to '' (no TTFT); unary requests never have one
        "requests_without_text": sum(1 for x in ok if x.get("ttft_s") is None) if cfg.workload.stream else 0,
        "target": {"base_url": cfg.target.base_url, "model": cfg.target.model},
        "shape": cfg.shape.model_dump(mode="json"),
        "workload": cfg.workload.kind,
        "csv_prefix": str(run_dir / "locust"),
        "run_dir": str(run_dir),
        "window": {"start": facts["t_start"], "end": facts["t_end"]},
    }
    if facts.get("error"):
        s["error"] = facts["error"]
    timeline, note = (
        replica_timeline(cfg, facts["t_start"] - 5.0, facts["t_end"] + 1.0) if samples else ([], "")
    )
    if not timeline and facts.get("replicas"):  # re-judging a run after its Prometheus is gone
        timeline, note = [(float(t), float(v)) for t, v in facts["replicas"]], ""
    s["replicas"] = [[t, v] for t, v in timeline]
    s["max_replicas"] = max((v for _, v in timeline), default=None)
    s["final_replicas"] = timeline[-1][1] if timeline else None
    if note:
        s["replicas_note"] = note
    checks = slo_checks(cfg, s)
    passed = all(c["passed"] for c in checks) and not s.get("error")
    if s["requests"] == 0 and not s.get("error"):
        s["error"] = "no request completed"
        passed = False
    s["slo"] = {"passed": passed, "checks": checks}
    return s


def _error_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in samples:
        if not x.get("ok"):
            key = (x.get("error") or "unknown")[:120]
            out[key] = out.get(key, 0) + 1
    return out


def write(
    run_dir: Path, cfg: LoadTestConfig, facts: dict[str, Any], log=print, reuse_plots: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Compute the summary, render the plots (or keep the run's, when ``reuse_plots`` and they
    exist: re-judging SLOs changes no plot), write ``summary.json``, print the SLO table."""
    from serve.loadtest.plots import PLOTS, render

    summary = summarize(run_dir, cfg, facts)
    kept = [(run_dir / name).resolve() for name in PLOTS if (run_dir / name).is_file()]
    plots = (
        kept if reuse_plots and len(kept) == len(PLOTS) else render(run_dir, load_samples(run_dir), summary)
    )
    summary["plots"] = [str(p) for p in plots]
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    for line in table(summary):
        log(line)
    return path, summary


def _fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def table(s: dict[str, Any]) -> list[str]:
    """A human summary: headline numbers, then one row per SLO check."""
    lines = []
    if s.get("error"):
        lines.append(f"load test FAILED: {s['error']}")
    lines.append(
        f"requests {s['requests']}  failures {s['failures']}  duration {s['duration_s']:.1f} s  "
        f"{s['requests_per_s']:.2f} req/s  {s['output_tokens_per_s']:.1f} output tok/s  "
        f"max replicas {_fmt(s['max_replicas'])}"
    )
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = s[k]
        lines.append(f"  {k:<7} p50 {_fmt(p['p50'])}  p90 {_fmt(p['p90'])}  p99 {_fmt(p['p99'])}")
    if s["slo"]["checks"]:
        lines.append(f"  {'SLO':<18}{'threshold':>12}{'value':>12}  result")
        for c in s["slo"]["checks"]:
            lines.append(
                f"  {c['name']:<18}{_fmt(c['threshold']):>12}{_fmt(c['value']):>12}  "
                f"{'pass' if c['passed'] else 'BROKEN'}"
            )
    lines.append(f"SLOs {'passed' if s['slo']['passed'] else 'BROKEN'}")
    return lines
