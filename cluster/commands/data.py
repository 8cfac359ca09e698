"""``retort data -c FILE [key=value ...] [--local]``: corpus -> tokenizer -> token shards.

Runs ``python -m train.data`` as a Ray job (or a local subprocess with ``--local``); its last
stdout line is the path of the data manifest.
"""

from __future__ import annotations

import argparse

from cluster.jobs import add_job_args, run_job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="corpus -> tokenizer -> token shards (last stdout line: manifest path)",
        description="Read the corpus, train (or reuse) the BPE tokenizer and write memory-mapped token "
        "shards under <out_dir>/<fingerprint[:16]>/; a re-run with the same inputs reuses them.",
    )
    add_job_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return run_job("data", "train.data", args)
