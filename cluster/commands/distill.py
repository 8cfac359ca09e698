"""``retort distill -c FILE [key=value ...] [--local]``: Ray Train + DeepSpeed distillation -> registry.

Runs ``python -m train.distill`` as a Ray job on the running cluster (``retort up``), or as a
local subprocess with ``--local`` (which starts its own local Ray). Its last stdout line is the
published registry ref (``student:3``).
"""

from __future__ import annotations

import argparse

from cluster.jobs import add_job_args, run_job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a teacher into a student with Ray Train + DeepSpeed (last stdout line: registry ref)",
        description="Distill the registry teacher into a student: data parallel with ZeRO 0-3 (mode=zero) or a "
        "DeepSpeed pipeline (mode=pipeline, top-k cache labels); checkpoints and exact resume through Ray Train; "
        "the student is evaluated (held-out ppl, retention) and published with its lineage.",
    )
    add_job_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return run_job("distill", "train.distill", args)
