"""`retort loadtest` against the tiny app on the session Ray cluster, with a real Prometheus:
a 60 s spike (1 -> 8 -> 1 users) takes the model server from 1 to 2 replicas and back with no
failed request; the SLO gate passes and fails on the same run's samples; a dead port fails fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prom_support import instant, repo_env, running_prometheus
from serve_support import ServeInstance, publish_tiny, running_replicas, serve_args

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def retort(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=repo_env(),
        cwd=str(REPO),
    )


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loadtest")
    registry = tmp / "registry"
    publish_tiny(registry, tmp)
    inst = ServeInstance(ray_cluster)
    try:
        url = inst.deploy(serve_args(registry))  # configs/serve/tiny.yaml: autoscaling 1..2, short delays
        assert running_replicas("retort") == 1
        with running_prometheus(ray_cluster, tmp / "prometheus") as prom:
            yield url, prom, tmp
    finally:
        inst.close()


@pytest.fixture(scope="module")
def spike_run(app):
    url, prom, tmp = app
    t0 = time.monotonic()
    r = retort(
        "loadtest",
        "-c",
        "configs/loadtest/spike.yaml",
        f"target.base_url={url}",
        f"prometheus_url={prom}",
        f"out_dir={tmp / 'runs'}",
        timeout=200,
    )
    took = time.monotonic() - t0
    print(r.stdout[-3000:], r.stderr[-2000:], f"\n`retort loadtest` took {took:.1f} s", sep="\n")
    path = Path(r.stdout.strip().splitlines()[-1])
    return r, json.loads(path.read_text()), path


def test_spike_scales_up_and_back_with_zero_failures(app, spike_run):
    _url, prom, _tmp = app
    r, s, path = spike_run
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert (
        s["slo"]["passed"] and all(c["passed"] for c in s["slo"]["checks"]) and len(s["slo"]["checks"]) == 3
    )
    assert s["requests"] >= 20 and s["failures"] == 0, s["errors"]
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = s[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert s["ttft_s"]["p99"] < s["e2e_s"]["p99"]
    assert s["output_tokens_per_s"] > 0 and s["duration_s"] > 50
    assert s["max_replicas"] == 2, s["replicas"]
    assert s["replicas"][0][1] == 1, "the run must start on one replica"
    # ... and back to one (the summary's window may close before Prometheus sees the scale-down)
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline and running_replicas("retort") != 1:
        time.sleep(1)
    assert running_replicas("retort") == 1
    healthy = 'sum(ray_serve_deployment_replica_healthy{application="retort",deployment="ModelServer"})'
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and float(instant(prom, healthy)[0]["value"][1]) != 1:
        time.sleep(1)
    assert float(instant(prom, healthy)[0]["value"][1]) == 1
    assert (
        all(Path(p).is_file() and Path(p).stat().st_size > 10_000 for p in s["plots"])
        and len(s["plots"]) == 2
    )
    assert Path(s["csv_prefix"] + "_stats.csv").is_file() and s["target"]["model"] == "student"
    stats = Path(s["csv_prefix"] + "_stats.csv").read_text()
    for rtype in ("TTFT", "TPOT", "ITL", "E2E"):  # custom locust events are in locust's own CSV
        assert f"\n{rtype}," in stats, rtype
    assert path.parent == Path(s["run_dir"])


def test_slo_gate_fails_on_the_same_runs_samples(spike_run):
    _r, s, path = spike_run
    run_dir = path.parent
    bad = retort(
        "loadtest",
        "--evaluate-only",
        str(run_dir),
        "slo.p99_ttft_s=0.000001",
        "slo.min_output_tok_s=1000000",
        timeout=60,
    )
    assert bad.returncode == 1, bad.stderr
    assert "BROKEN" in bad.stdout and "p99_ttft_s" in bad.stdout
    s2 = json.loads(Path(bad.stdout.strip().splitlines()[-1]).read_text())
    assert not s2["slo"]["passed"] and s2["requests"] == s["requests"]
    assert {c["name"]: c["passed"] for c in s2["slo"]["checks"]}["p99_ttft_s"] is False
    good = retort("loadtest", "--evaluate-only", str(run_dir), "slo.p99_ttft_s=60", timeout=60)
    assert good.returncode == 0, good.stdout


def test_dead_endpoint_fails_fast_with_a_summary(tmp_path):
    from cluster.net import free_port

    t0 = time.monotonic()
    r = retort(
        "loadtest",
        "-c",
        "configs/loadtest/tiny.yaml",
        f"target.base_url=http://127.0.0.1:{free_port()}",
        f"out_dir={tmp_path}",
        "target.connect_timeout_s=2",
        timeout=60,
    )
    assert r.returncode == 1 and time.monotonic() - t0 < 30
    s = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    assert "unreachable" in s["error"] and s["requests"] == 0 and not s["slo"]["passed"]


def test_bad_config_is_one_line_exit_2(tmp_path):
    r = retort("loadtest", "-c", "configs/loadtest/tiny.yaml", "shape.users=0", timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "shape.users" in r.stderr


def test_dashboard_snapshot_of_the_spike(app, spike_run):
    """The pipeline report's use: every dashboard rendered from Prometheus over the run's window."""
    import os
    import shutil

    from cluster import dashboards as D

    _url, prom, tmp = app
    _r, s, _path = spike_run
    paths = D.snapshot(
        prom,
        D.DASHBOARDS_DIR,
        tmp / "snapshots",
        s["window"]["start"] - 10,
        s["window"]["end"] + 20,
        2.0,
        {"application": "retort", "model": "student"},
    )
    assert [p.name for p in paths] == sorted(f"{f.stem}.png" for f, _ in D.load_all())
    assert all(p.is_absolute() and p.stat().st_size > 20_000 for p in paths)
    keep = os.environ.get("RETORT_KEEP_SNAPSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for p in [*paths, *map(Path, s["plots"])]:
            shutil.copy(p, Path(keep) / f"spike-{p.name}")
