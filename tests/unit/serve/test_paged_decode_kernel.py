"""The Triton paged decode-attention kernel against gather + masked SDPA.

Runs on CUDA (marked ``gpu``), or on CPU under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
(``PYTHONPATH=<triton> TRITON_INTERPRET=1 pytest tests/unit/serve/test_paged_decode_kernel.py``);
without Triton the module is skipped.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine_helpers import TRITON_DEVICES  # noqa: E402

from serve.engine.cuda_graphs import additive_mask  # noqa: E402
from serve.engine.fused_model import decode_attention  # noqa: E402
from serve.engine.paged_attention import paged_decode_attention  # noqa: E402

DEVICES = TRITON_DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [None, 1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D,BS", [(12, 12, 64, 16), (8, 2, 32, 16), (4, 1, 64, 8)])
def test_paged_decode_kernel_matches_gather_sdpa(device, dtype, H, Hkv, D, BS, splits):
    """Contexts of 1 token, block edges and the whole table; keys split over up to 8 programs (with
    empty splits for the short contexts), strided q and context-length views as the graphs pass."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest)")
    g = torch.Generator(device=device).manual_seed(H * D)
    B, NB, nb = 7, 300, 40
    q = torch.randn(B, H + Hkv, D, device=device, generator=g).to(dtype)[
        :, :H
    ]  # a strided view, as in the engine
    kc = torch.randn(NB + 1, BS, Hkv, D, device=device, generator=g).to(dtype)
    vc = torch.randn(NB + 1, BS, Hkv, D, device=device, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(NB, device=device, generator=g)[:nb] for _ in range(B)])
    ctx = torch.tensor([[c] * 3 for c in (1, BS, BS + 1, 63, 64, 65, nb * BS)], device=device)[
        :, 1
    ]  # strided
    mask = additive_mask(torch.arange(nb * BS, device=device)[None] < ctx[:, None], torch.float32)
    want = decode_attention(q.float(), kc.float(), vc.float(), tables, mask, H // Hkv)
    got = paged_decode_attention(q, kc, vc, tables, ctx, splits=splits)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_split_count_must_be_a_power_of_two():
    q = torch.zeros(1, 2, 16)
    kc = torch.zeros(2, 16, 2, 16)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(
            q, kc, kc, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), splits=3
        )
