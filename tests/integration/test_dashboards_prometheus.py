"""Every panel of every dashboard, evaluated by a real Prometheus scraping the session Ray cluster
that serves the tiny app under traffic: each target (template variables substituted) must parse
and return at least one series with a real (non-NaN) value. Metrics nothing in this test produces
for real (training, the shared KV store, the router, registry promotions, preemptions) are emitted
by a small Ray actor through ``cluster.metrics.make``, so every query is proven against data that
went through Ray's metrics export like the real emitters'. Then ``retort dashboards snapshot``
renders the PNGs."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prom_support import repo_env, running_prometheus
from serve_support import ServeInstance, publish_tiny, serve_args

from cluster import dashboards as D

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VARIABLES = {"application": "retort", "deployment": ".*", "model": "student", "job": "emitter-job"}


def emitter_class() -> type:
    """The emitter, defined in a function so Ray pickles the class by value (workers cannot
    import this test module)."""

    class Emitter:
        """Ray actor: the metrics whose real emitters do not run in this test (training, shared KV
        store, router, registry, preemptions), with the tags the real emitters use."""

        def __init__(self) -> None:
            from cluster import metrics as M

            train = {"job": "emitter-job", "mode": "zero2"}
            self.gauges = {
                m: M.make(m, train)
                for m in (
                    M.TRAIN_LOSS,
                    M.TRAIN_KD_LOSS,
                    M.TRAIN_CE_LOSS,
                    M.TRAIN_TOKENS_PER_S,
                    M.TRAIN_STEP_TIME,
                    M.TRAIN_STEP,
                    M.TRAIN_WORKERS,
                )
            }
            store = {"backend": "object_store"}
            self.counters = [
                M.make(M.STORE_HITS, store),
                M.make(M.STORE_MISSES, store),
                M.make(M.STORE_BYTES_IN, store),
                M.make(M.STORE_BYTES_OUT, store),
                M.make(M.STORE_EVICTIONS, store),
                M.make(M.STORE_ERRORS, {**store, "op": "get"}),
                M.make(M.KV_FETCH_DECISIONS, {**store, "decision": "skip_cost"}),
                M.make(M.ROUTER_DECISIONS, {"reason": "prefix"}),
                M.make(M.REGISTRY_PROMOTIONS, {"model": "student", "alias": "production"}),
                M.make(M.PREEMPTIONS, {"model": "student", "replica": "emitter"}),
            ]
            self.fetch = M.make(M.STORE_FETCH_LATENCY, store)
            self.step = 0

        def tick(self) -> int:
            self.step += 1
            for i, g in enumerate(self.gauges.values()):
                g.set(1.0 + i + 1.0 / self.step)
            for c in self.counters:
                c.inc(1.0 + self.step % 3)
            self.fetch.observe(0.002 * (1 + self.step % 5))
            return self.step

    return Emitter


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("dashboards")
    registry = tmp / "registry"
    publish_tiny(registry, tmp)
    inst = ServeInstance(ray_cluster)
    try:
        url = inst.deploy(serve_args(registry))  # autoscaling 1..2: Serve exports its autoscaling metrics
        emitter = ray.remote(num_cpus=0)(emitter_class()).remote()
        ray.get(emitter.tick.remote())
        with running_prometheus(ray_cluster, tmp / "prometheus") as prom:
            yield url, prom, emitter, tmp
    finally:
        inst.close()


def traffic(url: str, emitter, stop: threading.Event) -> None:
    """Streamed and unary completions and chats, plus one 404 per round, until ``stop``."""
    stream = {
        "model": "student",
        "max_tokens": 12,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            c.post(
                url + "/v1/completions",
                json={"model": "student", "prompt": "The quick brown fox", "max_tokens": 8},
            )
            with c.stream(
                "POST",
                url + "/v1/chat/completions",
                json={**stream, "messages": [{"role": "user", "content": "def add(a, b):"}]},
            ) as r:
                for _ in r.iter_lines():
                    pass
            with c.stream(
                "POST", url + "/v1/completions", json={**stream, "prompt": "Sphinx of black quartz"}
            ) as r:
                for _ in r.iter_lines():
                    pass
            assert c.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            emitter.tick.remote()


def evaluate_all(prom: str, start: float, end: float) -> dict[str, str]:
    """Failures by "dashboard / panel / refId": rejected queries, no series, or only NaN values."""
    failures: dict[str, str] = {}
    variables = D.default_variables(2.0, VARIABLES)
    for path, dash in D.load_all():
        for panel, target, expr in D.panel_queries(dash, variables):
            key = f"{path.stem} / {panel['title']} / {target['refId']}"
            try:
                result = D.prom_query_range(prom, expr, start, end, 2.0)
            except Exception as e:  # noqa: BLE001 - collected and reported together
                failures[key] = f"{expr}: {e}"
                continue
            values = [float(v) for s in result for _, v in s["values"]]
            if not any(not math.isnan(v) for v in values):
                failures[key] = f"{expr}: {'no series' if not result else 'only NaN'}"
    return failures


def test_every_panel_query_returns_data(stack):
    url, prom, emitter, _tmp = stack
    stop = threading.Event()
    threads = [threading.Thread(target=traffic, args=(url, emitter, stop), daemon=True) for _ in range(2)]
    start = time.time()
    for t in threads:
        t.start()
    failures: dict[str, str] = {"not evaluated": ""}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(5)
            failures = evaluate_all(prom, start - 30, time.time())
            if not failures:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    n = sum(len(p["targets"]) for _, d in D.load_all() for p in d["panels"])
    print(f"{n} targets evaluated; all returned data {time.time() - start:.0f} s after traffic started")
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


def test_snapshot_cli(stack):
    """`retort dashboards snapshot` end to end on two dashboards (test_loadtest.py renders all five
    through ``cluster.dashboards.snapshot`` over its spike)."""
    _url, prom, _emitter, tmp = stack
    folder = tmp / "two"
    folder.mkdir()
    for name in ("training", "models"):
        shutil.copy(D.DASHBOARDS_DIR / f"{name}.json", folder)
    args = ["--var", "application=retort", "--var", "job=emitter-job", "--dir", str(folder)]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "dashboards",
            "snapshot",
            "--prometheus-url",
            prom,
            "--since",
            "2m",
            "--out",
            str(tmp / "snapshots"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=repo_env(),
        cwd=str(REPO),
    )
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.strip().splitlines()]
    assert [p.name for p in paths] == ["models.png", "training.png"]
    assert all(p.is_file() and p.stat().st_size > 20_000 for p in paths)
    keep = os.environ.get("RETORT_KEEP_SNAPSHOTS")
    if keep:  # to look at them after the run
        Path(keep).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, Path(keep) / p.name)


def test_snapshot_with_unreachable_prometheus_is_one_line(tmp_path):
    from cluster.net import free_port

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "dashboards",
            "snapshot",
            "--prometheus-url",
            f"http://127.0.0.1:{free_port()}",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=repo_env(),
        cwd=str(REPO),
    )
    assert (
        r.returncode == 2
        and len(r.stderr.strip().splitlines()) == 1
        and "cannot reach Prometheus" in r.stderr
    )
