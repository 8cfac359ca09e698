"""Offline quantization, gpt-fast style: transform a float model's weights, then swap in the
runtime modules of ``cluster.quant``.

- RTN: round to nearest (``cluster.quant.quantize_model``).
- AWQ-style activation-aware scaling: for every group of linears that read the same input,
  search a per-input-channel scale ``s = mean|x|^a`` (``a`` on a grid in [0, 1]) that minimizes
  the output error of the quantized layers on calibration activations, fold ``1/s`` into the
  op that produces the input (RMSNorm weight, or ``up_proj`` rows for ``down_proj``) and ``s``
  into the weights (exact in floating point), then round to nearest. For w8a8 the search also
  simulates the per-token activation quantization (SmoothQuant's migration, searched).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cluster import quant
from cluster.config.compress import QuantSettings
from cluster.errors import RetortError
from cluster.model import Transformer
from train.compress.calibrate import calibration_batches, collect_inputs


def fake_quant(w: torch.Tensor, scheme: str, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """w (N, K) -> the dequantized weights the runtime module would hold."""
    if scheme in quant.GROUPED:
        return quant.dequantize_int4(*quant.quantize_int4(w, group_size, symmetric))
    return quant.dequantize_int8(*quant.quantize_int8(w, symmetric))


def _fake_act(x: torch.Tensor) -> torch.Tensor:
    xq, s = quant.quantize_act_per_token(x)
    return xq.float() * s


def awq_groups(model: Transformer) -> list[tuple[nn.Module, str, list[str]]]:
    """(producer module, how to fold 1/s into it, consumer linear names) per shared input."""
    cfg, groups = model.cfg, []
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        groups.append((block.input_layernorm, "norm", [f"{p}.self_attn.{n}_proj" for n in "qkv"]))
        if cfg.n_heads == cfg.n_kv_heads:  # o_proj's input channels are v_proj's output rows only for MHA
            groups.append((block.self_attn.v_proj, "rows", [f"{p}.self_attn.o_proj"]))
        groups.append((block.post_attention_layernorm, "norm", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]))
        groups.append((block.mlp.up_proj, "rows", [f"{p}.mlp.down_proj"]))
    return groups


@torch.no_grad()
def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], q: QuantSettings, symmetric: bool
) -> tuple[torch.Tensor, float]:
    """x (n, K), weights [(N_i, K)] -> best scale s (K,) and its exponent a."""
    x_mean = x.abs().mean(dim=0).clamp(min=1e-6)  # (K,)
    ref = [x @ w.t() for w in weights]  # [(n, N_i)]
    best: tuple[float, torch.Tensor, float] = (float("inf"), torch.ones_like(x_mean), 0.0)
    for i in range(q.awq_grid + 1):
        a = i / q.awq_grid
        s = x_mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        if q.scheme in quant.ACT_QUANT:
            xs = _fake_act(xs)
        err = 0.0
        for w, r in zip(weights, ref, strict=True):
            wq = fake_quant(w * s, q.scheme, q.group_size, symmetric)
            err += (xs @ wq.t() - r).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2]


@torch.no_grad()
def awq_scale(
    model: Transformer, inputs: dict[str, torch.Tensor], q: QuantSettings, symmetric: bool
) -> dict[str, float]:
    """Fold the searched scales into the model in place; returns consumer -> chosen exponent."""
    mods = dict(model.named_modules())
    chosen: dict[str, float] = {}
    for producer, kind, names in awq_groups(model):
        names = [n for n in names if not quant._excluded(n, q.modules_not_converted)]
        if not names:
            continue
        s, a = search_scale(inputs[names[0]], [mods[n].weight.float() for n in names], q, symmetric)
        for n in names:
            mods[n].weight.mul_(s.to(mods[n].weight.dtype))  # (N, K) * (K,)
        if kind == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype)[:, None])  # rows of the producing linear
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        chosen[names[0]] = a
    return chosen


def check_quantizable(model: Transformer, q: QuantSettings) -> None:
    """Every bad-input case, named, before any weight changes."""
    if quant.is_quantized(model):
        raise RetortError("model is already quantized; compress a floating-point source")
    if q.scheme in quant.GROUPED:
        for name, lin in quant._targets(model, q.modules_not_converted):
            quant.check_group_size(q.group_size, lin.in_features, name)


def quantize(
    model: Transformer,
    q: QuantSettings,
    calib_tokens: np.ndarray | None = None,
    calib_n_tokens: int = 8192,
    seq_len: int = 128,
    seed: int = 0,
) -> tuple[Transformer, dict[str, Any]]:
    """Quantize ``model`` in place per ``q``; returns it and the record written into config.json."""
    symmetric = q.symmetric if q.symmetric is not None else q.scheme not in quant.GROUPED
    check_quantizable(model, q)
    record: dict[str, Any] = {"calibration": q.calibration}
    if q.calibration == "awq":
        if calib_tokens is None:
            raise RetortError("quant.calibration=awq needs calibration tokens (the data's train split)")
        batches = calibration_batches(calib_tokens, calib_n_tokens, seq_len, seed)
        names = sorted({n for _, _, ns in awq_groups(model) for n in ns})
        inputs = collect_inputs(model, batches, names, seed=seed)
        exps = awq_scale(model, inputs, q, symmetric)
        record.update(
            calib_tokens=sum(b.numel() for b in batches),
            awq_mean_exponent=round(float(np.mean(list(exps.values()))) if exps else 0.0, 4),
        )
    quant.quantize_model(
        model,
        q.scheme,
        q.group_size if q.scheme in quant.GROUPED else None,
        symmetric,
        q.modules_not_converted,
    )
    return model, record


def bitwidth_mse(model: nn.Module, bits: range = range(1, 9)) -> dict[int, float]:
    """The seed's per-bit-width error on real weights: symmetric per-channel RTN at 2..8 bits,
    sign * mean|w| (binary) at 1 bit; MSE averaged over every linear weight element."""
    ws = [
        m.weight.detach().float() for n, m in model.named_modules() if type(m) is nn.Linear and "layers" in n
    ]
    if not ws:
        raise RetortError("bitwidth_mse: the model has no floating-point linear layers")
    out = {}
    for b in bits:
        se, count = 0.0, 0
        for w in ws:
            if b == 1:
                wq = w.sign() * w.abs().mean(dim=1, keepdim=True)
            else:
                qmax = 2 ** (b - 1) - 1
                s = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-10)
                wq = torch.round(w / s).clamp(-qmax, qmax) * s
            se += (wq - w).pow(2).sum().item()
            count += w.numel()
        out[b] = se / count
    return out
