"""The thin ``main`` every job module uses: parse ``-c FILE key=value...``, validate, run, exit.

``python -m train.distill -c configs/distill/small.yaml optim.lr=1e-3`` and
``ray job submit -- python -m train.distill ...`` both land here. Exit codes: 0 done,
2 bad input (one line, no traceback), 1 the job failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from cluster.config import load_config, schema_for
from cluster.errors import RetortError


def parse_job_args(prog: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("-c", "--config", default=None, help="YAML config (defaults if omitted)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def job_main(kind: str, run: Callable[[Any], Any], prog: str, argv: list[str] | None = None) -> int:
    """Load the ``kind`` config and call ``run(cfg)``; map errors to exit codes."""
    args = parse_job_args(prog, argv)
    try:
        cfg = load_config(args.config, schema_for(kind), args.overrides)
        run(cfg)
    except RetortError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{prog}: failed (traceback above)", file=sys.stderr, flush=True)
        return 1
    return 0
