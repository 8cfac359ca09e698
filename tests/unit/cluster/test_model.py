"""Parity with transformers in both directions, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from cluster.config.model import ModelConfig, preset
from cluster.errors import RetortError
from cluster.model import Transformer

CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "qwen2-bias": dict(arch="qwen2", qkv_bias=True, n_heads=4, n_kv_heads=2),
    "head-dim": dict(n_heads=2, n_kv_heads=1, head_dim=16, rope_theta=500000.0),
}


def tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=301, d_model=64, n_layers=2, d_ff=96, max_seq_len=64, **kw)


def hf_class(cfg: ModelConfig):
    return Qwen2ForCausalLM if cfg.arch == "qwen2" else LlamaForCausalLM


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_saved_loads_in_transformers(name, tmp_path):
    cfg = tiny(**CONFIGS[name])
    ours = Transformer(cfg).init_weights(seed=1)
    ours.save_pretrained(tmp_path)
    theirs = hf_class(cfg).from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert err < 1e-4, f"{name}: max |Δlogit| = {err}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_saved_loads_in_ours(name, tmp_path):
    cfg = tiny(**CONFIGS[name])
    from cluster.checkpoint import config_to_hf

    hf_cfg_cls = hf_class(cfg).config_class
    hf_cfg = hf_cfg_cls(
        **{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(3)
    theirs = hf_class(cfg)(hf_cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        err = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert err < 1e-4, f"{name}: max |Δlogit| = {err}"


def test_positions_and_hidden():
    cfg = tiny(n_heads=4, n_kv_heads=2)
    m = Transformer(cfg).init_weights(seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 10))
    logits, hidden = m(tokens, return_hidden=True)
    assert logits.shape == (1, 10, cfg.vocab_size) and hidden.shape == (1, 10, cfg.d_model)
    # explicit default positions change nothing
    assert torch.equal(m(tokens, torch.arange(10)[None]), logits)


def test_presets_are_valid_and_sized():
    assert preset("tiny").n_layers == 2
    small, student = (
        Transformer(preset("small")).num_params(),
        Transformer(preset("small-student")).num_params(),
    )
    assert student <= small / 4 + 1, "the demo student must be at most a quarter of the teacher"
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError):
        ModelConfig(unknown_field=1)


def _write(tmp_path, cfg: ModelConfig):
    Transformer(cfg).init_weights(0).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_unsupported_architecture(tmp_path):
    hf = _write(tmp_path, tiny())
    hf["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(RetortError, match="unsupported architecture"):
        Transformer.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _write(tmp_path, tiny())
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(RetortError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(tmp_path)


def test_pickle_weights_refused(tmp_path):
    _write(tmp_path, tiny())
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(RetortError, match="only safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(RetortError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
