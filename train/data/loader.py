"""Packed training batches: fixed windows over the token stream, shuffled per epoch, sharded per rank.

Window ``w`` is ``tokens[w*seq_len : w*seq_len + seq_len + 1]`` (inputs ``x[:, :-1]``, targets
``x[:, 1:]``; neighbouring windows share one token). Documents run across windows, separated by
eos, as in GPT-style pretraining. ``window_idx`` names a window globally, so anything keyed by it
(the teacher's top-k cache) lines up with every rank's batches.

Order: epoch ``e`` visits ``permutation(seed, e)`` of all windows; rank ``r`` of ``W`` takes
``perm[r::W]`` truncated to the same length on every rank (ranks see disjoint windows and take the
same number of steps), in batches of ``batch_size`` (the last partial batch is dropped). Global
step ``k`` is batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, so ``start_step=k``
resumes exactly where step ``k`` would have been, in O(1).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cluster.errors import RetortError


def num_windows(n_tokens: int, seq_len: int) -> int:
    """How many full windows of ``seq_len + 1`` tokens (stride ``seq_len``) fit in ``n_tokens``."""
    if seq_len < 1:
        raise RetortError(f"seq_len must be >= 1, got {seq_len}")
    return max(0, (n_tokens - 1) // seq_len)


def steps_per_epoch(n_tokens: int, seq_len: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank takes per pass over the windows."""
    return (num_windows(n_tokens, seq_len) // world_size) // batch_size


def epoch_permutation(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def packed_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    max_steps: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(window_idx (B,) int64, x (B, seq_len + 1) int64)`` forever (or ``max_steps`` batches).

    ``tokens`` is a 1-D id array (e.g. ``train.data.load_split(dir, "train")``, a memmap: only
    the windows of a batch are read). Bad arguments raise here, not at the first ``next``.
    """
    if tokens.ndim != 1:
        raise RetortError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
        raise RetortError(
            f"bad loader arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
            f"start_step={start_step}"
        )
    n_win = num_windows(len(tokens), seq_len)
    per_epoch = steps_per_epoch(len(tokens), seq_len, batch_size, world_size)
    if per_epoch == 0:
        raise RetortError(
            f"{len(tokens)} tokens give {n_win} windows of {seq_len}+1: too few for batch_size {batch_size} "
            f"x world_size {world_size} (use more data or a smaller seq_len / batch_size)"
        )
    return _batches(
        tokens, seq_len, batch_size, seed, rank, world_size, start_step, max_steps, n_win, per_epoch
    )


def _batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    start_step: int,
    max_steps: int | None,
    n_win: int,
    per_epoch: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    per_rank = per_epoch * batch_size
    offsets = np.arange(seq_len + 1)  # (T+1,)
    step, epoch, mine = start_step, -1, np.empty(0, dtype=np.int64)
    while max_steps is None or step < start_step + max_steps:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            mine = epoch_permutation(n_win, seed, epoch)[rank::world_size][:per_rank]  # (per_rank,)
        b = step % per_epoch
        win = mine[b * batch_size : (b + 1) * batch_size]  # (B,)
        rows = win[:, None] * seq_len + offsets  # (B, T+1)
        x = torch.from_numpy(np.asarray(tokens[rows], dtype=np.int64))  # (B, T+1)
        yield torch.from_numpy(win.astype(np.int64)), x
        step += 1
