"""``retort pipeline -c FILE``: the whole chain, resumable, ending with a report.

Last stdout line: the path of ``report.md``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="the whole chain: up, data, teacher, distill, compress, promote, serve, loadtest, report",
        description="Run every stage (each a Ray job, skipped when its outputs exist with the same fingerprint) "
        "and write runs/<name>/report.md + report.html. Last stdout line: the report.md path.",
    )
    p.add_argument("-c", "--config", required=True, help="configs/pipeline/<preset>.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the last run's state")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.config.pipeline import PipelineConfig
    from cluster.pipeline.orchestrator import Pipeline, run_pipeline
    from cluster.pipeline.report import write_report

    cfg = load_config(args.config, PipelineConfig, args.overrides)
    if args.report_only:
        pipe = Pipeline(cfg)
        pipe.outputs = {k: v["outputs"] for k, v in pipe.state.stages.items()}
        pipe.timings = {k: {"seconds": v["seconds"], "skipped": True} for k, v in pipe.state.stages.items()}
    else:
        pipe = run_pipeline(cfg)
    report = write_report(pipe)
    print(report)
    return 0
