"""cluster.quant: quantize/dequantize bounds, int4 packing, kernels vs the dequantized reference,
quantized checkpoints that load back through Transformer.from_pretrained with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cluster import quant
from cluster.config.model import preset
from cluster.errors import RetortError
from cluster.model import Transformer


def _w(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_error_bound(symmetric: bool) -> None:
    w = _w()
    q, s, z = quant.quantize_int8(w, symmetric)
    assert q.dtype == torch.int8 and s.shape == (48,) and (z is None) == symmetric
    err = (quant.dequantize_int8(q, s, z) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()  # round-to-nearest: at most half a step
    assert err.max() > 0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_bound(symmetric: bool, group: int) -> None:
    w = _w()
    p, s, z = quant.quantize_int4(w, group, symmetric)
    assert p.shape == (48, 128) and p.dtype == torch.uint8 and s.shape == (48, 256 // group)
    err = (quant.dequantize_int4(p, s, z) - w).abs().reshape(48, -1, group)
    assert (err <= s[..., None] / 2 + 1e-7).all()
    # a smaller group never has a larger step than a larger one over the same columns
    rel = (err.pow(2).mean() / w.pow(2).mean()).item()
    assert rel < 0.02


def test_int4_pack_roundtrip() -> None:
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    p = quant.pack_int4(q)
    assert p.shape == (7, 32)
    assert torch.equal(quant.unpack_int4(p), q)
    assert torch.equal(p[0, 0] & 0xF, q[0, 0]) and torch.equal(p[0, 0] >> 4, q[0, 1])


def _lin(k: int = 256, n: int = 64, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_w(n, k, seed=1))
        if bias:
            lin.bias.normal_()
    return lin


CASES = [
    ("int8", True, None),
    ("int8", False, None),
    ("int4", False, 32),
    ("int4", True, 128),
    ("w8a8", True, None),
    ("w4a8", False, 64),
]


@pytest.mark.parametrize("scheme,symmetric,group", CASES)
def test_every_cpu_kernel_matches_dequantized_reference(
    scheme: str, symmetric: bool, group: int | None
) -> None:
    m = quant.MODULES[scheme].from_float(_lin(bias=True), symmetric=symmetric, group_size=group, name="l")
    x = torch.randn(5, 256)
    w = m.dequantize()
    ran = []
    for name, kernel in quant.KERNELS[scheme].items():
        if "cpu" not in kernel.devices:
            continue
        try:
            y = kernel.run(m, x) + m.bias
        except RuntimeError:  # a fast kernel missing from this torch build is skipped by selection too
            if name == "dequant":  # the fallback must always work
                raise
            continue
        ran.append(name)
        if (
            scheme in quant.ACT_QUANT
        ):  # activations are quantized: compare with the per-token fake-quant reference
            xq, xs = quant.quantize_act_per_token(x)
            ref = nn.functional.linear(xq.float() * xs, w, m.bias)
            tol = 1e-3 if kernel.exact else 0.03 * ref.abs().max().item()
        else:
            ref = nn.functional.linear(x, w, m.bias)
            tol = 1e-4
        assert (y - ref).abs().max().item() <= tol, name
    assert "dequant" in ran and len(ran) >= 2, ran


@pytest.mark.parametrize("scheme,symmetric,group", CASES)
def test_module_forward_uses_selected_kernel(scheme: str, symmetric: bool, group: int | None) -> None:
    lin = _lin(bias=True)
    m = quant.MODULES[scheme].from_float(lin, symmetric=symmetric, group_size=group, name="l")
    x = torch.randn(2, 3, 256)
    y = m(x)
    assert y.shape == (2, 3, 64)
    assert m._choice and set(m._choice.values()) <= set(quant.KERNELS[scheme])
    ref = lin(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.01, "w8a8": 0.03, "int4": 0.1, "w4a8": 0.1}[scheme]


def test_forced_kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETORT_QUANT_KERNEL", "dequant")
    m = quant.Int8Linear.from_float(_lin(), name="l")
    m(torch.randn(1, 256))
    assert set(m._choice.values()) == {"dequant"}


def _model(tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", tie_embeddings=tie)).init_weights(seed=0).eval()


@pytest.mark.parametrize(
    "scheme,symmetric,group",
    [("int8", False, None), ("int4", False, 64), ("w8a8", True, None), ("w4a8", False, 32)],
)
def test_quantized_checkpoint_roundtrip(tmp_path, scheme: str, symmetric: bool, group: int | None) -> None:
    model = _model()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        base = model(tokens)
    quant.quantize_model(model, scheme, group, symmetric, modules_not_converted=["lm_head"])
    assert isinstance(model.model.layers[0].mlp.down_proj, quant.MODULES[scheme])
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        before = model(tokens)
    model.save_pretrained(tmp_path, extra_config={"quantization_config": model.quantization_config})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["scheme"] == scheme
    loaded = Transformer.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, quant.MODULES[scheme])
    with torch.no_grad():
        after = loaded(tokens)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    rel = ((after - base).norm() / base.norm()).item()
    assert rel < {"int8": 0.02, "w8a8": 0.05, "int4": 0.2, "w4a8": 0.2}[scheme]
    fp_bytes = sum(p.numel() * 4 for n, p in _model().named_parameters() if "layers" in n and "norm" not in n)
    q_bytes = sum(b.numel() * b.element_size() for n, b in loaded.named_buffers() if "layers" in n)
    assert q_bytes < fp_bytes * (0.3 if scheme not in quant.GROUPED else 0.2)


@pytest.mark.parametrize("exclude", [["lm_head"], ["embed_tokens"]])
def test_excluded_tied_table_stays_float(tmp_path, exclude: list[str]) -> None:
    model = quant.quantize_model(_model(tie=True), "int8", modules_not_converted=exclude)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.quantization_config["embeddings"] is None
    model.save_pretrained(tmp_path, extra_config={"quantization_config": model.quantization_config})
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(tokens), loaded(tokens), atol=1e-5)


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(RetortError, match="already quantized"):
        quant.quantize_model(quant.quantize_model(_model(), "int8"), "int4")
    with pytest.raises(RetortError, match="unknown scheme 'int3'"):
        quant.quantize_model(_model(), "int3")
    m = _model()
    m.model.layers[0].mlp.down_proj = nn.Linear(96, 64, bias=False)  # 96 % 64 != 0
    with pytest.raises(RetortError, match="model.layers.0.mlp.down_proj.*96.*64"):
        quant.quantize_model(m, "int4", group_size=64)
    assert not quant.is_quantized(m)  # validated before touching any layer
    with pytest.raises(RetortError, match="group_size"):
        quant.quantize_model(_model(), "int4", group_size=48)
    with pytest.raises(RetortError, match="quant_method"):
        quant.prepare_for_load(_model(), {"quant_method": "gptq", "scheme": "int4"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme,symmetric,group", CASES)
def test_cuda_kernels_match_reference(scheme: str, symmetric: bool, group: int | None) -> None:
    m = (
        quant.MODULES[scheme]
        .from_float(_lin(k=256, n=128, bias=True), symmetric=symmetric, group_size=group, name="l")
        .cuda()
    )
    ran = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(20, 256, device="cuda").to(dtype)
        ref = quant.DEQUANT.run(m, x)
        for name, kernel in quant.KERNELS[scheme].items():
            if "cuda" not in kernel.devices:
                continue
            try:
                y = kernel.run(m, x)
            except RuntimeError as e:
                ran[(name, dtype)] = f"unavailable: {e}"[:80]
                continue
            tol = 0.02 * ref.float().abs().max().item()
            assert (y.float() - ref.float()).abs().max().item() <= tol, (name, dtype)
            ran[(name, dtype)] = "ok"
    print(ran)
    assert sum(v == "ok" for k, v in ran.items() if k[0] != "dequant") >= 1, ran
    y = m(torch.randn(3, 256, device="cuda", dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.is_cuda
