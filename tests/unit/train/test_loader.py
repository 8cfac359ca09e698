"""Packed batches: window alignment, determinism, exact resume, disjoint rank shards."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.errors import RetortError
from train.data.loader import num_windows, packed_batches, steps_per_epoch

SEQ, B = 8, 4


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    # Distinct values so a window identifies itself; 1000 tokens -> 124 windows of 8(+1).
    return (np.arange(1000, dtype=np.int64) * 7919 % 65521).astype(np.uint16)


def take(tokens: np.ndarray, n: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kw.setdefault("seed", 0)
    return list(islice(packed_batches(tokens, SEQ, B, **kw), n))


def test_num_windows() -> None:
    assert num_windows(1000, SEQ) == 124
    assert num_windows(SEQ + 1, SEQ) == 1 and num_windows(SEQ, SEQ) == 0 and num_windows(0, SEQ) == 0
    assert num_windows(2 * SEQ + 1, SEQ) == 2
    assert steps_per_epoch(1000, SEQ, B) == 31 and steps_per_epoch(1000, SEQ, B, world_size=3) == 10


def test_windows_are_aligned(tokens: np.ndarray) -> None:
    for idx, x in take(tokens, 40):  # > 1 epoch
        assert idx.dtype == torch.int64 and x.dtype == torch.int64
        assert idx.shape == (B,) and x.shape == (B, SEQ + 1)
        for w, row in zip(idx.tolist(), x, strict=True):
            assert 0 <= w < num_windows(len(tokens), SEQ)
            assert row.tolist() == tokens[w * SEQ : w * SEQ + SEQ + 1].tolist()


def test_epoch_visits_every_window_once(tokens: np.ndarray) -> None:
    per_epoch = steps_per_epoch(len(tokens), SEQ, B)
    batches = take(tokens, 2 * per_epoch)
    e0 = torch.cat([i for i, _ in batches[:per_epoch]]).tolist()
    e1 = torch.cat([i for i, _ in batches[per_epoch:]]).tolist()
    assert len(set(e0)) == len(e0) == per_epoch * B  # 124 windows, all in 31 batches
    assert sorted(e0) == list(range(124)) and sorted(e1) == sorted(e0)
    assert e0 != e1  # each epoch has its own order
    assert e0 != sorted(e0)  # shuffled, not sequential


def test_deterministic_by_seed(tokens: np.ndarray) -> None:
    a, b, c = take(tokens, 10, seed=1), take(tokens, 10, seed=1), take(tokens, 10, seed=2)
    assert all(torch.equal(x1, x2) and torch.equal(i1, i2) for (i1, x1), (i2, x2) in zip(a, b, strict=True))
    assert not all(torch.equal(i1, i3) for (i1, _), (i3, _) in zip(a, c, strict=True))


@pytest.mark.parametrize("start", [1, 7, 31, 45])
def test_resume_is_exact(tokens: np.ndarray, start: int) -> None:
    full = take(tokens, 70)
    resumed = take(tokens, 70 - start, start_step=start)
    for (i1, x1), (i2, x2) in zip(full[start:], resumed, strict=True):
        assert torch.equal(i1, i2) and torch.equal(x1, x2)
    assert len(list(packed_batches(tokens, SEQ, B, seed=0, start_step=start, max_steps=5))) == 5


def test_ranks_get_disjoint_windows(tokens: np.ndarray) -> None:
    world = 3
    per_epoch = steps_per_epoch(len(tokens), SEQ, B, world)
    seen = [
        torch.cat([i for i, _ in take(tokens, per_epoch, rank=r, world_size=world)]).tolist()
        for r in range(world)
    ]
    sets = [set(s) for s in seen]
    assert all(len(s) == per_epoch * B for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # Rank r resumed mid-way equals its own uninterrupted stream.
    full = take(tokens, 25, rank=2, world_size=world)
    part = take(tokens, 5, rank=2, world_size=world, start_step=20)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[20:], part, strict=True))


def test_reads_a_memmap(tmp_path: Path, tokens: np.ndarray) -> None:
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    for (i1, x1), (i2, x2) in zip(take(mm, 5), take(tokens, 5), strict=True):
        assert torch.equal(i1, i2) and torch.equal(x1, x2)


def test_bad_arguments(tokens: np.ndarray) -> None:
    with pytest.raises(RetortError, match="too few"):
        next(packed_batches(tokens[:30], SEQ, B, seed=0))
    with pytest.raises(RetortError, match="too few"):
        next(packed_batches(tokens, SEQ, 64, seed=0, world_size=2))
    with pytest.raises(RetortError, match="bad loader arguments"):
        next(packed_batches(tokens, SEQ, B, seed=0, rank=2, world_size=2))
    with pytest.raises(RetortError, match="1-D"):
        next(packed_batches(tokens.reshape(10, 100), SEQ, B, seed=0))
    with pytest.raises(RetortError, match="seq_len"):
        num_windows(100, 0)
