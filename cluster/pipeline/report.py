"""The run report: ``runs/<name>/report.md`` + ``report.html`` + PNGs.

The seed notebook's tables and figures, with measured values: memory by precision, pruning
statistics and weight histograms, quantization error by bit width, KD vs no-KD, the
optimization table, serving latency and throughput, cost and memory-bandwidth analyses.
A section whose stage did not run says so instead of showing made-up numbers.
"""

from __future__ import annotations

import html
import json
import platform
import shutil
from pathlib import Path
from typing import Any

from cluster.pipeline import analysis as an
from cluster.pipeline.runner import fmt_duration


class Doc:
    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (head, [[an.describe(c) for c in r] for r in rows])))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path.name, alt)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append(f"{'#' * val[0]} {val[1]}\n")
            elif kind == "p":
                out.append(val + "\n")
            elif kind == "table":
                head, rows = val
                out.append("| " + " | ".join(head) + " |")
                out.append("|" + "|".join("---" for _ in head) + "|")
                out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                out.append(f"![{val[1]}]({val[0]})\n")
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>",
        ]
        for kind, val in self.blocks:
            if kind == "h":
                out.append(f"<h{val[0]}>{html.escape(val[1])}</h{val[0]}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(val)}</p>")
            elif kind == "table":
                head, rows = val
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
                out += [
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
                ]
                out.append("</table>")
            elif kind == "img":
                out.append(f"<img src='{html.escape(val[0])}' alt='{html.escape(val[1])}'>")
        out.append("</body></html>")
        return "\n".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _manifest(pipe, ref: str | None) -> dict[str, Any] | None:
    if not ref:
        return None
    try:
        return pipe.registry.show(ref)
    except Exception:  # noqa: BLE001 - a missing model makes its section say so
        return None


def _metric(m: dict[str, Any] | None, *keys: str) -> Any:
    if not m:
        return None
    metrics = m.get("metrics", {})
    for k in keys:
        if metrics.get(k) is not None:
            return metrics[k]
    return None


PPL_KEYS = ("val_ppl", "ppl", "student_ppl", "perplexity")
TOKS_KEYS = ("tok_s_b1", "decode_tok_s_b1", "tokens_per_s")


def section_stages(doc: Doc, pipe) -> None:
    doc.h("Stages")
    rows = [
        [name, fmt_duration(t["seconds"]), "skipped (up to date)" if t.get("skipped") else "ran"]
        for name, t in pipe.timings.items()
        if name != "total"
    ]
    doc.table(["stage", "wall time", "status"], rows)
    if "total" in pipe.timings:
        doc.p(
            f"Total wall time: {fmt_duration(pipe.timings['total']['seconds'])} on {platform.machine()} "
            f"({_cpu_count()} CPU cores)."
        )


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def section_models(doc: Doc, pipe, models: dict[str, dict[str, Any] | None]) -> None:
    doc.h("Models in the registry")
    teacher_ppl = _metric(models.get("teacher"), *PPL_KEYS)
    student_windows = _metric(models.get("student"), "teacher_val_ppl")
    rows = []
    for role, m in models.items():
        if not m:
            continue
        ppl = _metric(m, *PPL_KEYS)
        # the teacher on the students' eval windows (both distillation jobs evaluate the same held-out tokens)
        same = (
            teacher_ppl
            if role == "teacher"
            else (_metric(m, "teacher_val_ppl") or student_windows or teacher_ppl)
        )
        rows.append(
            [
                role,
                f"{m['name']}:{m['version']}",
                m.get("num_parameters"),
                f"{m['size_bytes'] / 1e6:.2f} MB",
                ppl,
                f"{100 * same / ppl:.1f}%" if same and ppl else None,
                (m.get("quantization") or {}).get("scheme") or "fp32",
            ]
        )
    doc.table(["role", "ref", "params", "on disk", "held-out ppl", "retention", "weights"], rows)
    doc.p(
        "Retention = teacher ppl / model ppl on the same held-out windows: the distillation jobs evaluate the "
        "teacher on the students' windows; the teacher's own row is its pretraining job's evaluation."
    )


