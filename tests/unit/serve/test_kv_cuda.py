"""The store's record codec on a CUDA engine: decoded and verified on the GPU (``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from serve.kv.store import BadBlock, BlockLayout, decode_blocks, encode_blocks, payload_checksums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYOUT = BlockLayout(4, 16, 2, 64, torch.bfloat16)


def test_checksums_equal_on_cpu_and_cuda():
    raw = torch.randint(0, 256, (8, LAYOUT.payload_bytes), dtype=torch.uint8)
    assert torch.equal(payload_checksums(raw), payload_checksums(raw.cuda()).cpu())


def test_decode_onto_cuda_round_trips_and_refuses_damage():
    n = 5
    k = torch.randn(LAYOUT.n_layers, n, 16, 2, 64).bfloat16()
    v = torch.randn_like(k)
    ks = [bytes([i]) * 48 for i in range(n)]
    recs = encode_blocks(LAYOUT, ks, k, v)
    k2, v2 = decode_blocks(LAYOUT, ks, recs, device="cuda")
    assert k2.is_cuda and torch.equal(k2.cpu(), k) and torch.equal(v2.cpu(), v)
    bad = recs[3][:-1] + bytes([recs[3][-1] ^ 1])
    with pytest.raises(BadBlock, match="record 3 of 5"):
        decode_blocks(LAYOUT, ks, recs[:3] + [bad] + recs[4:], device="cuda")
