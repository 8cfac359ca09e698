"""The teacher top-k cache: alignment with packed_batches, shards, verification, and use in kd_loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.config.losses import KDLossConfig
from cluster.config.model import preset
from cluster.errors import RetortError
from cluster.model import Transformer
from train.data.loader import num_windows, packed_batches
from train.distill.losses import DenseTeacher, TopKTeacher, kd_loss
from train.topk import BYTES_PER_ENTRY, MANIFEST, TopKCache, build_topk_cache, weights_sha256

V, L = 61, 16


@pytest.fixture(scope="module")
def teacher() -> Transformer:
    return Transformer(preset("tiny", vocab_size=64)).init_weights(seed=1).eval()  # 3 padded rows


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, V, size=13 * L + 5).astype(np.uint16)  # 13 windows


def build(teacher, tokens, out, k=5, **kw):
    args = dict(vocab_size=V, teacher="teacher:1", teacher_sha256="a" * 64, data_fingerprint="d" * 64,
                shard_windows=5, progress=False)  # fmt: skip
    args.update(kw)
    return build_topk_cache(teacher, tokens, L, k, out, batch_size=3, **args)


def reference(teacher, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        lp = F.log_softmax(teacher(x)[..., :V].float(), -1)  # (B, L, V)
    vals, ids = lp.topk(k, -1)
    return ids, vals


def test_lookup_matches_the_teacher_on_packed_batches(teacher, tokens, tmp_path):
    info = build(teacher, tokens, tmp_path / "c")
    assert info.n_windows == num_windows(len(tokens), L) == 13
    cache = TopKCache(tmp_path / "c")
    assert len(cache.manifest["shards"]) == 3  # 5 + 5 + 3 windows
    for widx, x in packed_batches(tokens, L, 4, seed=3, max_steps=3):
        ids, lps = cache.lookup(widx)
        assert ids.dtype == torch.int32 and lps.dtype == torch.float16 and ids.shape == (4, L, 5)
        want_ids, want_lp = reference(teacher, x[:, :-1], 5)
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(lps.float(), want_lp, atol=1e-2, rtol=1e-3)
    # arbitrary order, repeats, across shards
    idx = torch.tensor([12, 0, 7, 7, 4])
    ids, _ = cache.lookup(idx)
    x = torch.from_numpy(np.stack([tokens[w * L : w * L + L] for w in idx.tolist()]).astype(np.int64))
    assert torch.equal(ids.long(), reference(teacher, x, 5)[0])


def test_bytes_per_token(teacher, tokens, tmp_path):
    info = build(teacher, tokens, tmp_path / "c", k=32)
    assert info.tokens == 13 * L
    tensor_bytes = 13 * L * 32 * BYTES_PER_ENTRY
    assert tensor_bytes / info.tokens == 192  # int32 id + fp16 logprob, k = 32
    assert tensor_bytes <= info.bytes < tensor_bytes + 8192  # headers + manifest on top
    assert TopKCache(tmp_path / "c").bytes_per_token == 192


def test_full_vocab_cache_reproduces_the_dense_loss(teacher, tokens, tmp_path):
    build(teacher, tokens, tmp_path / "c", k=V)
    cache = TopKCache(tmp_path / "c")
    widx, x = next(packed_batches(tokens, L, 4, seed=0))
    ids, lps = cache.lookup(widx)
    student = torch.randn(4, L, V)
    cfg = KDLossConfig(kind="fkl", temperature=2.0, alpha=0.5)
    with torch.no_grad():
        t_logits = teacher(x[:, :-1])
    dense = kd_loss(student, DenseTeacher(t_logits), x[:, 1:], cfg, vocab_size=V)
    cached = kd_loss(student, TopKTeacher(ids, lps), x[:, 1:], cfg, vocab_size=V)
    assert cached["kd"].item() == pytest.approx(dense["kd"].item(), abs=2e-3)


def test_missing_and_corrupt_shards_are_clear_errors(teacher, tokens, tmp_path):
    build(teacher, tokens, tmp_path / "c")
    shard = tmp_path / "c" / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(RetortError, match="shard 1 is corrupt .sha256"):
        TopKCache(tmp_path / "c")
    TopKCache(tmp_path / "c", verify=False)  # same size: only the sha256 notices
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(RetortError, match="shard 1 is corrupt .size"):
        TopKCache(tmp_path / "c", verify=False)
    shard.unlink()
    with pytest.raises(RetortError, match="shard 1 is missing"):
        TopKCache(tmp_path / "c")
    (tmp_path / "c" / MANIFEST).write_text("{not json")
    with pytest.raises(RetortError, match="corrupt manifest"):
        TopKCache(tmp_path / "c")
    with pytest.raises(RetortError, match="not a top-k cache"):
        TopKCache(tmp_path / "nothing")


def test_fingerprint_reuse_and_mismatch(teacher, tokens, tmp_path):
    first = build(teacher, tokens, tmp_path / "c")
    again = build(teacher, tokens, tmp_path / "c")
    assert again.reused and again.fingerprint == first.fingerprint
    with pytest.raises(RetortError, match="another fingerprint"):
        build(teacher, tokens, tmp_path / "c", k=6)
    cache = TopKCache(tmp_path / "c")
    cache.check(data_fingerprint="d" * 64, seq_len=L, teacher_sha256="a" * 64)
    with pytest.raises(RetortError, match="built for data"):
        cache.check(data_fingerprint="e" * 64)
    with pytest.raises(RetortError, match="seq_len"):
        cache.check(seq_len=L * 2)
    with pytest.raises(RetortError, match="not by this job's teacher"):
        cache.check(teacher_sha256="b" * 64)
    assert not list(tmp_path.glob(".c.partial*"))  # no leftovers


def test_max_windows_and_token_limit(teacher, tokens, tmp_path):
    info = build(teacher, tokens, tmp_path / "c", max_windows=6)
    cache = TopKCache(tmp_path / "c")
    assert info.n_windows == cache.n_windows == 6
    limited = tokens[: cache.token_limit]
    seen = set()
    for widx, _ in packed_batches(limited, L, 2, seed=0, max_steps=9):  # 3 epochs
        cache.lookup(widx)
        seen.update(widx.tolist())
    assert seen == set(range(6))
    with pytest.raises(RetortError, match="window 6 is not in the top-k cache"):
        cache.lookup(torch.tensor([1, 6]))


def test_bad_arguments(teacher, tokens, tmp_path):
    with pytest.raises(RetortError, match="k=0"):
        build(teacher, tokens, tmp_path / "c", k=0)
    with pytest.raises(RetortError, match="no window"):
        build(teacher, tokens[:L], tmp_path / "c")


def test_weights_sha256(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "m")
    a = weights_sha256(tmp_path / "m")
    assert a == weights_sha256(tmp_path / "m") and len(a) == 64
    with pytest.raises(RetortError, match="no .*safetensors"):
        weights_sha256(tmp_path)
    manifest = json.loads((tmp_path / "m" / "config.json").read_text())
    assert manifest["vocab_size"] == 64


def test_bf16_cache_is_close_to_fp32_and_fingerprinted_apart(teacher, tokens, tmp_path):
    fp32 = build(teacher, tokens, tmp_path / "fp32")
    bf16 = build(teacher, tokens, tmp_path / "bf16", bf16=True)
    assert bf16.fingerprint != fp32.fingerprint  # a cache of another precision is never reused as this one
    assert TopKCache(tmp_path / "bf16").manifest["compute"] == "bf16"
    assert TopKCache(tmp_path / "fp32").manifest["compute"] == "fp32"
    with pytest.raises(RetortError, match="another fingerprint"):
        build(teacher, tokens, tmp_path / "fp32", bf16=True)
    a, b = TopKCache(tmp_path / "fp32"), TopKCache(tmp_path / "bf16")
    idx = torch.arange(a.n_windows)
    (ids32, lp32), (ids16, lp16) = a.lookup(idx), b.lookup(idx)
    assert not torch.equal(lp16, lp32)  # the forward really ran in bf16
    assert (ids32[..., 0] == ids16[..., 0]).float().mean() > 0.9  # the top-1 token mostly agrees
    torch.testing.assert_close(lp16[..., 0].float(), lp32[..., 0].float(), atol=0.1, rtol=0.05)
