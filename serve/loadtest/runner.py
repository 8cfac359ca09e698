"""Run one headless locust load test in its own process, bounded in time, then summarize it.

``run(cfg)`` checks that the endpoint answers (``GET /v1/models``, bounded by
``target.connect_timeout_s``) before anything else: a dead endpoint gives a summary that says so
and no locust run. Otherwise it writes the resolved config as JSON, starts
``python -m locust -f serve/loadtest/locustfile.py --headless --csv ...`` as a subprocess (locust's
gevent patching must not meet torch or ray), kills it after ``time_limit_s``, and hands the
per-request samples to ``report.summarize``. Each run is ``<out_dir>/<UTC timestamp>/``:
``config.json``, ``run.json``, ``samples.jsonl``, ``locust_*.csv``, ``locust.log``,
``summary.json`` and the PNG plots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cluster.config.loadtest import LoadTestConfig

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO = LOCUSTFILE.parents[2]


class Unreachable(Exception):
    """The endpoint did not answer ``GET /v1/models`` with a model list."""


def api_key(cfg: LoadTestConfig) -> str | None:
    return cfg.target.api_key or os.environ.get("RETORT_API_KEY") or None


def probe(cfg: LoadTestConfig) -> str:
    """The model id to send: ``target.model``, else the first of ``GET /v1/models``. Raises Unreachable."""
    url = cfg.target.base_url.rstrip("/") + "/v1/models"
    key = api_key(cfg)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=cfg.target.connect_timeout_s) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise Unreachable(
            f"GET {url} answered HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
        ) from None
    except (OSError, ValueError) as e:
        raise Unreachable(f"GET {url} failed: {getattr(e, 'reason', e)}") from None
    ids = [m.get("id") for m in data.get("data") or [] if isinstance(m, dict)]
    if cfg.target.model:
        if cfg.target.model not in ids:
            raise Unreachable(f"{url} does not serve model {cfg.target.model!r} (it serves {ids})")
        return cfg.target.model
    if not ids:
        raise Unreachable(f"{url} lists no model")
    return str(ids[0])


def new_run_dir(cfg: LoadTestConfig) -> Path:
    root = Path(cfg.out_dir).expanduser()
    if not root.is_absolute():
        root = Path.cwd() / root
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    d = root / stamp
    n = 1
    while d.exists():
        n += 1
        d = root / f"{stamp}-{n}"
    d.mkdir(parents=True)
    return d


def locust_command(cfg: LoadTestConfig, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        cfg.target.base_url,
        "--csv",
        str(run_dir / "locust"),
        "--csv-full-history",
        "--loglevel",
        cfg.loglevel,
        "--logfile",
        str(run_dir / "locust.log"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
    ]


def run_locust(cfg: LoadTestConfig, run_dir: Path, log=print) -> dict[str, Any]:
    """Start locust, wait for it (at most ``time_limit_s``), return run facts (times, exit code, killed)."""
    limit = cfg.time_limit_s or cfg.shape.total_s() + 60.0
    env = {
        **os.environ,
        "RETORT_LOADTEST_CONFIG": str(run_dir / "config.json"),
        "RETORT_LOADTEST_SAMPLES": str(run_dir / "samples.jsonl"),
    }
    env.pop("RETORT_LOADTEST_SET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = locust_command(cfg, run_dir)
    log(
        f"locust: {cfg.shape.kind} shape, {cfg.shape.total_s():.0f} s, up to {cfg.shape.users} users "
        f"-> {cfg.target.base_url} (time limit {limit:.0f} s)"
    )
    t0 = time.time()
    with open(run_dir / "locust.out", "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
        killed = False
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            killed = True
            rc = _stop(proc)
    return {
        "t_start": t0,
        "t_end": time.time(),
        "locust_exit_code": rc,
        "killed_at_time_limit": killed,
        "time_limit_s": limit,
        "command": cmd,
    }


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM (locust writes its CSV and quits), SIGKILL after 10 s; only this process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
    except ProcessLookupError:
        return proc.wait()


def run(cfg: LoadTestConfig, log=print) -> tuple[Path, dict[str, Any]]:
    """Run the load test described by ``cfg``; returns (summary path, summary)."""
    from serve.loadtest import report

    run_dir = new_run_dir(cfg)
    try:
        model = probe(cfg)
    except Unreachable as e:
        facts = {"t_start": time.time(), "t_end": time.time(), "error": f"endpoint unreachable: {e}"}
        (run_dir / "run.json").write_text(json.dumps(facts, indent=1))
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        return report.write(run_dir, cfg, facts, log=log)
    resolved = cfg.model_copy(deep=True)
    resolved.target.model = model
    (run_dir / "config.json").write_text(resolved.model_dump_json(indent=1))
    facts = run_locust(resolved, run_dir, log)
    facts["model"] = model
    if facts["killed_at_time_limit"]:
        facts["error"] = f"locust killed at the time limit ({facts['time_limit_s']:.0f} s)"
    elif facts["locust_exit_code"] not in (0, None):
        facts["error"] = (
            f"locust exited with code {facts['locust_exit_code']} (log: {run_dir / 'locust.log'})"
        )
    (run_dir / "run.json").write_text(json.dumps(facts, indent=1))
    return report.write(run_dir, resolved, facts, log=log)


def evaluate(run_dir: Path, cfg: LoadTestConfig | None = None, log=print) -> tuple[Path, dict[str, Any]]:
    """Recompute the summary of an earlier run (e.g. against other SLOs) without running locust."""
    from serve.loadtest import report

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a load-test run directory (no run.json)")
    facts = json.loads((run_dir / "run.json").read_text())
    if (run_dir / "summary.json").is_file():  # replica counts of the first evaluation, if Prometheus is gone
        facts["replicas"] = json.loads((run_dir / "summary.json").read_text()).get("replicas") or []
    saved = LoadTestConfig.model_validate_json((run_dir / "config.json").read_text())
    return report.write(run_dir, cfg or saved, facts, log=log, reuse_plots=True)


def exit_code(summary: dict[str, Any]) -> int:
    """0 all SLOs pass, 1 an SLO is broken or the run failed."""
    return 0 if summary["slo"]["passed"] and not summary.get("error") else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.loadtest.runner -c FILE [key=value ...] [--evaluate-only RUN_DIR]``.

    Last stdout line: the summary JSON's path. Exit 0 SLOs pass, 1 an SLO is broken or the
    endpoint is dead, 2 bad input.
    """
    import argparse

    from cluster.config.base import load_config
    from cluster.errors import RetortError

    p = argparse.ArgumentParser(prog="python -m serve.loadtest.runner", description=main.__doc__)
    p.add_argument("-c", "--config", default=None, help="configs/loadtest/<preset>.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--evaluate-only",
        default=None,
        metavar="RUN_DIR",
        help="recompute the summary and SLO verdict of an earlier run (its samples) with this config's SLOs",
    )
    args = p.parse_args(argv)
    try:
        if args.evaluate_only:
            run_dir = Path(args.evaluate_only)
            if not (run_dir / "run.json").is_file():
                raise RetortError(f"{run_dir} is not a load-test run directory (no run.json)")
            saved = json.loads((run_dir / "config.json").read_text())
            cfg = None
            if args.config or args.overrides:
                from cluster.config.base import build, deep_merge, load_yaml, parse_overrides

                base = (
                    deep_merge(saved, {"slo": load_yaml(args.config).get("slo", {})})
                    if args.config
                    else saved
                )
                cfg = build(LoadTestConfig, deep_merge(base, parse_overrides(args.overrides)), str(run_dir))
            path, summary = evaluate(run_dir, cfg)
        else:
            path, summary = run(load_config(args.config, LoadTestConfig, args.overrides))
    except RetortError as e:
        print(f"retort loadtest: error: {e}", file=sys.stderr)
        return e.exit_code
    print(path, flush=True)
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
