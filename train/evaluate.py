"""Held-out perplexity at a stated context length, and retention (teacher ppl / student ppl).

Sliding-window perplexity (the Hugging Face "perplexity of fixed-length models" recipe, with
its off-by-one fixed so that every token counts exactly once): the token stream is read in
windows of ``seq_len`` predictions that start every ``stride`` tokens. Window ``w`` feeds
``tokens[b : e]`` and predicts ``tokens[b+1 : e+1]`` (``b = w * stride``, ``e = min(b + seq_len,
n - 1)``), but only targets not scored by an earlier window count. So:

- every token after the first is scored exactly once (``n - 1`` targets);
- every scored token after the first window sees at least ``seq_len - stride`` tokens of
  context; ``stride == seq_len`` is plain non-overlapping chunks (the training windows), the
  cheapest and most pessimistic; smaller strides cost ``seq_len / stride`` times more compute.

``ppl = exp(sum of target NLL / number of targets)``, computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster.errors import RetortError

IGNORE_INDEX = -100


def windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(begin, end, first_target)`` over ``n`` tokens: inputs ``[begin, end)``, targets
    ``[begin+1, end]``, of which those ``>= first_target`` count (each target exactly once)."""
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise RetortError(f"perplexity needs 1 <= stride <= seq_len (got stride={stride}, seq_len={seq_len})")
    if n < 2:
        raise RetortError(f"perplexity needs at least 2 tokens (got {n})")
    begin, scored = 0, 0  # scored: the last target index already counted
    while True:
        end = min(begin + seq_len, n - 1)
        yield begin, end, scored + 1
        scored = end
        if end == n - 1:
            return
        begin += stride


def _batch(
    tokens: Sequence[int] | np.ndarray, wins: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows -> inputs ``(B, L)`` and targets ``(B, L)`` (uncounted / padding = -100)."""
    L = max(e - b for b, e, _ in wins)
    x = torch.zeros(len(wins), L, dtype=torch.long)
    y = torch.full((len(wins), L), IGNORE_INDEX, dtype=torch.long)
    for i, (b, e, first) in enumerate(wins):
        chunk = torch.from_numpy(np.asarray(tokens[b : e + 1], dtype=np.int64))  # (e - b + 1,)
        x[i, : e - b] = chunk[:-1]
        tgt = chunk[1:].clone()
        tgt[: first - (b + 1)] = IGNORE_INDEX  # already scored by an earlier window
        y[i, : e - b] = tgt
    return x, y


@torch.inference_mode()
def nll_sum(
    model: nn.Module,
    tokens: Sequence[int] | np.ndarray,
    seq_len: int,
    stride: int,
    batch_size: int,
    max_tokens: int | None = None,
    vocab_size: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Summed target NLL (nats) and the number of targets; see the module docstring."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if batch_size < 1:
        raise RetortError(f"batch_size must be >= 1 (got {batch_size})")
    all_wins = list(windows(n, seq_len, stride))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n - 1, desc="eval ppl", unit="tok", leave=False)
    try:
        for i in range(0, len(all_wins), batch_size):
            x, y = _batch(tokens, all_wins[i : i + batch_size])
            out = model(x.to(device))
            logits = out[0] if isinstance(out, tuple) else out  # (B, L, V)
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            y = y.to(device)
            total += F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            scored = int((y != IGNORE_INDEX).sum())
            count += scored
            if bar is not None:
                bar.update(scored)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return total, count


def perplexity(
    model: nn.Module,
    tokens: Sequence[int] | np.ndarray,
    seq_len: int,
    stride: int,
    batch_size: int,
    max_tokens: int | None = None,
    *,
    vocab_size: int | None = None,
    progress: bool = False,
) -> float:
    """Held-out perplexity of ``model`` on a 1-D token stream (list, array or memmap).

    Args:
        model: ``forward(tokens (B, L)) -> logits (B, L, V)`` (or a tuple whose first item is).
        tokens: the held-out token ids, documents separated by eos (as ``load_split`` gives).
        seq_len: predictions per window (the context length the number is stated at).
        stride: tokens between window starts, ``1..seq_len``; each token is scored once.
        batch_size: windows per forward pass.
        max_tokens: read only the first ``max_tokens`` tokens.
        vocab_size: slice padded logit rows off before the softmax (the tokenizer's real size).
    """
    total, count = nll_sum(model, tokens, seq_len, stride, batch_size, max_tokens, vocab_size, progress)
    return math.exp(total / count)


def retention(teacher_ppl: float, student_ppl: float) -> float:
    """``teacher_ppl / student_ppl``: 1.0 = the student is as good as its teacher, lower is worse."""
    if not (teacher_ppl > 0 and student_ppl > 0):
        raise RetortError(f"perplexities must be positive (teacher {teacher_ppl}, student {student_ppl})")
    return teacher_ppl / student_ppl
