"""``retort teacher -c FILE [key=value ...] [--local]``: pretrain or import a teacher -> registry.

Runs ``python -m train.teacher`` as a Ray job (or a local subprocess with ``--local``); its last
stdout line is the published registry ref (``teacher:3``). With ``topk.enabled=true`` it also
builds the teacher's top-k cache (``python -m train.topk -c FILE`` builds it on its own).
"""

from __future__ import annotations

import argparse

from cluster.jobs import add_job_args, run_job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "teacher",
        help="pretrain (or import) a teacher and publish it (last stdout line: registry ref)",
        description="Pretrain a teacher from scratch on the prepared corpus (source=pretrain) or import a "
        "Hugging Face checkpoint directory (source=import); evaluate its held-out perplexity and publish it "
        "to the registry with lineage and metrics.",
    )
    add_job_args(p)
    p.add_argument(
        "--topk",
        action="store_true",
        help="build the teacher's top-k cache (python -m train.topk) instead; last stdout line: its directory",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return run_job("teacher", "train.topk" if args.topk else "train.teacher", args)
