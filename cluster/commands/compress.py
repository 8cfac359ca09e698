"""``retort compress -c FILE [key=value ...] [--local]``: prune / quantize / gate -> registry.

Runs ``python -m train.compress`` as a Ray job (or a local subprocess with ``--local``). Exit 1
when a variant fails its gate (the printed table says why; nothing is published for it).
"""

from __future__ import annotations

import argparse

from cluster.jobs import add_job_args, run_job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="prune / quantize a registered model, evaluate, gate, publish the passing variants",
        description="Build every configured variant (magnitude / 2:4 / structured pruning; int8, int4, "
        "w8a8 quantization with RTN or AWQ calibration) from the source model, measure perplexity, "
        "size, RAM and decode speed against it, and publish only the variants that pass the gate.",
    )
    add_job_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return run_job("compress", "train.compress", args)
