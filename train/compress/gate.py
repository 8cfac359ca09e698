"""Measure a model checkpoint (ppl, retention, size, RAM, decode speed) and gate it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cluster.config.compress import EvalConfig, GateConfig
from cluster.quant import QuantLinear
from train.compress.decode_bench import measure, measure_in_subprocess


def logical_params(model: nn.Module) -> int:
    """Parameters as the float model counts them (a quantized weight counts its N*K entries)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )


def nonzero_params(model: nn.Module) -> int:
    """Non-zero weights (pruning's effective size); quantized weights count their non-zero codes."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        total += int((p != 0).sum())
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += int((m.dequantize() != 0).sum())
    return total


def layer_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' tensors (what quantization touches; embeddings/head excluded)."""
    return sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if n.startswith("model.layers.")
    )


def bytes_on_disk(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix == ".safetensors")


def evaluate(
    path: str | Path, model: nn.Module, val_tokens: np.ndarray, cfg: EvalConfig, vocab_size: int | None = None
) -> dict[str, Any]:
    """All measurements of the checkpoint at ``path`` (``model`` is it, loaded)."""
    from train.evaluate import perplexity

    ppl = perplexity(
        model, val_tokens, cfg.seq_len, cfg.stride, cfg.batch_size, cfg.max_tokens, vocab_size=vocab_size
    )
    if cfg.isolate:
        speed = measure_in_subprocess(
            path, cfg.decode_batches, cfg.decode_prompt, cfg.decode_tokens, cfg.threads
        )
    else:
        speed = measure(path, cfg.decode_batches, cfg.decode_prompt, cfg.decode_tokens, cfg.threads)
    return {
        "ppl": round(ppl, 4),
        "params": logical_params(model),
        "nonzero_params": nonzero_params(model),
        "bytes": bytes_on_disk(path),
        "layer_bytes": layer_bytes(model),
        **speed,
    }


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    derived: dict[str, float] = field(default_factory=dict)


def apply_gate(metrics: dict[str, Any], source: dict[str, Any], gate: GateConfig) -> GateResult:
    """Compare ``metrics`` with the source's; every failing rule is named with its numbers."""
    increase = (metrics["ppl"] / source["ppl"] - 1.0) * 100.0
    retention = source["ppl"] / metrics["ppl"]
    bytes_ratio = metrics["bytes"] / source["bytes"]
    b1 = next((k for k in metrics if k.startswith("tok_s_b")), None)
    speedup = metrics[b1] / source[b1] if b1 and source.get(b1) else float("nan")
    res = GateResult(
        True,
        derived={
            "ppl_increase_pct": round(increase, 3),
            "retention": round(retention, 4),
            "bytes_ratio": round(bytes_ratio, 4),
            "speedup": round(speedup, 3),
        },
    )
    if not np.isfinite(metrics["ppl"]):
        res.reasons.append("ppl is not finite")
    if increase > gate.max_ppl_increase_pct:
        res.reasons.append(f"ppl +{increase:.2f}% > {gate.max_ppl_increase_pct}%")
    if retention < gate.min_retention:
        res.reasons.append(f"retention {retention:.3f} < {gate.min_retention}")
    if gate.min_decode_speedup is not None and not speedup >= gate.min_decode_speedup:
        res.reasons.append(f"decode speedup {speedup:.2f}x < {gate.min_decode_speedup}x")
    if gate.max_bytes_ratio is not None and bytes_ratio > gate.max_bytes_ratio:
        res.reasons.append(f"bytes ratio {bytes_ratio:.3f} > {gate.max_bytes_ratio}")
    res.passed = not res.reasons
    return res


@torch.no_grad()
def same_logits(a: nn.Module, b: nn.Module, vocab: int, atol: float = 1e-4) -> bool:
    x = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    return bool(torch.allclose(a(x), b(x), atol=atol))
