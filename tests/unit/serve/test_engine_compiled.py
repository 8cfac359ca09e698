"""The engine's fused forward and its compiled pieces compute what the eager model computes.

The CUDA decode graphs run ``make_decode_layer(compile=True)`` (``layer_pieces`` through ``torch.compile``);
here they are compiled on the CPU (Inductor C++), which checks the same traced graphs: dynamic
batch and block-table sizes, the in-place KV write into the caches passed in, GQA expansion.
"""

import pytest
import torch
from engine_helpers import random_prompts, reference_greedy, tiny_model

from cluster.config.engine import EngineConfig
from serve.engine import LLMEngine, SamplingParams
from serve.engine.cuda_graphs import additive_mask
from serve.engine.fused_model import FusedModel, decode_attention, make_decode_layer


def _decode_inputs(fm: FusedModel, B: int, nb: int, seed: int, NB: int = 40, BS: int = 16):
    g = torch.Generator().manual_seed(seed)
    Hkv, D = fm.n_kv_heads, fm.head_dim
    kc, vc = torch.randn(NB + 1, BS, Hkv, D, generator=g), torch.randn(NB + 1, BS, Hkv, D, generator=g)
    x = torch.randn(B, fm.model.cfg.d_model, generator=g)
    pos = torch.randint(0, nb * BS, (B,), generator=g)
    tables = torch.stack([torch.randperm(NB, generator=g)[:nb] for _ in range(B)])
    slots = tables[torch.arange(B), pos // BS] * BS + pos % BS
    mask = additive_mask(torch.arange(nb * BS)[None] <= pos[:, None], torch.float32)
    return x, pos, kc, vc, slots, tables, mask


def _eager_layer(fm: FusedModel, i, x, pos, kc, vc, slots, tables, mask):
    cos, sin = fm.rope_tables(pos)
    q, k, v = fm.qkv(i, x, cos, sin)
    kc.view(-1, fm.n_kv_heads, fm.head_dim).index_copy_(0, slots, k)
    vc.view(-1, fm.n_kv_heads, fm.head_dim).index_copy_(0, slots, v)
    return fm.finish(i, x, decode_attention(q, kc, vc, tables, mask, fm.n_heads // fm.n_kv_heads))


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA and MHA (4 query heads)
def test_compiled_decode_layer_matches_eager(kv_heads):
    model = tiny_model(n_kv_heads=kv_heads)
    eager = FusedModel(model, 256)
    layer = make_decode_layer(eager.n_heads, eager.n_kv_heads, eager.head_dim, eager.eps, compile=True)
    with torch.inference_mode():
        for seed, (B, nb) in enumerate([(3, 4), (6, 8), (1, 4)]):
            x, pos, kc, vc, slots, tables, mask = _decode_inputs(eager, B, nb, seed)
            want_k, want_v = kc.clone(), vc.clone()
            want = _eager_layer(eager, 1, x, pos, want_k, want_v, slots, tables, mask)
            cos, sin = eager.rope_tables(pos)
            got = layer(x, cos, sin, eager.decode_weights(1), kc, vc, slots, tables, mask, pos + 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                kc, want_k, rtol=1e-5, atol=1e-5
            )  # written in place, elsewhere untouched
            torch.testing.assert_close(vc, want_v, rtol=1e-5, atol=1e-5)


def test_fused_forward_is_the_model_forward():
    """A prefill through the engine's fused forward gives the model's logits (fp32, CPU)."""
    model = tiny_model()
    eng = LLMEngine(model, EngineConfig(device="cpu", dtype="float32", num_blocks=32))
    prompt = random_prompts(1, 30, 30, seed=11)[0]
    eng.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
    out = eng.step()[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
    for tok, lp in out.new_logprobs[0].items():
        assert lp == pytest.approx(ref[tok].item(), abs=1e-5)
    assert out.new_token_ids == reference_greedy(model, prompt, 1)


def test_quantized_projections_are_not_fused():
    from cluster.quant import quantize_model

    fm = FusedModel(quantize_model(tiny_model(), "int8", group_size=32), 256)
    assert all(lw.qkv is None and lw.gate_up is None for lw in fm.layers)
    assert fm.decode_weights(0) is None
    assert (
        fm.cos.dtype == torch.float32
    )  # the RoPE table has the activations' dtype, not the int8 embedding's