def section_kd(doc: Doc, models: dict[str, dict[str, Any] | None]) -> None:
    doc.h("Knowledge distillation vs training from scratch")
    kd, nokd, teacher = models.get("student"), models.get("student (no KD)"), models.get("teacher")
    if not kd or not nokd:
        doc.p("The no-KD baseline stage did not run in this pipeline (pipeline.baseline.enabled=false).")
        return
    p_kd, p_no = _metric(kd, *PPL_KEYS), _metric(nokd, *PPL_KEYS)
    # the teacher measured by each distillation job on that student's windows (same tokens, same
    # context); the teacher job's own number is on other windows and only a fallback
    t_kd = _metric(kd, "teacher_val_ppl") or _metric(nokd, "teacher_val_ppl") or _metric(teacher, *PPL_KEYS)
    t_no = _metric(nokd, "teacher_val_ppl") or t_kd  # both jobs evaluate the same held-out windows
    doc.table(
        ["student", "held-out ppl", "teacher ppl (same windows)", "vs teacher", "vs no-KD"],
        [
            ["with KD", p_kd, t_kd, f"{p_kd / t_kd:.2f}×" if t_kd else None, f"{p_kd / p_no:.2f}×"],
            ["no KD (same tokens, same steps)", p_no, t_no, f"{p_no / t_no:.2f}×" if t_no else None, "1.00×"],
        ],
    )


def section_memory(doc: Doc, pipe, models, out: Path) -> None:
    doc.h("Memory by precision")
    rows, plot = [], {}
    for role in ("teacher", "student"):
        m = models.get(role)
        if not m or not m.get("num_parameters"):
            continue
        est = an.bytes_by_precision(int(m["num_parameters"]))
        plot[role] = est
        rows.append([role + " (weights, computed)", *[f"{v / 1e6:.2f} MB" for v in est.values()]])
    doc.table(["model", "fp32", "bf16", "int8", "int4 (g128)"], rows)
    measured = []
    for v in (pipe.outputs.get("compress") or {}).get("variants", []):
        m = _manifest(pipe, v["ref"])
        if not m:
            continue
        try:
            loaded = an.loaded_bytes(pipe.registry.resolve(v["ref"]))
        except Exception as e:  # noqa: BLE001
            loaded = f"not loadable here: {e}"
        measured.append(
            [
                v["ref"],
                v.get("quantization") or "fp32",
                f"{m['size_bytes'] / 1e6:.2f} MB",
                f"{loaded / 1e6:.2f} MB" if isinstance(loaded, int) else loaded,
            ]
        )
    if measured:
        doc.p(
            "Measured for the registered variants (on disk: every file of the version; loaded: every tensor "
            "of the model as the engine holds it):"
        )
        doc.table(["variant", "weights", "on disk", "loaded"], measured)
    if plot:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(plot)
        for i, (role, est) in enumerate(plot.items()):
            ax.bar([x + i * width for x in range(4)], [v / 1e6 for v in est.values()], width, label=role)
        ax.set_xticks(
            [x + width * (len(plot) - 1) / 2 for x in range(4)], list(next(iter(plot.values())).keys())
        )
        ax.set_ylabel("MB")
        ax.set_title("Weight memory by precision")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_by_precision.png", dpi=110)
        plt.close(fig)
        doc.img(out / "memory_by_precision.png", "weight memory by precision")


def section_weights(doc: Doc, pipe, models, out: Path) -> None:
    student = models.get("student")
    if not student:
        return
    base_w = an.linear_weights(pipe.registry.resolve(f"{student['name']}:{student['version']}"))
    doc.h("Quantization error by bit width (real weights)")
    mse = an.quant_mse_by_bits(base_w)
    doc.table(["bits", "weight MSE", "vs 8-bit"], [[b, v, f"{v / mse[8]:.1f}×"] for b, v in mse.items()])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.semilogy(list(mse), list(mse.values()), marker="o")
    ax.set_xlabel("bits (symmetric per-channel RTN; 1 = sign × mean|w|)")
    ax.set_ylabel("MSE")
    ax.set_title(f"Quantization error on {student['name']}:{student['version']}")
    fig.tight_layout()
    fig.savefig(out / "quant_error_by_bits.png", dpi=110)
    plt.close(fig)
    doc.img(out / "quant_error_by_bits.png", "quantization error by bit width")

    pruned = next(
        (v for v in (pipe.outputs.get("compress") or {}).get("variants", []) if v.get("sparsity")), None
    )
    doc.h("Pruning")
    if not pruned:
        doc.p("No pruned variant was published in this run.")
        return
    try:
        pw = an.linear_weights(pipe.registry.resolve(pruned["ref"]))
    except Exception as e:  # noqa: BLE001 - a quantized pruned variant has no float matrices to histogram
        doc.p(f"{pruned['ref']}: sparsity {pruned['sparsity']}; weights not histogrammed ({e}).")
        return
    per_layer = an.sparsity_by_layer(pw)
    doc.table(["layer", "sparsity (zeros)"], [[k, f"{100 * v:.1f}%"] for k, v in per_layer.items()])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, (title, w) in zip(axes, [("before", base_w), (f"after ({pruned['ref']})", pw)], strict=True):
        data = an.histogram_data(w)
        ax.hist(data, bins=120, log=True)
        ax.set_title(f"weights {title}")
    fig.tight_layout()
    fig.savefig(out / "weight_histograms.png", dpi=110)
    plt.close(fig)
    doc.img(out / "weight_histograms.png", "weight histograms before and after pruning")


