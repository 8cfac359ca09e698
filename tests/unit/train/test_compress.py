"""train.compress library: pruning (magnitude, 2:4, structured), AWQ scaling, bit-width error, gate, KV decode."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from cluster import quant
from cluster.config.compress import GateConfig, PruneConfig, QuantSettings
from cluster.config.model import preset
from cluster.errors import RetortError
from cluster.model import Transformer
from train.compress import prune as P
from train.compress.calibrate import collect_inputs
from train.compress.decode_bench import ContiguousKV, generate
from train.compress.gate import apply_gate, logical_params
from train.compress.quantize import awq_groups, awq_scale, bitwidth_mse, fake_quant, quantize


def _model(seed: int = 0, **over) -> Transformer:
    return Transformer(preset("tiny", **over)).init_weights(seed=seed).eval()


TOKENS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_magnitude_prune_hits_target_and_removes_smallest(scope: str) -> None:
    m = _model()
    before = {n: lin.weight.detach().clone() for n, lin in P.prunable(m)}
    model, rec = P.prune_model(m, PruneConfig(method="magnitude", sparsity=0.5, scope=scope))
    assert abs(rec["sparsity"] - 0.5) < 0.01
    for n, lin in P.prunable(model):
        kept = lin.weight != 0
        if scope == "per_layer":
            assert abs((~kept).float().mean().item() - 0.5) < 0.01
            w = before[n].abs()
            assert w[~kept].max() <= w[kept].min()  # only the smallest went
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # head untouched


def test_semi_structured_2_4() -> None:
    model, rec = P.prune_model(_model(), PruneConfig(method="2:4"))
    for _, lin in P.prunable(model):
        groups = lin.weight.view(lin.out_features, -1, 4)
        assert ((groups != 0).sum(-1) <= 2).all()
    assert abs(rec["sparsity"] - 0.5) < 1e-6


def test_structured_prune_equals_masked_original(tmp_path) -> None:
    """The smaller model computes exactly what the original computes with the removed heads'
    o_proj columns and the removed channels' down_proj columns zeroed."""
    big = _model()
    cfg = big.cfg
    channels, heads = P._mlp_channels(big, 128), P._heads(big, 1)
    masked = _model()
    with torch.no_grad():
        for i, blk in enumerate(masked.model.layers):
            keep_c = torch.zeros(cfg.d_ff, dtype=torch.bool)
            keep_c[channels[i]] = True
            blk.mlp.down_proj.weight[:, ~keep_c] = 0
            keep_r = torch.zeros(cfg.n_heads * cfg.dim_head, dtype=torch.bool)
            keep_r[P._head_rows(heads[i], cfg.dim_head)] = True
            blk.self_attn.o_proj.weight[:, ~keep_r] = 0
    small, rec = P.prune_model(big, PruneConfig(method="structured", sparsity=1 / 3, head_sparsity=0.5))
    assert (small.cfg.d_ff, small.cfg.n_heads, small.cfg.n_kv_heads, small.cfg.dim_head) == (128, 2, 2, 16)
    assert small.num_params() < masked.num_params() and rec["params"] == small.num_params()
    with torch.no_grad():
        assert torch.allclose(small(TOKENS), masked(TOKENS), atol=1e-5)
    small.save_pretrained(tmp_path, extra_config={"pruning": rec})
    again = Transformer.from_pretrained(tmp_path)
    assert again.cfg.d_ff == 128
    with torch.no_grad():
        assert torch.allclose(again(TOKENS), small(TOKENS), atol=1e-6)


def test_structured_prune_tied_head_stays_tied() -> None:
    small, _ = P.prune_model(_model(tie_embeddings=True), PruneConfig(method="structured", sparsity=0.5))
    assert small.lm_head.weight is small.model.embed_tokens.weight
    assert small(TOKENS).shape == (2, 16, 512)


def test_prune_bad_input() -> None:
    with pytest.raises(RetortError, match=r"prune.sparsity must be in \(0, 1\), got 1.5"):
        P.magnitude_prune(_model(), 1.5)
    with pytest.raises(ValidationError, match="sparsity"):
        PruneConfig(sparsity=0.0)
    with pytest.raises(RetortError, match="quantized"):
        P.prune_model(quant.quantize_model(_model(), "int8"), PruneConfig())
    with pytest.raises(RetortError, match="grouped-query"):
        P.structured_prune(_model(n_kv_heads=4), 0.5, head_sparsity=0.5)


