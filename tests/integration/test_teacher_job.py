"""``retort teacher`` submitted as a Ray job to a running head (not ``--local``): the job pretrains a tiny
teacher, publishes it to the registry named in the job's environment and builds its top-k cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_retort_teacher_as_a_ray_job(ray_cluster, tmp_path):
    from cluster.registry import open_registry
    from train.topk import TopKCache

    # the job runs in the cluster's environment, not this one's: the registry goes by registry.root
    env = {**ray_cluster.subprocess_env(), "RAY_ADDRESS": ray_cluster.dashboard_url}
    cmd = [sys.executable, "-m", "cluster.cli", "teacher", "-c", "configs/teacher/tiny.yaml",
           "data.max_bytes=300000", "data.vocab_size=384", f"data.out_dir={tmp_path / 'data'}", "training.steps=6",
           "training.eval_every=3", "training.eval_tokens=1024", "eval.max_tokens=2048", f"out_dir={tmp_path / 'runs'}",
           "topk.enabled=true", "topk.max_windows=16", f"topk.dir={tmp_path / 'topk'}", "name=tjob",
           f"registry.root={tmp_path / 'registry'}"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "submitted retort-teacher-" in p.stdout and "tjob:1" in p.stdout
    reg = open_registry(root=str(tmp_path / "registry"))
    assert reg.show("tjob@production")["metrics"]["train_tokens"] == 6 * 8 * 64
    assert TopKCache(tmp_path / "topk").n_windows == 16
