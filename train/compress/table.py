"""The optimization table (the seed's section 9, measured) and the per-bit-width error table."""

from __future__ import annotations

from typing import Any


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB"


def optimization_table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    """rows: {name, params, nonzero_params, bytes, ppl, tok_s_b<N>..., [gate], [reasons]}; rows[0] = baseline.

    Cumulative speedup / compression are against the baseline row (decode tok/s at the first
    batch size; bytes on disk).
    """
    base = rows[0]
    b0 = f"tok_s_b{batches[0]}"
    head = [
        "variant",
        "params",
        "nonzero",
        "bytes",
        "block bytes",
        "ppl",
        "retention",
        *[f"tok/s b{b}" for b in batches],
        "speedup",
        "compression",
        "peak RSS (model)",
        "kernels",
        "gate",
    ]
    lines = []
    for r in rows:
        gate = r.get("gate", "")
        if r.get("reasons"):
            gate = f"{gate}: " + "; ".join(r["reasons"])
        lines.append(
            [
                r["name"],
                f"{r['params'] / 1e6:.3f}M",
                f"{r['nonzero_params'] / 1e6:.3f}M",
                _mb(r["bytes"]),
                f"{_mb(r['layer_bytes'])} ({r['layer_bytes'] / base['layer_bytes']:.2f})"
                if "layer_bytes" in r
                else "-",
                f"{r['ppl']:.3f}",
                f"{100 * base['ppl'] / r['ppl']:.1f}%",
                *[f"{r.get(f'tok_s_b{b}', float('nan')):.1f}" for b in batches],
                f"{r[b0] / base[b0]:.2f}x",
                f"{base['bytes'] / r['bytes']:.2f}x",
                f"{r.get('peak_rss_mb', float('nan')):.0f} MB ({r.get('model_rss_mb', float('nan')):.0f})",
                ",".join(r.get("kernels") or []) or "-",
                gate,
            ]
        )
    return render([head, *lines])


def bitwidth_table(mse: dict[int, float]) -> str:
    ref = mse.get(8)
    rows = [["bits", "weight MSE", "vs 8-bit"]]
    rows += [[str(b), f"{v:.3e}", f"{v / ref:.1f}x" if ref else "-"] for b, v in sorted(mse.items())]
    return render(rows)


def render(rows: list[list[str]]) -> str:
    """A Markdown table (prints aligned in a terminal, renders in report.md)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(rows[0]), sep, *map(fmt, rows[1:])])
