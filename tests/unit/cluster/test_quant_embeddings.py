"""Quantized embedding tables (and the tied LM head that shares them): checkpoint round trip with
identical logits, equality with the dequantized reference model, and whole-file byte ratios."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cluster import quant
from cluster.config.model import ModelConfig, preset
from cluster.errors import RetortError
from cluster.model import Transformer

SCHEMES = [("int8", None), ("w8a8", None), ("int4", 32), ("w4a8", 64)]


def _model(tie: bool, cfg: ModelConfig | None = None) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg or preset("tiny", tie_embeddings=tie)).init_weights(seed=0).eval()


def _dequantized_reference(model: Transformer, float_model: Transformer) -> Transformer:
    """``float_model`` with every quantized tensor of ``model`` replaced by its dequantized value."""
    ref = float_model
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, quant.QuantLinear):
                ref.get_submodule(name).weight.copy_(mod.dequantize())
    return ref


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantized_embedding_roundtrip(tmp_path, scheme: str, group: int | None, tie: bool) -> None:
    model = quant.quantize_model(_model(tie), scheme, group, modules_not_converted=[])
    emb = model.model.embed_tokens
    assert isinstance(emb, quant.EMBEDDINGS[scheme]) and emb.weight.dtype in (torch.int8, torch.uint8)
    if tie:
        assert isinstance(model.lm_head, quant.TiedQuantHead) and model.lm_head.embed is emb
    else:
        assert isinstance(model.lm_head, quant.MODULES[scheme])
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = model(tokens)
    model.save_pretrained(tmp_path, extra_config={"quantization_config": model.quantization_config})
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["embeddings"] == {
        "scheme": scheme,
        "symmetric": scheme not in quant.GROUPED,
        "group_size": group,
        "tied_lm_head": tie,
    }
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight_scale" in keys
    assert tie == (not any(k.startswith("lm_head.") for k in keys))  # a tied table is stored once
    loaded = Transformer.from_pretrained(tmp_path)
    assert isinstance(loaded.model.embed_tokens, quant.EMBEDDINGS[scheme])
    if tie:
        assert loaded.lm_head.embed is loaded.model.embed_tokens
    with torch.no_grad():
        after = loaded(tokens)
    assert torch.equal(before, after) or torch.allclose(before, after, atol=1e-5), (
        (before - after).abs().max()
    )
    if scheme not in quant.ACT_QUANT:  # weight-only: the model computes exactly the dequantized reference
        ref = _dequantized_reference(loaded, _model(tie))
        with torch.no_grad():
            expect = ref(tokens)
        assert torch.allclose(after, expect, atol=1e-4, rtol=1e-4), (after - expect).abs().max()


def test_embedding_lookup_equals_dequantized_rows() -> None:
    emb = nn.Embedding(100, 64)
    for scheme, group in SCHEMES:
        q = quant.EMBEDDINGS[scheme].from_embedding(emb, scheme not in quant.GROUPED, group)
        tokens = torch.tensor([[0, 5, 99], [7, 7, 1]])
        assert torch.equal(q(tokens), q.dequantize()[tokens])
        err = (q(tokens) - emb(tokens)).abs().max() / emb.weight.abs().max()
        assert err < (0.1 if group else 0.01), (scheme, err)


@pytest.mark.parametrize("tie", [True, False])
def test_excluding_embed_tokens_keeps_the_table_float(tie: bool) -> None:
    model = quant.quantize_model(_model(tie), "int8", modules_not_converted=["embed_tokens"])
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.quantization_config["embeddings"] is None
    assert (
        quant.quantize_model(_model(tie), "int8", embeddings=None).quantization_config["embeddings"] is None
    )


def test_embedding_scheme_can_differ_from_the_model() -> None:
    model = quant.quantize_model(_model(True), "int4", 32, modules_not_converted=[], embeddings="int8")
    assert isinstance(model.model.embed_tokens, quant.Int8Embedding)
    assert model.quantization_config["embeddings"]["scheme"] == "int8"


def test_bad_embedding_config_is_named() -> None:
    base = {"quant_method": "retort", "scheme": "int8"}
    with pytest.raises(RetortError, match="embeddings.scheme: unknown scheme 'int3'"):
        quant.validate_qcfg({**base, "embeddings": {"scheme": "int3"}})
    with pytest.raises(RetortError, match="embeddings.group_size"):
        quant.validate_qcfg({**base, "embeddings": {"scheme": "int4", "group_size": 48}})
    with pytest.raises(RetortError, match="tied_lm_head=True"):
        with torch.device("meta"):
            m = Transformer(preset("tiny"))
        quant.prepare_for_load(m, {**base, "embeddings": {"scheme": "int8", "tied_lm_head": True}})
    m = _model(False)  # an int8 model with an int4 table takes groups of 128: d_model 64 does not divide
    with pytest.raises(
        RetortError, match="model.embed_tokens: in_features 64 is not divisible by group_size 128"
    ):
        quant.quantize_model(m, "int8", modules_not_converted=[], embeddings="int4")
    assert not quant.is_quantized(m)  # validated before touching any layer


def _file_bytes(path) -> int:
    return (path / "model.safetensors").stat().st_size


def test_whole_file_byte_ratios(tmp_path) -> None:
    """Whole files (embeddings and head included): int8 ~ 1/4 and int4 g128 ~ 1/7 of fp32."""
    cfg = ModelConfig(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=384)
    _model(False, cfg).save_pretrained(tmp_path / "fp32")
    fp32 = _file_bytes(tmp_path / "fp32")
    ratios = {}
    for scheme, group in (("int8", None), ("w8a8", None), ("int4", 128), ("w4a8", 128)):
        m = quant.quantize_model(_model(False, cfg), scheme, group, modules_not_converted=[])
        m.save_pretrained(tmp_path / scheme, extra_config={"quantization_config": m.quantization_config})
        ratios[scheme] = _file_bytes(tmp_path / scheme) / fp32
    assert all(0.24 < ratios[s] < 0.27 for s in ("int8", "w8a8")), ratios
    assert all(0.13 < ratios[s] < 0.15 for s in ("int4", "w4a8")), ratios  # 1/7 = 0.143
