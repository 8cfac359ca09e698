"""``retort loadtest -c configs/loadtest/<preset>.yaml [key=value ...]``: a locust load test.

The config is validated here (exit 2 on bad input); the run itself is the entrypoint
``python -m serve.loadtest.runner`` in a subprocess (the CLI never imports ``serve``), which in
turn runs locust in its own process with a hard time limit. The last stdout line is the path of
the summary JSON; exit 0 when every SLO holds, 1 when one is broken or the endpoint is dead.
``--evaluate-only RUN_DIR`` re-judges an earlier run's samples (e.g. against other SLOs given as
overrides) without loading the endpoint again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from cluster.errors import RetortError

REPO = Path(__file__).resolve().parents[2]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="load the serving endpoint with locust; exit 1 if an SLO is broken")
    p.add_argument("-c", "--config", default=None, help="load-test config (configs/loadtest/<preset>.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument(
        "--evaluate-only",
        default=None,
        metavar="RUN_DIR",
        help="recompute an earlier run's summary and SLO verdict (overrides apply) without a new run",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from cluster.config.base import load_config
    from cluster.config.loadtest import LoadTestConfig

    if args.evaluate_only:
        if not (Path(args.evaluate_only) / "run.json").is_file():
            raise RetortError(f"{args.evaluate_only} is not a load-test run directory (no run.json)")
        if args.config:
            load_config(args.config, LoadTestConfig, args.overrides)
    else:
        load_config(
            args.config, LoadTestConfig, args.overrides
        )  # bad input: one line, exit 2, nothing started
    cmd = [sys.executable, "-m", "serve.loadtest.runner"]
    if args.config:
        cmd += ["-c", str(Path(args.config).resolve())]
    if args.evaluate_only:
        cmd += ["--evaluate-only", str(Path(args.evaluate_only).resolve())]
    cmd += list(args.overrides)
    return subprocess.call(cmd, env=_env())  # in the caller's cwd: a relative out_dir lands there


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
