"""A real Prometheus (/usr/bin/prometheus) scraping the session Ray cluster every second, the way
``retort up`` configures it (infra/prometheus/prometheus.yml, Ray's targets rewritten to
127.0.0.1), plus the small helpers the observability tests share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


@contextmanager
def running_prometheus(ray_cluster: Any, work: Path) -> Iterator[str]:
    """Start Prometheus on a free port against ``ray_cluster``; yield its URL; stop it."""
    from cluster import prometheus
    from cluster.net import free_port
    from cluster.ray_head import wait_for_sd_file

    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.skip("prometheus is not installed")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ray_file, extra_file = work / "ray_targets.json", work / "extra_targets.json"
    prometheus.write_file_sd(ray_file, wait_for_sd_file(ray_cluster.head, 30.0))
    prometheus.write_file_sd(extra_file, [])
    conf = prometheus.render_config(
        work / "prometheus.yml",
        scrape_interval="1s",
        cluster_name="test",
        prometheus_address=f"127.0.0.1:{port}",
        ray_targets_file=ray_file,
        extra_targets_file=extra_file,
    )
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert prometheus.wait_ready(url, 30, alive=lambda: proc.poll() is None), (
            work / "prometheus.log"
        ).read_text()
        ups = prometheus.wait_targets_up(url, "ray", 60)
        assert ups and all(t["health"] == "up" for t in ups), ups
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def instant(url: str, expr: str) -> list[dict]:
    qs = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{qs}", timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def wait_series(url: str, expr: str, timeout: float, pred=lambda result: bool(result)) -> list[dict]:
    """Poll an instant query until ``pred(result)``; return the result (AssertionError at timeout)."""
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = instant(url, expr)
        if pred(result):
            return result
        time.sleep(1)
    raise AssertionError(f"{expr} did not satisfy the condition within {timeout} s: {result}")


def repo_env() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
