"""Shared pytest fixtures.

``ray_cluster`` (session): one real Ray head for the whole test session (see its docstring).
``ray_env`` (function): the same cluster with RAY_ADDRESS / RAY_API_SERVER_ADDRESS set for one test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RayCluster:
    """Where the session's Ray head listens and the environment its clients need."""

    gcs_address: str  # "127.0.0.1:<port>", for ray.init(address=...)
    dashboard_url: str  # "http://127.0.0.1:<port>", for JobSubmissionClient / RAY_API_SERVER_ADDRESS
    metrics_export_port: int  # Ray's Prometheus endpoint: http://127.0.0.1:<port>/metrics
    temp_dir: Path  # Ray's --temp-dir (session logs under temp_dir/session_latest/logs)
    token_path: Path  # the cluster's auth token file (RAY_AUTH_TOKEN_PATH)
    env: dict[str, str] = field(
        default_factory=dict
    )  # RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS, RAY_API_SERVER_ADDRESS
    head: object = None  # cluster.ray_head.RayHead (ports, metrics_targets(), dashboard_get())

    def subprocess_env(self) -> dict[str, str]:
        """``os.environ`` plus ``env``: pass as ``env=`` to ``ray job submit`` / ``serve`` / ``retort`` subprocesses."""
        return {**os.environ, **self.env}

    @property
    def token(self) -> str:
        """The bearer token for the dashboard REST API (``Authorization: Bearer <token>``)."""
        return self.token_path.read_text().strip()

    @property
    def session_logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


def _reap_orphaned_heads() -> None:
    """Stop heads left by test sessions that died without teardown (SIGKILL, timeout): each
    ``/tmp/rt-*/owner.json`` names the pytest pid that owns it; a dead owner means an orphan."""
    import psutil

    from cluster.procs import stop_scope

    for owner in Path("/tmp").glob("rt-*/owner.json"):
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(info["pid"]):
            continue
        stop_scope(f"ray:{owner.parent}", [info.get("pgid", 0)], grace_s=3.0)
        shutil.rmtree(owner.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A real Ray head (``ray start --head`` from .venv/bin) shared by the whole session.

    What it is: 4 logical CPUs (more than the cores, so several actors fit), a 300 MB object store,
    the dashboard (and Jobs API) on 127.0.0.1, every port picked free (GCS, dashboard, metrics
    export, client server, node/object manager, agents, a 100-port worker range), and Ray's
    ``--temp-dir`` a short fresh ``/tmp/rt-XXXX`` (Ray's socket paths must stay < 108 bytes).

    Token auth: the fixture writes a fresh token to ``<temp_dir>/auth_token`` and sets
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in ``os.environ`` for the session (harmless
    for tests that start their own local ``ray.init(num_cpus=...)``: that cluster uses the same token).
    ``~/.ray/auth_token`` is neither read nor written. RAY_ADDRESS is NOT set globally (it would
    turn other tests' ``ray.init(num_cpus=4)`` into "connect to an existing cluster" errors); use the
    ``ray_env`` fixture, or ``ray_cluster.env`` for subprocesses. Ray caches the token once per
    process: a test that talks to ANOTHER token-auth cluster from the test process must switch with
    ``with cluster.ray_head.client_env(other_env):`` (sets the variables, resets the cache, restores
    both on exit).

    Usage::

        def test_task(ray_cluster):
            import ray
            ray.init(address=ray_cluster.gcs_address)
            try:
                assert ray.get(ray.remote(lambda: 1).remote()) == 1
            finally:
                ray.shutdown()   # always: the next test may start its own local Ray

        def test_job(ray_cluster):
            from ray.job_submission import JobSubmissionClient
            client = JobSubmissionClient(ray_cluster.dashboard_url)   # token from RAY_AUTH_TOKEN_PATH
            ...
            subprocess.run([".venv/bin/ray", "job", "submit", "--", "python", "-c", "..."],
                           env=ray_cluster.subprocess_env(), check=True)

        def test_serve(ray_cluster):
            import ray
            from ray import serve
            from cluster.net import free_port
            ray.init(address=ray_cluster.gcs_address)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                serve.run(app, name="x", route_prefix="/x")   # HTTP at http://127.0.0.1:{port}/x
            finally:
                serve.shutdown(); ray.shutdown()   # Serve's controller/proxy die with serve.shutdown()

    Serve state (controller, proxy) belongs to the cluster, not the test: call ``serve.shutdown()``
    before the test ends, and never hard-code 8000/8265/6379. The dashboard REST API (e.g.
    ``/api/serve/applications/``) needs ``Authorization: Bearer {ray_cluster.token}``.

    Teardown stops exactly this cluster's processes (its process group, every process whose
    environment carries its scope marker, and their descendants: workers, job drivers, Serve
    replicas), SIGTERM then SIGKILL after 3 s; it never runs ``ray stop``, which would kill
    every Ray cluster on the machine (other sessions' included). Then the temp dir is removed.
    A head whose pytest died without teardown is stopped by the next session that uses this
    fixture (``/tmp/rt-*/owner.json`` records the owning pid).
    """
    from cluster.ray_head import free_ray_ports, reset_token_cache, start_head, stop_head

    _reap_orphaned_heads()
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    (temp_dir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "pgid": 0}))
    ports = free_ray_ports()
    t0 = time.time()
    head = start_head(
        temp_dir,
        token_path,
        ports,
        num_cpus=4,
        object_store_memory=300 * 1024**2,
        log=temp_dir / "ray-start.log",
    )
    print(
        f"\n[ray_cluster] head up in {time.time() - t0:.1f} s at {head.gcs_address}, dashboard {head.dashboard_url}"
    )
    (temp_dir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "pgid": head.pgid}))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
    reset_token_cache()  # a token loaded earlier in this process (another cluster) would be used otherwise
    try:
        yield RayCluster(
            gcs_address=head.gcs_address,
            dashboard_url=head.dashboard_url,
            metrics_export_port=ports.metrics_export,
            temp_dir=temp_dir,
            token_path=token_path,
            env=head.env(),
            head=head,
        )
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - teardown must go on
            pass
        stop_head(head)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_token_cache()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_env(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """``ray_cluster`` with RAY_ADDRESS (GCS) and RAY_API_SERVER_ADDRESS (dashboard) set for this test only,
    so ``ray.init()``, ``JobSubmissionClient()``, ``serve.run`` and ``cluster.jobs.submit`` find it."""
    from cluster.ray_head import client_env

    with client_env(ray_cluster.env):
        yield ray_cluster
