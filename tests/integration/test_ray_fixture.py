"""The session ``ray_cluster`` fixture gives a real, token-protected Ray head that jobs reach."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


def test_remote_task_runs_on_the_session_cluster(ray_cluster):
    import ray

    ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
    try:

        @ray.remote
        def node_of_worker() -> str:
            return ray.get_runtime_context().get_node_id()

        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert ray.get(node_of_worker.remote()) in node_ids
        assert ray.cluster_resources()["CPU"] == 4
    finally:
        ray.shutdown()


def test_dashboard_refuses_requests_without_the_token(ray_cluster):
    url = ray_cluster.dashboard_url + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ray_cluster.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def test_job_submission_client(ray_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    job_id = client.submit_job(entrypoint="python -c \"print('fixture-sdk-ok')\"")
    deadline = time.time() + 120
    while (status := client.get_job_status(job_id)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        assert time.time() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "fixture-sdk-ok" in client.get_job_logs(job_id)


def test_ray_job_submit_cli(ray_cluster, tmp_path):
    out = subprocess.run(
        [RAY, "job", "submit", "--", "python", "-c", "print('fixture-cli-ok')"],
        env=ray_cluster.subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fixture-cli-ok" in out.stdout


def test_cli_without_token_is_refused(ray_cluster, tmp_path):
    env = ray_cluster.subprocess_env()
    env.pop("RAY_AUTH_TOKEN_PATH")
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    out = subprocess.run(
        [RAY, "job", "list"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "auth" in (out.stdout + out.stderr).lower()
