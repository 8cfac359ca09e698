"""Run a job module on the cluster (``ray job submit``) or locally (``--local``).

The CLI never imports ``train`` or ``serve``: it runs them the way Ray does, by entrypoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import load_config, schema_for
from cluster.errors import JobFailed, RetortError

REPO = Path(__file__).resolve().parent.parent


def add_job_args(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument(
        "-c", "--config", default=default_config, required=default_config is None, help="YAML config"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--local", action="store_true", help="run as a local subprocess instead of a Ray job")
    p.add_argument(
        "--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS or the local head)"
    )


def validate_job_config(kind: str, config: str | None, overrides: list[str]):
    """Fail fast (exit 2) on a bad config before anything is submitted."""
    return load_config(config, schema_for(kind), overrides)


def entrypoint(module: str, config: str | None, overrides: list[str]) -> list[str]:
    cmd = ["python", "-m", module]
    if config:
        cmd += ["-c", config]
    return cmd + list(overrides)


def run_local(cmd: list[str], env: dict[str, str] | None = None) -> int:
    cmd = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    return subprocess.call(cmd, cwd=REPO, env={**os.environ, **(env or {})})


def dashboard_address(explicit: str | None = None) -> str:
    """Jobs API URL: ``--address``, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else the local head."""
    if explicit:
        return explicit
    if os.environ.get("RAY_API_SERVER_ADDRESS", "").startswith("http"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        return os.environ["RAY_ADDRESS"]
    from cluster.local_cluster import client_env, dashboard_url  # written by `retort up`

    url = dashboard_url()
    if url is None:
        raise RetortError(
            "no Ray cluster is running: start one with `retort up`, pass --address, or use --local"
        )
    # the local head's token (it may live outside ~/.ray): only when talking to that head
    auth = {k: v for k, v in client_env().items() if k.startswith("RAY_AUTH") and k not in os.environ}
    if auth:
        from cluster.ray_head import reset_token_cache

        os.environ.update(auth)
        reset_token_cache()  # Ray caches the token per process
    return url


FORWARDED = ("RETORT_", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def forwarded_env() -> dict[str, str]:
    """What a job needs from the submitter's environment: RETORT_* (registry root, home), the
    code's git commit (the job's working dir is a copy without .git), the extensions cache."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    if "RETORT_GIT_COMMIT" not in env and (commit := git_commit()):
        env["RETORT_GIT_COMMIT"] = commit
    return env


def submit(
    cmd: list[str],
    name: str,
    address: str | None = None,
    env: dict[str, str] | None = None,
    follow: bool = True,
) -> str:
    """Submit ``cmd`` as a Ray job from the repo as working dir; stream logs; raise on failure."""
    url = dashboard_address(address)
    if "RAY_AUTH_MODE" not in os.environ:  # Retort clusters run with token auth
        from cluster.ray_head import reset_token_cache

        os.environ["RAY_AUTH_MODE"] = "token"
        reset_token_cache()
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".git", "runs", "*.safetensors", "__pycache__", "*.bin", "*.npy"],
        "env_vars": {**forwarded_env(), **(env or {})},
    }
    entry = shlex.join(cmd)
    job_id = client.submit_job(
        entrypoint=entry, runtime_env=runtime_env, submission_id=f"retort-{name}-{int(time.time())}"
    )
    print(f"submitted {job_id}: {entry}", flush=True)
    if not follow:
        return job_id
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    with contextlib.suppress(Exception):  # log streaming is best-effort; the status below decides
        asyncio.run(tail())
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise JobFailed(
            f"job {job_id} {status.value.lower()}: {info.message or ''} (logs: ray job logs {job_id})".strip()
        )
    return job_id


def run_job(kind: str, module: str, args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    """What every job subcommand does: validate, then run locally or submit to Ray."""
    validate_job_config(kind, args.config, args.overrides)
    cmd = entrypoint(module, args.config, args.overrides)
    if args.local:
        rc = run_local(cmd, env)
        if rc == 2:
            return 2
        if rc != 0:
            raise JobFailed(f"{module} exited with {rc} (its output is above)")
        return 0
    submit(cmd, kind, getattr(args, "address", None), env)
    return 0
