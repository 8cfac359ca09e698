"""``retort up && retort status && retort down`` for real: Ray head, Prometheus, Redis.

One cluster for the module (RETORT_HOME in a tmp dir, every port free), driven through the real
CLI in subprocesses; the last test takes it down and checks that nothing of it is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FREE_PORTS = [
    "ray.gcs_port=0",
    "ray.dashboard_port=0",
    "ray.metrics_export_port=0",
    "ray.client_server_port=0",
    "prometheus.port=0",
    "redis.enabled=true",
    "redis.port=0",
    "serve.http_port=0",
]


def retort(
    home: Path, *args: str, env: dict | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    e = {**os.environ, "RETORT_HOME": str(home), **(env or {})}
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        e.pop(k, None)
    return subprocess.run(
        [str(BIN / "retort"), *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("retort-home")
    t0 = time.time()
    out = retort(
        home,
        "up",
        "-c",
        "configs/cluster/local.yaml",
        *FREE_PORTS,
        f"ray.auth_token_path={home / 'auth_token'}",
        "prometheus.scrape_interval=1s",
    )
    print(f"\n[retort up] {time.time() - t0:.1f} s\n{out.stdout}{out.stderr}")
    state = json.loads((home / "cluster" / "state.json").read_text()) if out.returncode == 0 else None
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        yield home, state, out.stdout
    finally:
        if (home / "cluster" / "state.json").exists():  # the down test did not run or failed
            retort(home, "down")
        if state:
            shutil.rmtree(state["ray"]["temp_dir"], ignore_errors=True)  # Ray's logs (down keeps them)


def our_processes(state: dict) -> list[psutil.Process]:
    from cluster.procs import scope_processes

    procs = scope_processes(f"ray:{state['ray']['temp_dir']}", [state["ray"]["pgid"]])
    for name in ("prometheus", "redis"):
        procs += scope_processes(state[name]["scope"], [state[name]["pid"]])
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_prints_client_env_and_is_idempotent(cluster):
    home, state, stdout = cluster
    assert "export RAY_AUTH_MODE=token" in stdout
    assert f"export RAY_API_SERVER_ADDRESS={state['env']['RAY_API_SERVER_ADDRESS']}" in stdout
    assert state["ray"]["ports"]["gcs"] != 6379 and state["redis"]["port"] != 6379
    again = retort(home, "up", "-c", "configs/cluster/local.yaml", *FREE_PORTS)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert json.loads((home / "cluster" / "state.json").read_text())["ray"]["pgid"] == state["ray"]["pgid"]


def test_status_shows_every_component_up(cluster):
    home, state, _ = cluster
    out = retort(home, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    for name, url in (
        ("ray", state["ray"]["dashboard_host"]),
        ("prometheus", state["prometheus"]["url"]),
        ("redis", state["redis"]["url"]),
    ):
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(name))
        assert " up " in line and url in line, line
    assert "export RAY_AUTH_TOKEN_PATH=" in out.stdout
    js = json.loads(retort(home, "status", "--json").stdout)
    assert js["running"] and {c["name"] for c in js["components"]} == {"ray", "prometheus", "redis"}


def test_dashboard_binds_loopback_and_needs_the_token(cluster):
    _, state, _ = cluster
    port = state["ray"]["ports"]["dashboard"]
    listeners = {
        c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port
    }
    assert listeners == {"127.0.0.1"}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=10)
    assert e.value.code == 401


def test_prometheus_scrapes_ray_metrics(cluster):
    from cluster import prometheus

    _, state, _ = cluster
    url = state["prometheus"]["url"]
    ray_targets = prometheus.wait_targets_up(url, "ray", timeout_s=60)
    instances = {t["instance"] for t in ray_targets}
    assert f"127.0.0.1:{state['ray']['ports']['metrics_export']}" in instances
    assert all(t["health"] == "up" for t in ray_targets), ray_targets
    assert len(ray_targets) >= 2  # node exporter + autoscaler/dashboard metrics from Ray's SD file
    q = urllib.parse.quote('count(up{job="ray"} == 1)')
    deadline = time.time() + 30
    while time.time() < deadline:
        body = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?query={q}", timeout=10).read())
        if body["data"]["result"] and float(body["data"]["result"][0]["value"][1]) == len(ray_targets):
            break
        time.sleep(1)
    else:
        pytest.fail(f"up{{job='ray'}} never reached {len(ray_targets)}: {body}")
    series = json.loads(
        urllib.request.urlopen(
            f"{url}/api/v1/series?match[]=%7B__name__%3D~%22ray_.%2B%22%7D", timeout=10
        ).read()
    )["data"]
    assert series, "no ray_* series scraped"


def test_redis_answers(cluster):
    import redis

    _, state, _ = cluster
    r = redis.Redis(host="127.0.0.1", port=state["redis"]["port"])
    assert r.ping()
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"


def test_ray_job_submit_cli_with_the_printed_env(cluster, tmp_path):
    _, state, _ = cluster
    env = {**os.environ, **state["env"]}
    out = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--",
            "python",
            "-c",
            "import ray, sys; print('job-python', sys.executable)",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"job-python {BIN}" in out.stdout  # `python` in an entrypoint is this venv's


def test_cluster_jobs_submit_finds_the_local_head(cluster, capsys):
    from cluster import jobs
    from cluster.ray_head import client_env

    home, _, _ = cluster
    # no address and no token in the environment: jobs.submit finds both through RETORT_HOME's state
    with client_env({"RETORT_HOME": str(home)}):
        saved = {
            k: os.environ.pop(k, None)
            for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")
        }
        try:
            job_id = jobs.submit(
                ["python", "-c", "import cluster.errors; print('retort-job-ok')"], "cluster-test"
            )
            assert job_id.startswith("retort-cluster-test-")
            assert "retort-job-ok" in capsys.readouterr().out
            with pytest.raises(jobs.JobFailed, match="failed"):
                jobs.submit(["python", "-c", "raise SystemExit(3)"], "cluster-test-fail")
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v


def test_status_lists_serve_apps(cluster):
    import ray
    from ray import serve

    from cluster.ray_head import client_env

    home, state, _ = cluster
    with client_env(state["env"]):
        _deploy_echo_and_check_status(home, state, ray, serve)


def _deploy_echo_and_check_status(home, state, ray, serve) -> None:
    ray.init(address=state["env"]["RAY_ADDRESS"], log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": state["serve"]["http_port"]})

        @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
        class Echo:
            def __call__(self, request) -> str:
                return "echo"

        serve.run(Echo.bind(), name="echo-app", route_prefix="/echo")
        body = urllib.request.urlopen(
            f"http://127.0.0.1:{state['serve']['http_port']}/echo", timeout=30
        ).read()
        assert body == b"echo"
        out = retort(home, "status")
        assert out.returncode == 0
        assert any("echo-app" in ln and "RUNNING" in ln for ln in out.stdout.splitlines()), out.stdout
    finally:
        serve.shutdown()
        ray.shutdown()


def test_status_reports_a_dead_component(cluster):
    home, state, _ = cluster
    redis_proc = psutil.Process(state["redis"]["pid"])
    redis_proc.kill()
    redis_proc.wait(10)
    out = retort(home, "status")
    assert out.returncode == 1, out.stdout
    assert any(ln.startswith("redis") and "DOWN" in ln for ln in out.stdout.splitlines()), out.stdout
    assert "partially up" in out.stdout


def test_down_leaves_nothing_behind(cluster):
    home, state, _ = cluster
    assert our_processes(state), "the cluster should be running before down"
    t0 = time.time()
    out = retort(home, "down")
    print(f"[retort down] {time.time() - t0:.1f} s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert our_processes(state) == []
    for pid in (state["prometheus"]["pid"],):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(state["ray"]["temp_dir"] in a for a in (p.info["cmdline"] or []))
    ]
    assert leftovers == []
    again = retort(home, "down")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "nothing is running" in again.stderr
    st = retort(home, "status")
    assert st.returncode == 3 and "nothing is running" in st.stdout


def test_up_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = retort(tmp_path, "up", *FREE_PORTS, f"ray.gcs_port={port}")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"retort: error: port {port} (ray.gcs_port) is already in use; choose another, "
        "e.g. `retort up ray.gcs_port=0` (0 = any free port)"
    )
    assert not (tmp_path / "cluster" / "state.json").exists()
