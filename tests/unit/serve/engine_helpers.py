"""Tiny random Llama for engine tests, and a plain full-recompute greedy reference."""

from __future__ import annotations

import os
import random

import pytest
import torch

from cluster.config.model import preset
from cluster.model import Transformer

# Triton kernel tests run on CUDA (marked gpu), or on CPU under Triton's interpreter (TRITON_INTERPRET=1)
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICES = [
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available() or TRITON_INTERPRETED, reason="needs CUDA"),
        ],
    ),
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="CPU runs need TRITON_INTERPRET=1")
    ),
]

# larger init than training's 0.02 so that greedy choices are not near-ties (robust parity checks)
TINY = dict(init_std=0.15, max_seq_len=256)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return Transformer(preset("tiny", **{**TINY, **overrides})).init_weights(seed).eval()


def reference_greedy(
    model: Transformer, prompt: list[int], n: int, stop: set[int] = frozenset()
) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every token (no KV cache)."""
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([toks]))[0, -1].argmax())
            toks.append(t)
            if t in stop:
                break
    return toks[len(prompt) :]


def random_prompts(n: int, lo: int, hi: int, seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]
