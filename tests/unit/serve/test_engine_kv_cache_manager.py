import pytest
import torch

from serve.engine.kv_cache_manager import KVCacheManager
from serve.engine.request import Sequence
from serve.engine.sampling_params import SamplingParams


def manager(num_blocks=8, caching=True) -> KVCacheManager:
    return KVCacheManager(
        num_blocks=num_blocks,
        block_size=4,
        n_layers=2,
        n_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
        model_id="m",
        enable_prefix_caching=caching,
    )


def run_prefill(kv: KVCacheManager, seq: Sequence) -> None:
    cached = kv.find_cached_prefix(seq)
    assert kv.allocate(seq, seq.num_tokens - len(cached) * kv.block_size, cached_blocks=cached)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit(seq)


def seq(rid, toks, salt=None) -> Sequence:
    return Sequence(rid, list(toks), SamplingParams(), salt=salt)


def test_prefix_hit_counters_and_last_token_recomputed():
    kv = manager()
    a = seq("a", range(10))  # 2 full blocks + 2 tokens
    run_prefill(kv, a)
    assert (kv.prefix_queries, kv.prefix_hits) == (10, 0)
    b = seq("b", list(range(8)) + [99, 98, 97])
    run_prefill(kv, b)
    assert (kv.prefix_queries, kv.prefix_hits) == (21, 8)
    assert kv.block_tables["b"][:2] == kv.block_tables["a"][:2]
    c = seq("c", range(8))  # fully cached: the last block is recomputed so that logits exist
    assert len(kv.find_cached_prefix(c)) == 1


def test_salt_isolates_tenants():
    kv = manager()
    run_prefill(kv, seq("a", range(12), salt="t1"))
    assert kv.find_cached_prefix(seq("b", range(12), salt="t2")) == []
    assert kv.find_cached_prefix(seq("c", range(12))) == []
    assert len(kv.find_cached_prefix(seq("d", range(12), salt="t1"))) == 2


def test_allocate_fails_cleanly_when_short_and_free_releases():
    kv = manager(num_blocks=4)
    a = seq("a", range(12))
    assert kv.allocate(a, 12, cached_blocks=[])
    b = seq("b", range(100, 108))
    assert not kv.allocate(b, 8, cached_blocks=[])
    assert "b" not in kv.block_tables and kv.pool.num_free == 1
    kv.free(a)
    assert kv.pool.num_free == 4


def test_export_import_roundtrip_between_managers():
    src, dst = manager(), manager()
    a = seq("a", range(12))
    run_prefill(src, a)
    for layer in src.kv:  # give the blocks recognisable content
        layer.normal_()
    k, v = src.export_blocks(a.block_hashes + [b"\x00" * 32])
    assert k.shape == (2, 3, 4, 2, 8)
    assert dst.import_blocks(a.block_hashes, k, v) == 3
    assert dst.import_blocks(a.block_hashes, k, v) == 0  # already there
    b = seq("b", list(range(12)) + [5])
    hit = dst.find_cached_prefix(b)
    assert len(hit) == 3
    k2, v2 = dst.export_blocks(a.block_hashes)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="expected"):
        dst.import_blocks(a.block_hashes, k[:, :2], v)
