"""The fused decode kernels (serve/engine/triton_decode.py) against the torch path they replace.

They run on CUDA (marked ``gpu``), or on CPU under Triton's interpreter when ``TRITON_INTERPRET=1``
is set (``PYTHONPATH=<triton> TRITON_INTERPRET=1 pytest tests/unit/serve/test_triton_decode.py``);
without Triton the module is skipped. Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine_helpers import TRITON_DEVICES, TRITON_INTERPRETED  # noqa: E402

from cluster.model import rope_cos_sin  # noqa: E402
from serve.engine import triton_decode as td  # noqa: E402
from serve.engine.cuda_graphs import additive_mask  # noqa: E402
from serve.engine.fused_model import decode_attention, make_decode_layer, rms_norm, rope  # noqa: E402

DEVICES = TRITON_DEVICES
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-5


def _gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(g: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, device=g.device) * scale).to(dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: tight; bf16: a few ulps (GPU reduction orders differ from torch's and can flip roundings)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2e-3)


# ------------------------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_matches_rms_norm_then_linear(device, dtype, M, bias):
    g = _gen(device, M)
    K, N = 160, 40  # K spans two 128-wide tiles (the second partial), N a partial 16-wide one
    x = _randn(g, M, K, dtype=dtype)
    nw = (torch.rand(K, generator=g, device=device) + 0.5).to(dtype)
    w = _randn(g, N, K, dtype=dtype, scale=K**-0.5)
    b = _randn(g, N, dtype=dtype) if bias else None
    want = F.linear(rms_norm(x, nw, EPS), w, b)
    _assert_close(td.norm_linear(x, nw, EPS, w, b), want)
    # fp32 logits: rounded to the activation dtype first, as the LM head's ``.float()`` after F.linear
    got = td.norm_linear(x, nw, EPS, w, b, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    _assert_close(got.to(dtype), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_linear_residual_matches_torch_and_may_write_in_place(device, dtype, M):
    g = _gen(device, 10 + M)
    K, N = 96, 48
    a = _randn(g, M, K, dtype=dtype)
    w = _randn(g, N, K, dtype=dtype, scale=K**-0.5)
    res = _randn(g, M, N, dtype=dtype)
    want = res + F.linear(a, w)
    _assert_close(td.linear_residual(a, w, res), want)
    got = td.linear_residual(a, w, res, out=res)
    assert got.data_ptr() == res.data_ptr()
    _assert_close(res, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_swiglu_linear_residual_matches_torch(device, dtype, M):
    g = _gen(device, 20 + M)
    Fd, N = 144, 40  # F: one full and one partial 128-wide K tile
    gu = _randn(g, M, 2 * Fd, dtype=dtype, scale=2.0)
    w = _randn(g, N, Fd, dtype=dtype, scale=Fd**-0.5)
    res = _randn(g, M, N, dtype=dtype)
    gate, up = gu.chunk(2, dim=-1)
    _assert_close(td.swiglu_linear_residual(gu, w, res), res + F.linear(F.silu(gate) * up, w))


@pytest.mark.skipif(
    not TRITON_INTERPRETED, reason="CPU under the interpreter: same reduction order as torch's CPU GEMM"
)
def test_bf16_rounding_order_is_torchs_bit_for_bit():
    """Every intermediate rounds where torch eager rounds: on CPU (fp32 accumulation both sides, tiny K)
    the bf16 results are identical, not merely close."""
    g = _gen("cpu", 7)
    M, K, N = 5, 64, 32
    x = _randn(g, M, K, dtype=torch.bfloat16)
    nw = (torch.rand(K, generator=g) + 0.5).bfloat16()
    w = _randn(g, N, K, dtype=torch.bfloat16, scale=K**-0.5)
    b = _randn(g, N, dtype=torch.bfloat16)
    res = _randn(g, M, N, dtype=torch.bfloat16)
    gu = _randn(g, M, 2 * K, dtype=torch.bfloat16, scale=2.0)
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(td.norm_linear(x, nw, EPS, w, b), F.linear(rms_norm(x, nw, EPS), w, b))
    assert torch.equal(td.linear_residual(x, w, res), res + F.linear(x, w))
    assert torch.equal(td.swiglu_linear_residual(gu, w, res), res + F.linear(F.silu(gate) * up, w))


# --------------------------------------------------------------------------------------- attention


def _paged_inputs(device, dtype, H, Hkv, D, BS, ctx_lens, seed):
    """Random caches, per-sequence block tables (shuffled, padded), the new tokens' slots at ctx - 1,
    strided ctx (a column, as in the CUDA graphs' input buffer) and cos/sin at those positions."""
    g = _gen(device, seed)
    B = len(ctx_lens)
    nb = max(-(-c // BS) for c in ctx_lens) + 1  # one padding column
    NB = B * nb + 2
    kc = _randn(g, NB, BS, Hkv, D, dtype=dtype)
    vc = _randn(g, NB, BS, Hkv, D, dtype=dtype)
    tables = torch.randperm(NB, generator=g, device=device)[: B * nb].view(B, nb)
    inp = torch.zeros(B, 4, dtype=torch.long, device=device)
    inp[:, 3] = torch.tensor(ctx_lens, device=device)
    ctx = inp[:, 3]
    pos = ctx - 1
    slots = tables.gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS
    cos, sin = rope_cos_sin(pos[:, None], D, 10000.0, dtype)
    qkv = _randn(g, B, (H + 2 * Hkv) * D, dtype=dtype)
    return qkv, cos[:, 0], sin[:, 0], kc, vc, slots, tables, ctx


def _reference_attention(qkv, cos, sin, kc, vc, slots, tables, ctx, H, Hkv, D):
    """fused_model's path: rope, index_copy_ into the caches, gather + masked SDPA (in place on kc/vc)."""
    B, BS = qkv.shape[0], kc.shape[1]
    qk = rope(qkv[:, : (H + Hkv) * D].view(B, H + Hkv, D), cos, sin)
    kc.view(-1, Hkv, D).index_copy_(0, slots, qk[:, H:])
    vc.view(-1, Hkv, D).index_copy_(0, slots, qkv[:, (H + Hkv) * D :].reshape(B, Hkv, D))
    keep = torch.arange(tables.shape[1] * BS, device=qkv.device)[None] < ctx[:, None]
    return decode_attention(qk[:, :H].contiguous(), kc, vc, tables, additive_mask(keep, qkv.dtype), H // Hkv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_decode_attention_matches_rope_write_gather_sdpa(device, dtype, H, Hkv):
    D, BS = 32, 16
    # the new token alone; one full block; one past a block edge; several blocks (past one 64-token
    # tile when MHA), the last partly filled
    ctx_lens = [1, 16, 17, 70]
    qkv, cos, sin, kc, vc, slots, tables, ctx = _paged_inputs(
        device, dtype, H, Hkv, D, BS, ctx_lens, H * 10 + Hkv
    )
    kc_ref, vc_ref, kc0 = kc.clone(), vc.clone(), kc.clone()
    want = _reference_attention(qkv, cos, sin, kc_ref, vc_ref, slots, tables, ctx, H, Hkv, D)
    got = td.decode_attention(qkv, cos, sin, kc, vc, slots, tables, ctx)
    _assert_close(got, want)
    # the new roped k and v are at ``slots`` (as fused_model's writes put them), nothing else changed
    written = torch.zeros(kc.shape[0] * BS, dtype=torch.bool, device=device)
    written[slots] = True
    flat = lambda t: t.view(-1, Hkv, D)  # noqa: E731
    _assert_close(flat(kc)[slots], flat(kc_ref)[slots])
    assert torch.equal(flat(vc)[slots], flat(vc_ref)[slots])
    assert not torch.equal(flat(kc)[slots], flat(kc0)[slots])
    assert torch.equal(flat(kc)[~written], flat(kc_ref)[~written])
    assert torch.equal(flat(vc)[~written], flat(vc_ref)[~written])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_takes_2d_cos_sin_and_an_out_buffer(device):
    H = Hkv = 2
    D, BS = 16, 4
    qkv, cos, sin, kc, vc, slots, tables, ctx = _paged_inputs(device, torch.float32, H, Hkv, D, BS, [9, 3], 5)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = _reference_attention(qkv, cos, sin, kc_ref, vc_ref, slots, tables, ctx, H, Hkv, D)
    out = torch.full((2, H, D), float("nan"), device=device)
    got = td.decode_attention(qkv, cos[:, 0], sin[:, 0], kc, vc, slots, tables, ctx, out=out)
    assert got is out
    _assert_close(out, want)


# ------------------------------------------------------------------------------------------ layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("impl", ["triton", "paged"])
def test_layer_matches_make_decode_layer(device, dtype, H, Hkv, B, impl):
    """The fused Triton block, and the engine's own paged block (RoPE + KV write and attention as
    Triton kernels between torch parts), against the gather + SDPA block."""
    if impl == "paged" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip(
            "the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): RoPE'd q/k differ by an ulp"
        )
    D, BS, ff = 16, 16, 96
    d = H * D
    ctx_lens = [33, 1, 16][:B]
    qkv, cos, sin, kc, vc, slots, tables, ctx = _paged_inputs(
        device, dtype, H, Hkv, D, BS, ctx_lens, B * 7 + Hkv
    )
    g = _gen(device, 99)
    nqkv = (H + 2 * Hkv) * D
    w = (
        (torch.rand(d, generator=g, device=device) + 0.5).to(dtype),
        _randn(g, nqkv, d, dtype=dtype, scale=d**-0.5),
        _randn(g, nqkv, dtype=dtype),
        _randn(g, d, d, dtype=dtype, scale=d**-0.5),
        (torch.rand(d, generator=g, device=device) + 0.5).to(dtype),
        _randn(g, 2 * ff, d, dtype=dtype, scale=d**-0.5),
        _randn(g, d, ff, dtype=dtype, scale=ff**-0.5),
    )
    x = _randn(g, B, d, dtype=dtype)
    x0 = x.clone()
    keep = torch.arange(tables.shape[1] * BS, device=device)[None] < ctx[:, None]
    mask = additive_mask(keep, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = make_decode_layer(H, Hkv, D, EPS, compile=False, paged=False)(
        x, cos, sin, w, kc_ref, vc_ref, slots, tables, mask, ctx
    )
    layer = (
        td.make_triton_decode_layer(H, Hkv, D, EPS)
        if impl == "triton"
        else make_decode_layer(H, Hkv, D, EPS, compile=False, paged=True)
    )
    got = layer(x, cos, sin, w, kc, vc, slots, tables, mask, ctx)
    assert torch.equal(x, x0)  # the input is not written
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # three GEMMs and a softmax deep
    else:  # bf16 flips compound through the block: a few ulps of the output's scale
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2e-2)
    flat = lambda t: t.view(-1, Hkv, D)  # noqa: E731
    _assert_close(flat(kc)[slots], flat(kc_ref)[slots])
    _assert_close(flat(vc)[slots], flat(vc_ref)[slots])


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_one_line_errors():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="does not match the weight"):
        td.norm_linear(x, torch.ones(8), EPS, torch.zeros(4, 16))
    with pytest.raises(ValueError, match="x is torch.float32 but the weight is torch.bfloat16"):
        td.linear_residual(x, torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="res must be"):
        td.linear_residual(x, torch.zeros(4, 8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="does not match the weight"):
        td.swiglu_linear_residual(x, torch.zeros(4, 8), torch.zeros(2, 4))  # gate|up needs 16 columns
    kc = torch.zeros(3, 4, 2, 16)
    ix = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="is not \\(B, \\(H \\+ 2 \\* 2\\) \\* 16\\)"):
        td.decode_attention(
            torch.zeros(2, 40), torch.zeros(2, 16), torch.zeros(2, 16), kc, kc, ix, ix[:, None], ix
        )
    with pytest.raises(ValueError, match="cos/sin must be"):
        td.decode_attention(
            torch.zeros(2, 96), torch.zeros(2, 8), torch.zeros(2, 8), kc, kc, ix, ix[:, None], ix
        )
    with pytest.raises(ValueError, match="not a multiple"):
        td.make_triton_decode_layer(6, 4, 16, EPS)


def test_available_needs_cuda_and_a_power_of_two_head_dim():
    assert not td.available(torch.device("cpu"), 64)
    if torch.cuda.is_available():
        assert td.available(torch.device("cuda"), 64) and not td.available(torch.device("cuda"), 80)


def test_linear_config_covers_the_sms_and_the_rows():
    # the base model's GEMMs at decode batch sizes
    for M in (1, 8, 16, 17, 33, 64):
        for N, K in ((2304, 768), (768, 768), (4096, 768), (768, 2048), (32000, 768)):
            c = td.linear_config(M, N, K)
            assert c.block_m >= min(M, 64) and c.block_m in (16, 32, 64)
            assert c.block_n >= 16 and (N // c.block_n >= td._SMS or c.block_n == 16)
            assert c.block_k >= 16 and K % c.block_k == 0
    assert td.linear_config(1, 32000, 768).block_n == 128
    assert td.linear_config(1, 768, 768).block_n == 16
