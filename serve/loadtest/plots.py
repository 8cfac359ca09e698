"""PNG plots of a load-test run (matplotlib, Agg): latency CDFs, and throughput, latency and
replica count over time (replicas from Prometheus, when the summary has them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("latency_cdf.png", "timeline.png")


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    v = sorted(values)
    ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=f"{label} (n={len(v)})")


def latency_cdf(run_dir: Path, samples: list[dict[str, Any]]) -> Path:
    import matplotlib.pyplot as plt

    ok = [x for x in samples if x.get("ok")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _cdf(axes[0], [x["ttft_s"] for x in ok if x.get("ttft_s") is not None], "TTFT")
    _cdf(axes[0], [x["e2e_s"] for x in ok if x.get("e2e_s") is not None], "E2E")
    _cdf(axes[1], [x["tpot_s"] for x in ok if x.get("tpot_s") is not None], "TPOT")
    _cdf(axes[1], [g for x in ok for g in x.get("itl_s") or []], "ITL")
    if axes[1].lines:
        axes[1].set_xscale("log")  # per-token gaps span microseconds (one flush) to a scheduling stall
    for ax, title in zip(axes, ("request latency", "per-token latency"), strict=True):
        ax.set(title=f"{title} CDF", xlabel="seconds", ylabel="fraction <= x")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path = run_dir / PLOTS[0]
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bins(samples: list[dict[str, Any]], t0: float, width: float) -> dict[int, list[dict[str, Any]]]:
    """Completed requests grouped by the bin of their end time."""
    out: dict[int, list[dict[str, Any]]] = {}
    for x in samples:
        if x.get("ok"):
            out.setdefault(int((x["t"] + x["e2e_s"] - t0) // width), []).append(x)
    return out


def timeline(
    run_dir: Path, samples: list[dict[str, Any]], summary: dict[str, Any], width: float = 2.0
) -> Path:
    import matplotlib.pyplot as plt

    t0 = summary["window"]["start"]
    bins = _bins(samples, t0, width)
    xs = sorted(bins)
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ts = [(b + 0.5) * width for b in xs]
    axes[0].plot(ts, [len(bins[b]) / width for b in xs], label="requests/s")
    axes[0].plot(
        ts, [sum(x["output_tokens"] for x in bins[b]) / width / 10 for b in xs], label="output tokens/s ÷ 10"
    )
    axes[0].set(title="throughput (completed)", ylabel="per second")
    for key, label in (("e2e_s", "E2E"), ("ttft_s", "TTFT")):
        axes[1].plot(
            ts,
            [_median([x[key] for x in bins[b] if x.get(key) is not None]) for b in xs],
            label=f"{label} p50",
        )
    axes[1].set(title="latency", ylabel="seconds")
    reps = summary.get("replicas") or []
    if reps:
        axes[2].step([t - t0 for t, _ in reps], [v for _, v in reps], where="post", label="healthy replicas")
        axes[2].set_ylim(0, max(v for _, v in reps) + 1)
    else:
        axes[2].text(
            0.5,
            0.5,
            summary.get("replicas_note", "no replica data"),
            ha="center",
            va="center",
            transform=axes[2].transAxes,
        )
    axes[2].set(
        title="replicas (Prometheus) and users (load shape)", xlabel="seconds since start", ylabel="replicas"
    )
    _users(axes[2].twinx(), summary)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper right")
    fig.tight_layout()
    path = run_dir / PLOTS[1]
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _users(ax, summary: dict[str, Any]) -> None:
    """The shape's planned user count as a dashed step line (right axis)."""
    from serve.loadtest.shapes import stages

    plan = stages(summary["shape"])
    xs, ys, start = [], [], 0.0
    for end, users, _rate in plan:
        xs += [start, end]
        ys += [users, users]
        start = end
    ax.plot(xs, ys, linestyle="--", color="gray", linewidth=1)
    ax.set_ylabel("users (dashed)", color="gray")
    ax.set_ylim(0, max(ys, default=1) + 1)


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


def render(run_dir: Path, samples: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """Every plot of the run, as absolute paths (none when no request was sent)."""
    import matplotlib

    matplotlib.use("Agg")
    if not samples:
        return []
    return [latency_cdf(run_dir, samples).resolve(), timeline(run_dir, samples, summary).resolve()]
