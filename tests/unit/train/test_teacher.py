"""The teacher job: schedule and optimizer pieces, then the real CLI on a tiny corpus (pretrain -> registry
-> top-k cache) and import of the published checkpoint (including the bad-input paths)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import load_config
from cluster.config.teacher import TeacherConfig
from cluster.errors import RetortError
from cluster.model import Transformer
from train.teacher import lr_at, make_optimizer, model_config

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "teacher" / "tiny.yaml"
STEPS, BATCH, SEQ = 12, 8, 64


def tiny_overrides(tmp: Path) -> list[str]:
    return [
        "data.max_bytes=300000", "data.vocab_size=384", f"data.out_dir={tmp / 'data'}",
        f"training.steps={STEPS}", "training.eval_every=6", "training.eval_tokens=2048", "eval.max_tokens=4096",
        f"out_dir={tmp / 'runs'}", "topk.enabled=true", "topk.max_windows=32", f"topk.dir={tmp / 'topk'}",
    ]  # fmt: skip


def test_lr_schedule():
    cfg = TeacherConfig(training={"steps": 100, "warmup_steps": 10, "lr": 1e-3, "min_lr_ratio": 0.1})
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_optimizer_decays_matrices_only_and_counts_tied_weights_once():
    cfg = TeacherConfig(model_preset="tiny", training={"weight_decay": 0.1})
    mc = model_config(cfg, 300).model_copy(update={"tie_embeddings": True})
    model = Transformer(mc)
    opt = make_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert mc.vocab_size == 300


def test_config_errors():
    with pytest.raises(ValidationError, match="import_dir"):
        TeacherConfig(source="import")
    with pytest.raises(ValidationError, match="unknown model_preset"):
        TeacherConfig(model_preset="huge")
    with pytest.raises(ValidationError, match="stride"):
        TeacherConfig(eval={"seq_len": 32, "stride": 64})
    with pytest.raises(RetortError, match="max_seq_len"):
        model_config(TeacherConfig(model_preset="tiny", training={"seq_len": 1024}), 300)
    cfg = load_config(TINY, TeacherConfig)
    assert cfg.teacher_ref() == "teacher-tiny@production"
    assert cfg.model_copy(update={"alias": None}).teacher_ref() == "teacher-tiny"


def test_bad_override_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "teacher", "-c", str(TINY), "training.steps=0", "--local"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "training.steps" in r.stderr


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Run ``retort teacher --local`` once: pretrain a tiny teacher, publish it, build its top-k cache."""
    tmp = tmp_path_factory.mktemp("teacher")
    env = {**os.environ, "RETORT_REGISTRY": str(tmp / "registry")}
    cmd = [sys.executable, "-m", "cluster.cli", "teacher", "-c", str(TINY), *tiny_overrides(tmp), "--local"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r.stdout.strip().splitlines()


def registry(tmp: Path):
    from cluster.registry import open_registry

    return open_registry(root=str(tmp / "registry"))


def test_pretrain_publishes_with_lineage_and_metrics(published):
    from cluster.tokenizer import load_tokenizer
    from train.data import load_manifest, load_split
    from train.evaluate import perplexity

    tmp, lines = published
    assert lines[-1] == "teacher-tiny:1"
    reg = registry(tmp)
    m = reg.show("teacher-tiny@production")
    data = load_manifest(next(p.parent for p in (tmp / "data").glob("*/manifest.json")))
    lin, met = m["lineage"], m["metrics"]
    assert lin["parents"] == [] and lin["dataset_fingerprint"] == data.fingerprint
    assert lin["tokenizer_sha256"] == data.tokenizer_sha256 and lin["config"]["training"]["steps"] == STEPS
    assert met["train_tokens"] == STEPS * BATCH * SEQ and met["params"] > 0 and met["seconds"] > 0
    assert met["val_ppl"] < 0.8 * met["initial_val_ppl"]  # it learned something in 12 steps
    d = reg.resolve("teacher-tiny@production")
    assert load_tokenizer(d).sha256 == data.tokenizer_sha256
    record = json.loads((d / "training.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 6, 12]
    model = Transformer.from_pretrained(d)
    ppl = perplexity(model, load_split(data.dir, "val"), SEQ, SEQ, 16, 4096)
    assert ppl == pytest.approx(met["val_ppl"], rel=1e-3)


def test_pretrain_builds_a_matching_topk_cache(published):
    from train.data import load_manifest
    from train.topk import TopKCache, weights_sha256

    tmp, lines = published
    assert any('"topk_cache"' in line for line in lines)
    data = load_manifest(next(p.parent for p in (tmp / "data").glob("*/manifest.json")))
    cache = TopKCache(tmp / "topk")
    assert cache.n_windows == 32 and cache.k == 8
    cache.check(data_fingerprint=data.fingerprint, seq_len=SEQ,
                teacher_sha256=weights_sha256(registry(tmp).resolve("teacher-tiny:1")))  # fmt: skip


def test_import_publishes_the_same_model(published, capsys):
    from train.teacher import run

    tmp, _ = published
    src = registry(tmp).resolve("teacher-tiny:1")
    os.environ["RETORT_REGISTRY"] = str(tmp / "registry")
    try:
        cfg = load_config(TINY, TeacherConfig, [*tiny_overrides(tmp)[:7], "source=import", f"import_dir={src}",
                                                "name=imported", "alias=null", f"out_dir={tmp / 'runs'}"])  # fmt: skip
        ref = run(cfg)
    finally:
        del os.environ["RETORT_REGISTRY"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == "imported:1" == str(ref)
    reg = registry(tmp)
    assert reg.show("imported:1")["metrics"]["val_ppl"] == pytest.approx(
        reg.show("teacher-tiny:1")["metrics"]["val_ppl"], rel=1e-4
    )
    assert reg.show("imported:1")["lineage"]["imported_from"] == str(src)


def test_import_with_another_data_tokenizer_reencodes_the_val_documents(published):
    """Data tokenized differently (vocab 300): the teacher is evaluated on the same val documents
    re-encoded with its own tokenizer, which reproduces its val split exactly."""
    from cluster.config.data import DataConfig
    from cluster.tokenizer import load_tokenizer
    from train.data import load_manifest, load_split, prepare
    from train.teacher import val_tokens_for

    tmp, _ = published
    src = registry(tmp).resolve("teacher-tiny:1")
    cfg = load_config(TINY, TeacherConfig, tiny_overrides(tmp)[:7])
    other = cfg.model_copy(update={"data": DataConfig(**{**cfg.data.model_dump(), "vocab_size": 300})})
    data = prepare(other.data)
    tok = load_tokenizer(src)
    assert data.tokenizer_sha256 != tok.sha256
    own = load_manifest(
        next(p.parent for p in (tmp / "data").glob("*/manifest.json") if p.parent != data.dir)
    )
    got = val_tokens_for(
        other.model_copy(update={"eval": other.eval.model_copy(update={"max_tokens": None})}), data, tok
    )
    assert got.tolist() == load_split(own.dir, "val").tolist()


def test_import_bad_checkpoints_exit_2(published, tmp_path, capsys):
    from train.teacher import main

    tmp, _ = published
    src = registry(tmp).resolve("teacher-tiny:1")
    bad_arch, no_tok = tmp_path / "gpt2", tmp_path / "notok"
    shutil.copytree(src, bad_arch)
    cfg = json.loads((bad_arch / "config.json").read_text())
    (bad_arch / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    shutil.copytree(src, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    base = [*tiny_overrides(tmp)[:7], "source=import", f"registry.root={tmp_path / 'reg'}"]
    assert main(["-c", str(TINY), *base, f"import_dir={bad_arch}"]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    assert main(["-c", str(TINY), *base, f"import_dir={no_tok}"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["-c", str(TINY), *base, f"import_dir={tmp_path / 'absent'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
