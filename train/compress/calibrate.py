"""Calibration data: token windows from the train split, and the inputs each linear layer sees."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from cluster.errors import RetortError


def calibration_batches(
    tokens: np.ndarray, n_tokens: int, seq_len: int, seed: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """Random non-overlapping windows of ``seq_len`` tokens, ``n_tokens`` in all -> list of (B, seq_len)."""
    n_windows = len(tokens) // seq_len
    want = max(1, n_tokens // seq_len)
    if n_windows < 1:
        raise RetortError(f"calibration needs at least {seq_len} tokens, the split has {len(tokens)}")
    gen = np.random.default_rng(seed)
    idx = np.sort(gen.choice(n_windows, size=min(want, n_windows), replace=False))
    rows = np.stack([np.asarray(tokens[i * seq_len : (i + 1) * seq_len], dtype=np.int64) for i in idx])
    x = torch.from_numpy(rows)  # (W, seq_len)
    return list(x.split(batch_size))


@torch.no_grad()
def collect_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], names: list[str], max_rows: int = 4096, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` and keep (a row sample of) the input of every named module.

    Returns name -> (rows, in_features) float32, at most ``max_rows`` rows each (sampled evenly).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise RetortError(f"calibration: no module named {missing[0]!r}")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())  # (B*T, K)

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, parts in seen.items():
        xs = torch.cat(parts)  # (rows, K)
        if xs.shape[0] > max_rows:
            xs = xs[torch.randperm(xs.shape[0], generator=gen)[:max_rows]]
        out[n] = xs
    return out
