"""Sliding-window perplexity against direct cross-entropy on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluster.config.model import preset
from cluster.errors import RetortError
from cluster.model import Transformer
from train.evaluate import nll_sum, perplexity, retention, windows


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=97)).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 97, size=203).astype(np.uint16)


def direct_nll(model: nn.Module, tokens: np.ndarray, begin: int, end: int, first: int) -> tuple[float, int]:
    """One window by hand: inputs tokens[begin:end], count targets with index >= first."""
    x = torch.from_numpy(tokens[begin:end].astype(np.int64))[None]
    with torch.no_grad():
        logp = F.log_softmax(model(x)[0].float(), -1)  # (L, V)
    total, count = 0.0, 0
    for i in range(end - begin):
        j = begin + 1 + i  # target index
        if j >= first:
            total -= logp[i, int(tokens[j])].item()
            count += 1
    return total, count


class Uniform(nn.Module):
    """Every next token equally likely: perplexity is exactly the vocab size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, self.vocab) + self.dummy


def test_uniform_model_has_vocab_size_perplexity(tokens):
    assert perplexity(Uniform(97), tokens, seq_len=16, stride=8, batch_size=3) == pytest.approx(
        97.0, rel=1e-5
    )
    # padded rows sliced away: 128 logits, 97 real
    assert perplexity(Uniform(128), tokens, 16, 16, 4, vocab_size=97) == pytest.approx(97.0, rel=1e-5)


def test_windows_score_every_token_exactly_once():
    for n, L, s in [(203, 16, 16), (203, 16, 5), (17, 16, 1), (10, 32, 8), (2, 4, 4), (50, 7, 3)]:
        seen = []
        for b, e, first in windows(n, L, s):
            assert e - b <= L
            seen += [j for j in range(b + 1, e + 1) if j >= first]
        assert seen == list(range(1, n)), (n, L, s)


def test_non_overlapping_equals_direct_cross_entropy(model, tokens):
    L = 20
    total, count = 0.0, 0
    for b in range(0, len(tokens) - 1, L):
        t, c = direct_nll(model, tokens, b, min(b + L, len(tokens) - 1), b + 1)
        total, count = total + t, count + c
    assert count == len(tokens) - 1
    assert perplexity(model, tokens, L, L, batch_size=4) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_equals_hand_loop(model, tokens):
    L, S = 24, 10
    total, count = 0.0, 0
    for b, e, first in windows(len(tokens), L, S):
        t, c = direct_nll(model, tokens, b, e, first)
        total, count = total + t, count + c
    got_total, got_count = nll_sum(model, tokens, L, S, batch_size=5)
    assert got_count == count == len(tokens) - 1
    assert got_total == pytest.approx(total, rel=1e-5)


def test_context_covering_everything_is_one_forward_pass(model, tokens):
    short = tokens[:60]
    t, c = direct_nll(model, short, 0, len(short) - 1, 1)
    assert perplexity(model, short, seq_len=128, stride=64, batch_size=2) == pytest.approx(
        math.exp(t / c), rel=1e-5
    )


def test_batch_size_and_max_tokens(model, tokens):
    a = perplexity(model, tokens, 16, 4, batch_size=1)
    b = perplexity(model, tokens, 16, 4, batch_size=7)
    assert a == pytest.approx(b, rel=1e-5)
    assert perplexity(model, tokens, 16, 16, 4, max_tokens=50) == pytest.approx(
        perplexity(model, tokens[:50], 16, 16, 4), rel=1e-6
    )
    assert model.training is False


def test_bad_arguments(model, tokens):
    with pytest.raises(RetortError, match="stride"):
        perplexity(model, tokens, 16, 32, 2)
    with pytest.raises(RetortError, match="stride"):
        perplexity(model, tokens, 16, 0, 2)
    with pytest.raises(RetortError, match="at least 2 tokens"):
        perplexity(model, tokens[:1], 16, 16, 2)
    with pytest.raises(RetortError, match="batch_size"):
        perplexity(model, tokens, 16, 16, 0)


def test_retention():
    assert retention(10.0, 12.5) == pytest.approx(0.8)
    with pytest.raises(RetortError):
        retention(10.0, 0.0)
