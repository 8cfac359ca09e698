"""``retort``: one entry point, subcommands in data-flow order.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the module is
imported only to build the parser and must keep heavy imports (torch, ray, deepspeed) inside
its handler, so ``retort --help`` stays instant. A module that is not in this build is not
listed: only commands that work appear.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from cluster.errors import RetortError

# (module, one-line help) in data-flow order.
COMMANDS: list[str] = [
    "cluster.commands.up",  # up | down | status
    "cluster.commands.validate",
    "cluster.commands.data",
    "cluster.commands.teacher",
    "cluster.commands.distill",
    "cluster.commands.compress",
    "cluster.commands.registry",
    "cluster.commands.serve",
    "cluster.commands.loadtest",
    "cluster.commands.dashboards",
    "cluster.commands.pipeline",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retort",
        description="Distill, compress, register and serve language models on a Ray cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        rc = args.handler(args)
    except RetortError as e:
        print(f"retort: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("retort: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `retort ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
