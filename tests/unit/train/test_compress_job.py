"""``python -m train.compress``: variants built, measured, gated; only passing ones published
(real registry in a temp root, real data shards from the stdlib corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.config.model import preset
from cluster.model import Transformer
from cluster.quant import Int8Linear
from train.compress.__main__ import main

DATA = ["data.max_bytes=400000", "data.val_fraction=0.2", "data.include_tests=false", "data.vocab_size=512"]
EVAL = [
    "eval.seq_len=32",
    "eval.stride=32",
    "eval.max_tokens=2048",
    "eval.calib_tokens=512",
    "eval.decode_prompt=4",
    "eval.decode_tokens=4",
    "eval.decode_batches=[1,2]",
    "eval.isolate=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")  # shards prepared once, reused by every test here


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> dict[str, Path]:
    reg = tmp_path / "registry"
    monkeypatch.setenv("RETORT_REGISTRY", str(reg))
    src = tmp_path / "src"
    Transformer(preset("tiny")).init_weights(seed=0).save_pretrained(src)
    return {"src": src, "reg": reg, "runs": tmp_path / "runs", "data": data_dir}


def _args(env: dict[str, Path], *extra: str) -> list[str]:
    return [
        "-c",
        "configs/compress/tiny.yaml",
        f"source={env['src']}",
        f"out_dir={env['runs']}",
        f"data.out_dir={env['data']}",
        *DATA,
        *EVAL,
        *extra,
    ]


def test_job_publishes_passing_variant_with_lineage(env, capsys) -> None:
    variants = "[{name: int8, quant: {scheme: int8}}]"
    assert main(_args(env, f"variants={variants}")) == 0
    out = capsys.readouterr().out
    assert "| int8" in out and "pass -> src-int8:1" in out and "| 8    |" in out  # both tables printed
    from cluster.registry import open_registry

    reg = open_registry(None)
    m = reg.show("src-int8:1")
    assert m["lineage"]["parents"] == [str(env["src"].resolve())]
    assert m["metrics"]["ppl"] > 0 and m["metrics"]["bytes"] > 0 and "tok_s_b1" in m["metrics"]
    path = reg.resolve("src-int8:1")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["scheme"] == "int8"
    model = Transformer.from_pretrained(path)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 512)


def test_gate_failure_publishes_nothing_and_exits_1(env, capsys) -> None:
    variants = (
        "[{name: int8, quant: {scheme: int8}}, "
        "{name: fast, quant: {scheme: int8}, gate: {min_decode_speedup: 1000}}]"
    )
    assert main(_args(env, f"variants={variants}", "fail_on_gate=true")) == 1
    io = capsys.readouterr()
    assert "FAIL: decode speedup" in io.out and "gate refused fast" in io.err
    from cluster.registry import open_registry

    names = [e["name"] if isinstance(e, dict) else str(e) for e in open_registry(None).list()]
    assert not any("fast" in n for n in names)  # the refused variant is not in the registry
    assert any("src-int8" in n for n in names)


def test_bad_inputs_exit_2_with_one_line(env, capsys) -> None:
    bad_group = "[{name: q, quant: {scheme: int4, group_size: 128}}]"
    assert main(_args(env, f"variants={bad_group}")) == 2
    assert (
        "model.layers.0.self_attn.q_proj: in_features 64 is not divisible by group_size 128"
        in capsys.readouterr().err
    )
    assert main(_args(env, "variants=[{name: p, prune: {method: magnitude, sparsity: 1.2}}]")) == 2
    assert "variants.0.prune.sparsity" in capsys.readouterr().err
    assert main(_args(env, "variants=[{name: q, quant: {scheme: int3}}]")) == 2
    assert "variants.0.quant.scheme" in capsys.readouterr().err
    qdir = env["src"].parent / "quantized"
    from cluster.quant import quantize_model

    m = quantize_model(Transformer.from_pretrained(env["src"]), "int8")
    m.save_pretrained(qdir, extra_config={"quantization_config": m.quantization_config})
    assert main(_args(env, f"source={qdir}", "variants=[{name: q, quant: {scheme: int8}}]")) == 2
    assert "already quantized" in capsys.readouterr().err
