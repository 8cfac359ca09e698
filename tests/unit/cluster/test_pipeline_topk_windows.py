"""The pipeline's top-k stage caches exactly the windows its distillation stages draw."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import load_config, schema_for
from cluster.pipeline.orchestrator import Pipeline
from cluster.pipeline.stages import topk_windows, wire_topk
from train.data.loader import packed_batches


def pipeline_cfg(*overrides: str):
    return load_config("configs/pipeline/small.yaml", schema_for("pipeline"), list(overrides))


def test_small_demo_caches_steps_times_global_batch():
    d = load_config("configs/distill/small.yaml", schema_for("distill"), [])
    assert topk_windows(pipeline_cfg()) == d.steps * d.global_batch == 6400


def test_the_longer_of_distill_and_baseline_sets_the_count():
    cfg = pipeline_cfg("baseline.overrides=[loss.alpha=0.0, publish_name=student-nokd, steps=500]")
    assert topk_windows(cfg) == 500 * 16
    cfg = pipeline_cfg("baseline.enabled=false", "distill.overrides=[steps=100, micro_batch_size=4]")
    assert topk_windows(cfg) == 100 * 8


def test_wired_overrides_name_the_count_and_a_run_local_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RETORT_REGISTRY", str(tmp_path / "registry"))
    p = Pipeline(pipeline_cfg(f"runs_dir={tmp_path}", "name=t"))
    p.outputs["teacher"] = {"ref": "teacher:3"}
    wired = dict(w.split("=", 1) for w in wire_topk(p))
    assert wired["topk.teacher"] == "teacher:3" and wired["topk.seq_len"] == "128"
    assert wired["topk.max_windows"] == "6400"
    assert wired["topk.dir"] == str(tmp_path / "t" / "topk" / "teacher-v3-L128-k32-w6400-bf16")
    # the teacher config's own max_windows still caps it
    p = Pipeline(pipeline_cfg(f"runs_dir={tmp_path}", "name=t", "teacher.overrides=[topk.max_windows=1000]"))
    p.outputs["teacher"] = {"ref": "teacher:3"}
    assert dict(w.split("=", 1) for w in wire_topk(p))["topk.max_windows"] == "1000"


@pytest.mark.parametrize("world,batch,steps", [(2, 8, 400), (1, 16, 50), (2, 3, 7)])
def test_the_distill_loader_draws_every_cached_window_once(world, batch, steps):
    """What the distill job does with a cache of steps x global_batch windows: read tokens[:token_limit]."""
    seq_len, n_windows = 16, steps * world * batch
    token_limit = n_windows * seq_len + 1  # TopKCache.token_limit
    tokens = np.arange(n_windows * seq_len * 3, dtype=np.int64)[
        :token_limit
    ]  # more data exists; the job slices
    drawn = [
        w
        for rank in range(world)
        for w, _ in packed_batches(
            tokens, seq_len, batch, seed=0, rank=rank, world_size=world, max_steps=steps
        )
    ]
    drawn = np.concatenate([w.numpy() for w in drawn])
    assert sorted(drawn.tolist()) == list(range(n_windows))  # all cached, none twice, no epoch wrap


def test_a_cache_built_by_another_teacher_under_the_same_ref_is_rebuilt(tmp_path, monkeypatch):
    """A fresh registry numbers its new teacher v1 again: the run's cache of the old v1 must not pass."""
    import json

    from cluster.config.model import preset
    from cluster.model import Transformer
    from cluster.pipeline.stages import topk_cache_current
    from cluster.registry import open_registry

    monkeypatch.setenv("RETORT_REGISTRY", str(tmp_path / "registry"))
    p = Pipeline(pipeline_cfg(f"runs_dir={tmp_path}", "name=t"))
    for seed in (0, 1):
        Transformer(preset("tiny")).init_weights(seed).save_pretrained(tmp_path / f"m{seed}")
    reg = open_registry(root=str(tmp_path / "registry"))
    p.outputs["teacher"] = {"ref": str(reg.publish("teacher", tmp_path / "m0"))}
    cache = tmp_path / "topk"
    cache.mkdir()
    out = {"dir": str(cache)}
    assert not topk_cache_current(p, out)  # no manifest: not built
    from cluster.checkpoint import weights_sha256

    (cache / "manifest.json").write_text(json.dumps({"teacher_sha256": weights_sha256(tmp_path / "m0")}))
    assert topk_cache_current(p, out)
    (cache / "manifest.json").write_text(json.dumps({"teacher_sha256": weights_sha256(tmp_path / "m1")}))
    assert not topk_cache_current(p, out)