def test_awq_scaling_preserves_the_float_function_and_beats_rtn() -> None:
    m = _model()
    with torch.no_grad():  # outlier input channels, as trained LMs have: where AWQ helps
        for blk in m.model.layers:
            blk.post_attention_layernorm.weight[:4] = 20.0
            blk.input_layernorm.weight[5:8] = 15.0
    q = QuantSettings(scheme="int4", group_size=32, calibration="awq")
    names = sorted({n for _, _, ns in awq_groups(m) for n in ns})
    batches = [torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    inputs = collect_inputs(m, batches, names)
    with torch.no_grad():
        ref = m(TOKENS)
    mods = dict(m.named_modules())
    rtn_err = {
        n: (inputs[n] @ (fake_quant(mods[n].weight, "int4", 32, False) - mods[n].weight).t()).pow(2).mean()
        for n in names
    }
    exps = awq_scale(m, inputs, q, symmetric=False)
    with torch.no_grad():
        assert torch.allclose(m(TOKENS), ref, atol=1e-4)  # scaling alone is exact
    mods = dict(m.named_modules())
    s_inputs = collect_inputs(m, batches, names)
    awq_err = {
        n: (s_inputs[n] @ (fake_quant(mods[n].weight, "int4", 32, False) - mods[n].weight).t()).pow(2).mean()
        for n in names
    }
    assert sum(awq_err.values()) < 0.9 * sum(rtn_err.values())
    assert any(a > 0 for a in exps.values())


def test_quantize_awq_end_to_end_and_bad_group() -> None:
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, 512, 4096).astype(np.uint16)
    m, rec = quantize(
        _model(), QuantSettings(scheme="int4", group_size=32, calibration="awq", awq_grid=4), tokens, 1024, 32
    )
    assert rec["calibration"] == "awq" and rec["calib_tokens"] == 1024
    assert isinstance(m.model.layers[0].mlp.down_proj, quant.Int4Linear)
    assert m(TOKENS).isfinite().all()
    with pytest.raises(
        RetortError,
        match=r"layer model.layers.0.self_attn.q_proj: in_features 64 is not divisible by group_size 128",
    ):
        quantize(_model(), QuantSettings(scheme="int4", group_size=128))
    with pytest.raises(RetortError, match="already quantized"):
        quantize(m, QuantSettings(scheme="int8"))
    with pytest.raises(ValidationError, match="group_size"):
        QuantSettings(scheme="int4", group_size=48)


def test_bitwidth_mse_decreases_with_bits() -> None:
    mse = bitwidth_mse(_model())
    vals = [mse[b] for b in range(2, 9)]
    assert all(a > b for a, b in zip(vals, vals[1:], strict=False))
    assert 3.5 < mse[7] / mse[8] < 4.5  # one more bit ~ a quarter of the error


def test_gate_refuses_with_reasons() -> None:
    src = {"ppl": 10.0, "bytes": 1000, "tok_s_b1": 100.0}
    good = {"ppl": 10.02, "bytes": 300, "tok_s_b1": 160.0}
    assert apply_gate(good, src, GateConfig(max_ppl_increase_pct=0.5, min_retention=0.99)).passed
    bad = {"ppl": 10.5, "bytes": 600, "tok_s_b1": 90.0}
    res = apply_gate(
        bad,
        src,
        GateConfig(max_ppl_increase_pct=1.0, min_retention=0.99, min_decode_speedup=1.2, max_bytes_ratio=0.5),
    )
    assert not res.passed and len(res.reasons) == 4
    assert "ppl +5.00% > 1.0%" in res.reasons[0]


def test_kv_decode_matches_full_recompute() -> None:
    m = _model()
    prompt = TOKENS[:, :6]
    out, _ = generate(m, prompt, 5)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):  # greedy with full recompute, no cache
            seq = torch.cat([seq, m(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq[:, 6:])
    cache = ContiguousKV(2, 1, 4, 2, 16)
    with pytest.raises(ValueError, match="full"):
        m(torch.zeros(1, 5, dtype=torch.long), kv=cache)


def test_logical_params_count_quantized_weights() -> None:
    m = _model()
    n = m.num_params()
    assert logical_params(quant.quantize_model(m, "int4", 32)) == n
    assert isinstance(m.lm_head, quant.Int4Linear)  # not tied: quantized unless excluded


def test_decode_bench_in_fresh_process(tmp_path) -> None:
    from train.compress.decode_bench import measure_in_subprocess

    m = quant.quantize_model(_model(), "w8a8")
    m.save_pretrained(tmp_path, extra_config={"quantization_config": m.quantization_config})
    out = measure_in_subprocess(tmp_path, [1, 2], prompt_len=3, n_tokens=3)
    assert out["tok_s_b1"] > 0 and out["tok_s_b2"] > 0
    assert 0 < out["model_rss_mb"] < out["peak_rss_mb"] < 4096  # this child's own peak, not the parent's
    assert out["kernels"] and set(out["kernels"]) <= set(quant.KERNELS["w8a8"])
