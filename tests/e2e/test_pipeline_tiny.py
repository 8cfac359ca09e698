"""The whole chain on `tiny`: real Ray jobs, real DeepSpeed, real Serve, real locust.

Runs ``retort pipeline -c configs/pipeline/tiny.yaml`` against the session's Ray head (the
``up`` stage is disabled: the fixture is the cluster), checks every report section has numbers,
queries the served model with the ``openai`` client, then re-runs and sees every stage skipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.net import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECTIONS = [
    "Stages",
    "Models in the registry",
    "Knowledge distillation vs training from scratch",
    "Memory by precision",
    "Quantization error by bit width",
    "Optimization pipeline (measured)",
    "Serving under load",
    "Cost analysis",
    "Memory-bandwidth analysis of the served model",
]


def _run(args, env, timeout):
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def pipeline_run(ray_cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipe")
    port = free_port()
    env = {
        **ray_cluster.subprocess_env(),
        "RETORT_REGISTRY": str(work / "registry"),
        "RETORT_HOME": str(work / "home"),
    }
    overrides = [
        "cluster.enabled=false",
        f"runs_dir={work / 'runs'}",
        f"serve.overrides=[http.port={port}]",
        f"distill.overrides=[run_dir={work / 'distill'}]",
        f"baseline.overrides=[loss.alpha=0.0, publish_name=student-tiny-nokd, publish_alias=null, "
        f"eval.teacher=false, run_dir={work / 'distill-nokd'}]",
        f"loadtest.overrides=[shape.duration_s=10, out_dir={work / 'loadtest'}]",
    ]
    t0 = time.monotonic()
    first = _run(["pipeline", "-c", "configs/pipeline/tiny.yaml", *overrides], env, timeout=1500)
    first_s = time.monotonic() - t0
    yield {"env": env, "port": port, "overrides": overrides, "first": first, "first_s": first_s, "work": work}
    _run(["serve", "shutdown", "-c", "configs/serve/tiny.yaml"], env, timeout=120)


def test_pipeline_completes_with_a_full_report(pipeline_run):
    res = pipeline_run["first"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = Path(res.stdout.strip().splitlines()[-1])
    assert report.name == "report.md" and report.is_file()
    text = report.read_text()
    for title in SECTIONS:
        assert f"## {title}" in text, f"report lacks section {title!r}"
        body = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert re.search(r"\d", body), f"section {title!r} has no numbers"
        assert "did not run" not in body, f"section {title!r}: {body[:200]}"
    assert (report.parent / "report.html").is_file()
    assert list(report.parent.glob("*.png")), "the report has no figures"


def test_served_model_answers_openai_client(pipeline_run):
    from openai import OpenAI

    assert pipeline_run["first"].returncode == 0
    client = OpenAI(base_url=f"http://127.0.0.1:{pipeline_run['port']}/v1", api_key="unused", timeout=60)
    models = [m.id for m in client.models.list().data]
    assert models and models[0].startswith("student-tiny")
    out = client.completions.create(model=models[0], prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert out.usage.completion_tokens >= 1 and isinstance(out.choices[0].text, str)


def test_rerun_resumes_in_seconds(pipeline_run):
    assert pipeline_run["first"].returncode == 0
    t0 = time.monotonic()
    again = _run(
        ["pipeline", "-c", "configs/pipeline/tiny.yaml", *pipeline_run["overrides"]],
        pipeline_run["env"],
        timeout=600,
    )
    seconds = time.monotonic() - t0
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    skipped = [ln for ln in again.stdout.splitlines() if ln.startswith("↷")]
    assert len(skipped) >= 7, again.stdout
    assert seconds < pipeline_run["first_s"] / 2
