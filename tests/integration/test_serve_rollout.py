"""Registry-driven rollout through the real CLI: ``retort serve deploy`` (Serve REST API, token
auth), load running, ``promote`` a new version, ``retort serve deploy`` again -> Serve's rolling
update moves traffic to the new weights with zero failed requests; then status and shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from serve_support import make_checkpoint, publish_tiny

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def retort(env: dict[str, str], *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Load:
    """Threads sending completions (plain and streamed) until stopped; every outcome recorded."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url, self.stop = url, threading.Event()
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self.ok = 0
        self._threads = [
            threading.Thread(target=self._run, args=(i % 2 == 1,), daemon=True) for i in range(threads)
        ]

    def _run(self, stream: bool) -> None:
        body = {
            "model": "student",
            "prompt": "rolling",
            "max_tokens": 8,
            "ignore_eos": True,
            "stream": stream,
        }
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url + "/v1/completions", json=body)
                    if r.status_code != 200 or (stream and not r.text.rstrip().endswith("data: [DONE]")):
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    elif stream and '"error"' in r.text:
                        self.failures.append(f"in-band error {r.text[:200]}")
                    else:
                        self.ok += 1
                        self.versions[r.headers.get("x-retort-model-version", "?")] += 1
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)


@pytest.mark.parametrize("topology", ["split", "collocated"])
def test_promote_and_redeploy_rolls_over_without_failures(ray_cluster, tmp_path, topology):
    import ray
    from ray import serve

    from cluster.net import free_port
    from cluster.registry import open_registry

    registry = tmp_path / "registry"
    publish_tiny(registry, tmp_path, seed=0)  # student:1 @production
    port = free_port()
    env = {**ray_cluster.subprocess_env(), "RAY_API_SERVER_ADDRESS": ray_cluster.dashboard_url}
    overrides = [
        f"registry.root={registry}",
        f"registry.cache_dir={registry / '.cache'}",
        f"http.port={port}",
        "autoscaling.max_replicas=1",
        "replica.num_cpus=0.5",
        "replica.graceful_shutdown_timeout_s=30",
        f"topology={topology}",
    ]
    deploy = ["serve", "deploy", "-c", "configs/serve/tiny.yaml", *overrides]
    try:
        r = retort(env, *deploy)
        assert r.returncode == 0, r.stderr + r.stdout
        url = r.stdout.strip().splitlines()[-1]
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models").json()["data"][0]["root"] == "student:1"

        with Load(url) as load:
            time.sleep(2)
            reg = open_registry(root=str(registry), cache_dir=str(registry / ".cache"))
            v2 = reg.publish("student", make_checkpoint(tmp_path / "v2", seed=1), lineage={}, metrics={})
            reg.promote(v2.name, v2.version, "production")
            r = retort(env, *deploy)
            assert r.returncode == 0, r.stderr + r.stdout
            assert "student@production -> student:2" in r.stdout
            time.sleep(3)  # traffic after the rollover
        assert not load.failures, load.failures[:5]
        assert load.ok > 20 and load.versions["1"] > 0 and load.versions["2"] > 0, (load.ok, load.versions)
        assert httpx.get(url + "/v1/models").json()["data"][0]["root"] == "student:2"

        st = retort(env, "serve", "status")
        assert st.returncode == 0 and "retort: RUNNING" in st.stdout and "student:2" in st.stdout, st.stdout
        down = retort(env, "serve", "shutdown")
        assert down.returncode == 0 and "removed" in down.stdout, down.stderr
    finally:
        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_deploy_bad_input_is_one_line(ray_cluster, tmp_path):
    env = {**ray_cluster.subprocess_env(), "RAY_API_SERVER_ADDRESS": ray_cluster.dashboard_url}
    r = retort(
        env, "serve", "deploy", "-c", "configs/serve/tiny.yaml", f"registry.root={tmp_path}", "limits.bogus=1"
    )
    assert r.returncode == 2 and "unknown field" in r.stderr and "Traceback" not in r.stderr
    r = retort(env, "serve", "deploy", "-c", "configs/serve/tiny.yaml", f"registry.root={tmp_path}")
    assert r.returncode == 2 and "no model 'student'" in r.stderr and "Traceback" not in r.stderr
    r = retort(
        env,
        "serve",
        "deploy",
        "-c",
        "configs/serve/tiny.yaml",
        f"registry.root={tmp_path}",
        "topology=collocated",
        "router.policy=cache_aware",
    )
    assert (
        r.returncode == 2 and "cache_aware needs topology split" in r.stderr and "Traceback" not in r.stderr
    )
