"""Numbers the report computes itself from the registered artifacts (not from job logs).

Everything here reads safetensors through ``cluster.checkpoint`` — never a pickle.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.checkpoint import read_state_dict

MATRIX_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The float decoder matrices of a (non-quantized) checkpoint."""
    sd = read_state_dict(model_dir)
    return {k: v.float() for k, v in sd.items() if k.endswith(MATRIX_SUFFIXES) and v.is_floating_point()}


def quant_mse_by_bits(weights: dict[str, torch.Tensor], bits: range = range(1, 9)) -> dict[int, float]:
    """Mean squared error of symmetric per-output-channel round-to-nearest quantization, per bit width.

    1 bit is sign × mean|w| per row (binary, as in the seed notebook); b ≥ 2 uses the
    symmetric grid [-(2^(b-1)-1), 2^(b-1)-1] scaled by max|w| per row.
    """
    out: dict[int, float] = {}
    for b in bits:
        se, n = 0.0, 0
        for w in weights.values():
            if b == 1:
                q = torch.sign(w) * w.abs().mean(dim=1, keepdim=True)
            else:
                qmax = 2 ** (b - 1) - 1
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
                q = torch.round(w / scale).clamp(-qmax, qmax) * scale
            se += float(((w - q) ** 2).sum())
            n += w.numel()
        out[b] = se / max(n, 1)
    return out


def sparsity_by_layer(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    layers: dict[str, list[torch.Tensor]] = {}
    for k, w in weights.items():
        layer = ".".join(k.split(".")[:3])  # model.layers.N
        layers.setdefault(layer, []).append(w)
    return {
        k: float(sum((t == 0).sum() for t in ts) / sum(t.numel() for t in ts))
        for k, ts in sorted(layers.items())
    }


def bytes_by_precision(num_params: int, group_size: int = 128, rows: int = 0) -> dict[str, float]:
    """Weight bytes of ``num_params`` parameters stored at each precision (scales included)."""
    return {
        "fp32": 4.0 * num_params,
        "bf16": 2.0 * num_params,
        "int8": 1.0 * num_params + 4.0 * rows,
        "int4": 0.5 * num_params + 2 * 2.0 * num_params / group_size,
    }


def loaded_bytes(model_dir: Path) -> int:
    """Bytes of every tensor of the model as loaded for inference (quantized modules included)."""
    from cluster.checkpoint import load_model

    model = load_model(model_dir)
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t
    return int(sum(t.numel() * t.element_size() for t in seen.values()))


def memory_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> float:
    """Measured copy bandwidth of this machine (read + write), GB/s."""
    a = np.ones(size_mb * 2**20 // 8)
    b = np.empty_like(a)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def replicas_needed(
    requests_per_day: int, tokens_per_request: int, tok_s_per_replica: float, headroom: float
) -> int:
    if tok_s_per_replica <= 0:
        return 0
    mean_tok_s = requests_per_day * tokens_per_request / 86400
    return max(1, math.ceil(mean_tok_s * headroom / tok_s_per_replica))


def histogram_data(weights: dict[str, torch.Tensor], max_values: int = 2_000_000) -> np.ndarray:
    flat = torch.cat([w.flatten() for w in weights.values()])
    if flat.numel() > max_values:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:max_values]]
    return flat.numpy()


def describe(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "–" if value is None else str(value)
