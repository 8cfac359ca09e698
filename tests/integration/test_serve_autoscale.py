"""Autoscaling from our YAML: sustained load takes the model server from 1 to 2 replicas, and it
returns to 1 once the load stops (short delays in the test config), in both app topologies."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_support import ServeInstance, publish_tiny, running_replicas, serve_args

pytestmark = pytest.mark.integration


def wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.mark.parametrize("topology", ["split", "collocated"])
def test_replicas_scale_up_under_load_and_back_down(ray_cluster, tmp_path, topology):
    """Collocated, the model-server deployment (the one that scales) is the HTTP ingress itself."""
    registry = tmp_path / "registry"
    publish_tiny(registry, tmp_path)
    inst = ServeInstance(ray_cluster)
    stop = threading.Event()
    errors: list[str] = []
    try:
        url = inst.deploy(
            serve_args(
                registry,
                **{
                    "autoscaling.min_replicas": 1,
                    "autoscaling.max_replicas": 2,
                    "autoscaling.target_ongoing_requests": 1,
                    "autoscaling.upscale_delay_s": 1,
                    "autoscaling.downscale_delay_s": 4,
                    "autoscaling.look_back_period_s": 1,
                    "autoscaling.metrics_interval_s": 0.5,
                    "replica.num_cpus": 0.5,
                    "topology": topology,
                },
            )
        )
        assert running_replicas("retort") == 1

        def client() -> None:  # slow requests keep ~4 in flight
            body = {"model": "student", "prompt": "load", "max_tokens": 200, "ignore_eos": True}
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    r = c.post(url + "/v1/completions", json=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        up = wait_for(lambda: running_replicas("retort") == 2, 60, "no scale-up to 2 replicas")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        down = wait_for(lambda: running_replicas("retort") == 1, 60, "no scale-down to 1 replica")
        print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it stopped")
        assert not errors, errors[:3]
        r = httpx.post(url + "/v1/completions", json={"model": "student", "prompt": "after", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        stop.set()
        inst.close()