def section_optimization(doc: Doc, pipe, models) -> None:
    """Baseline -> each published variant, as the compress job measured them (same eval, same decode bench).

    The job stores each variant's speedup and retention against the uncompressed source it measured in
    the same run, so the baseline row is derived from those (tok/s = variant tok/s / speedup).
    """
    doc.h("Optimization pipeline (measured)")
    student = models.get("student")
    variants = [
        (v["ref"], _manifest(pipe, v["ref"]))
        for v in (pipe.outputs.get("compress") or {}).get("variants", [])
    ]
    variants = [(r, m) for r, m in variants if m and m.get("metrics", {}).get("speedup")]
    if not student or not variants:
        doc.p("The compression stage did not run.")
        return
    first = variants[0][1]["metrics"]
    base_toks = first["tok_s_b1"] / first["speedup"]
    base_ppl = first["ppl"] * first["retention"]
    base_bytes = student["size_bytes"]
    rows = [
        [
            f"{student['name']}:{student['version']} (fp32, uncompressed)",
            student.get("num_parameters"),
            f"{base_bytes / 1e6:.2f} MB",
            base_ppl,
            "100.0%",
            base_toks,
            "1.00×",
            "1.00×",
        ]
    ]
    for ref, m in variants:
        x = m["metrics"]
        rows.append(
            [
                f"{ref} ({(m.get('quantization') or {}).get('scheme') or 'pruned'})",
                x.get("nonzero_params"),
                f"{m['size_bytes'] / 1e6:.2f} MB",
                x["ppl"],
                f"{100 * x['retention']:.1f}%",
                x["tok_s_b1"],
                f"{x['speedup']:.2f}×",
                f"{base_bytes / m['size_bytes']:.2f}×",
            ]
        )
    doc.table(
        [
            "variant",
            "non-zero params",
            "bytes on disk",
            "ppl",
            "retention",
            "decode tok/s (b1)",
            "speedup",
            "compression",
        ],
        rows,
    )
    served = pipe.outputs.get("promote", {}).get("ref")
    if served:
        doc.p(
            f"Promoted to @{pipe.cfg.promote_alias} and served: {served} (best {pipe.cfg.promote_by}). "
            "Variants that failed the gate were not published; the compress log lists why."
        )


def _pcts(d: dict[str, Any] | None) -> list[Any]:
    d = d or {}
    return [d.get("p50"), d.get("p90"), d.get("p99")]


def section_serving(doc: Doc, pipe, out: Path) -> dict[str, Any] | None:
    doc.h("Serving under load")
    lt = pipe.outputs.get("loadtest")
    if not lt or not Path(lt["summary"]).is_file():
        doc.p("The load test did not run.")
        return None
    s = json.loads(Path(lt["summary"]).read_text())
    doc.table(
        ["metric", "p50", "p90", "p99"],
        [
            ["TTFT (s)", *_pcts(s.get("ttft_s"))],
            ["time per output token (s)", *_pcts(s.get("tpot_s"))],
            ["inter-token latency (s)", *_pcts(s.get("itl_s"))],
            ["end-to-end (s)", *_pcts(s.get("e2e_s"))],
        ],
    )
    doc.table(
        ["requests", "failures", "duration (s)", "requests/s", "output tok/s", "SLO gate"],
        [
            [
                s.get("requests"),
                s.get("failures"),
                s.get("duration_s"),
                s.get("requests_per_s"),
                s.get("output_tokens_per_s"),
                "passed" if s.get("slo", {}).get("passed") else "failed",
            ]
        ],
    )
    for png in s.get("plots", []):
        src = Path(png)
        if src.is_file():
            shutil.copy(src, out / src.name)
            doc.img(out / src.name, src.stem.replace("_", " "))
    return s


