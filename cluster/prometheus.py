"""Prometheus for the local cluster: render its config, keep Ray's targets current, ask its API.

The template is ``infra/prometheus/prometheus.yml``. Ray's own service-discovery file names the
host IP; we rewrite its targets to 127.0.0.1 into a file_sd file of ours (see the template).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from string import Template

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "infra" / "prometheus" / "prometheus.yml"


def render_config(
    out: Path,
    *,
    scrape_interval: str,
    cluster_name: str,
    prometheus_address: str,
    ray_targets_file: Path,
    extra_targets_file: Path,
    template: Path = TEMPLATE,
) -> Path:
    """Fill the template's ``${...}`` placeholders and write ``out``."""
    text = Template(template.read_text()).substitute(
        scrape_interval=scrape_interval,
        cluster_name=cluster_name,
        prometheus_address=prometheus_address,
        ray_targets_file=str(ray_targets_file),
        extra_targets_file=str(extra_targets_file),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def write_file_sd(path: Path, targets: list[str], labels: dict[str, str] | None = None) -> bool:
    """Atomically write a file_sd JSON file; returns True if its content changed."""
    body = json.dumps([{"targets": sorted(targets), "labels": labels or {}}], indent=1) if targets else "[]"
    if path.is_file() and path.read_text() == body:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body)
    os.replace(tmp, path)
    return True


def api_get(url: str, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET ``url + path``; (status, body), status 0 if unreachable."""
    try:
        with urllib.request.urlopen(url + path, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return 0, b""


def wait_ready(url: str, timeout_s: float, alive=lambda: True) -> bool:
    """Poll ``/-/ready`` until 200, the timeout, or ``alive()`` turning False."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and alive():
        if api_get(url, "/-/ready", 2.0)[0] == 200:
            return True
        time.sleep(0.3)
    return False


def targets(url: str) -> list[dict]:
    """Active targets: ``[{"job", "instance", "health", "lastError"}]`` ([] if Prometheus is unreachable)."""
    status, body = api_get(url, "/api/v1/targets?state=active")
    if status != 200:
        return []
    return [
        {
            "job": t["labels"].get("job", ""),
            "instance": t["labels"].get("instance", ""),
            "health": t.get("health", "unknown"),
            "lastError": t.get("lastError", ""),
        }
        for t in json.loads(body)["data"]["activeTargets"]
    ]


def wait_targets_up(url: str, job: str, timeout_s: float) -> list[dict]:
    """Wait until every target of ``job`` has been scraped successfully (or the timeout); return them."""
    deadline = time.time() + timeout_s
    ts: list[dict] = []
    while time.time() < deadline:
        ts = [t for t in targets(url) if t["job"] == job]
        if ts and all(t["health"] == "up" for t in ts):
            break
        time.sleep(0.5)
    return ts