def section_cost(doc: Doc, pipe, serving: dict[str, Any] | None) -> None:
    doc.h("Cost analysis")
    if not serving or not serving.get("output_tokens_per_s"):
        doc.p("Needs the load test's measured throughput; it did not run.")
        return
    c = pipe.cfg.cost
    replicas_seen = max(1, int(serving.get("max_replicas") or 1))
    per_replica = float(serving["output_tokens_per_s"]) / replicas_seen
    n = an.replicas_needed(c.requests_per_day, c.output_tokens_per_request, per_replica, c.headroom)
    doc.p(
        f"Assumptions (pipeline config `cost`): {c.requests_per_day:,} requests/day × "
        f"{c.output_tokens_per_request} output tokens, {c.headroom}× headroom, "
        f"${c.replica_cost_per_hour:.2f} per replica-hour. Throughput per replica measured by the load test: "
        f"{per_replica:.1f} output tok/s ({replicas_seen} replica(s) at peak)."
    )
    doc.table(
        ["mean load (tok/s)", "replicas needed", "cost per day", "cost per 1M output tokens"],
        [
            [
                c.requests_per_day * c.output_tokens_per_request / 86400,
                n,
                f"${n * 24 * c.replica_cost_per_hour:.2f}",
                f"${n * 24 * c.replica_cost_per_hour / (c.requests_per_day * c.output_tokens_per_request / 1e6):.4f}",
            ]
        ],
    )


def section_bandwidth(doc: Doc, pipe, models) -> None:
    doc.h("Memory-bandwidth analysis of the served model")
    served = pipe.outputs.get("promote", {}).get("ref")
    m = _manifest(pipe, served)
    if not m:
        doc.p("No model was served in this run.")
        return
    try:
        weight_bytes = an.loaded_bytes(pipe.registry.resolve(served))
    except Exception:  # noqa: BLE001
        weight_bytes = m["size_bytes"]
    bw = an.memory_bandwidth_gbs()
    toks = _metric(m, *TOKS_KEYS)
    floor = bw * 1e9 / weight_bytes
    rows = [
        [
            served,
            f"{weight_bytes / 1e6:.2f} MB",
            f"{bw:.1f} GB/s",
            f"{floor:,.0f}",
            toks,
            f"{100 * toks / floor:.1f}%" if toks else None,
        ]
    ]
    doc.table(
        [
            "model",
            "bytes read per decode step (b1)",
            "measured copy bandwidth",
            "bandwidth-bound tok/s (b1)",
            "measured tok/s (b1)",
            "of the bound",
        ],
        rows,
    )
    doc.p(
        "At batch 1 every generated token reads all weights once, so tokens/s ≤ bandwidth / weight bytes; "
        "batching amortises the read across sequences, which is why the engine batches decode."
    )


def write_report(pipe) -> Path:
    out = pipe.dir
    out.mkdir(parents=True, exist_ok=True)
    doc = Doc()
    doc.h(f"Retort run report — {pipe.cfg.name}", 1)
    models = {
        "teacher": _manifest(pipe, (pipe.outputs.get("teacher") or {}).get("ref")),
        "student": _manifest(pipe, (pipe.outputs.get("distill") or {}).get("ref")),
        "student (no KD)": _manifest(pipe, (pipe.outputs.get("baseline") or {}).get("ref")),
    }
    section_stages(doc, pipe)
    section_models(doc, pipe, models)
    section_kd(doc, models)
    section_memory(doc, pipe, models, out)
    section_weights(doc, pipe, models, out)
    section_optimization(doc, pipe, models)
    serving = section_serving(doc, pipe, out)
    section_cost(doc, pipe, serving)
    section_bandwidth(doc, pipe, models)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"Retort run report — {pipe.cfg.name}"))
    return out / "report.md"
