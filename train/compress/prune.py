"""Pruning: magnitude (global / per-layer unstructured), 2:4 semi-structured, and structured
(attention heads + MLP channels, which gives physically smaller matrices and a smaller config).

Unstructured and 2:4 pruning zero weights in place (the tensors keep their shapes; sparsity is
recorded in config.json as ``"pruning"``). Structured pruning returns a new, smaller
``Transformer`` whose config stays valid: every layer keeps the same number of heads and
MLP channels, and query heads are removed uniformly within each KV group (GQA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cluster.config.compress import PruneConfig
from cluster.errors import RetortError
from cluster.model import Transformer
from cluster.quant import is_quantized


def prunable(model: Transformer, include_lm_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """The linear layers pruning touches (the tied or excluded LM head is left alone)."""
    out = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    if include_lm_head and not model.cfg.tie_embeddings:
        out.append(("lm_head", model.lm_head))
    return out


def _check_sparsity(sparsity: float, field: str = "prune.sparsity") -> None:
    if not 0.0 < sparsity < 1.0:
        raise RetortError(f"{field} must be in (0, 1), got {sparsity}")


@torch.no_grad()
def magnitude_prune(
    model: Transformer, sparsity: float, scope: str = "global", include_lm_head: bool = False
) -> dict[str, float]:
    """Zero the ``sparsity`` fraction of smallest-|w| weights; returns per-layer sparsity."""
    _check_sparsity(sparsity)
    layers = prunable(model, include_lm_head)
    if scope == "global":
        scores = torch.cat([m.weight.abs().flatten() for _, m in layers])  # (P,)
        k = int(sparsity * scores.numel())
        threshold = torch.kthvalue(scores, k).values if k > 0 else scores.min() - 1
        for _, m in layers:
            m.weight.mul_(m.weight.abs() > threshold)
    elif scope == "per_layer":
        for _, m in layers:
            w = m.weight.abs().flatten()
            k = int(sparsity * w.numel())
            if k > 0:
                m.weight.mul_(m.weight.abs() > torch.kthvalue(w, k).values)
    else:
        raise RetortError(f"prune.scope must be 'global' or 'per_layer', got {scope!r}")
    return {n: float((m.weight == 0).float().mean()) for n, m in layers}


@torch.no_grad()
def semi_structured_prune(
    model: Transformer, n: int = 2, m: int = 4, include_lm_head: bool = False
) -> dict[str, float]:
    """N:M sparsity along the input dimension: in every m consecutive weights keep the n largest."""
    out = {}
    for name, lin in prunable(model, include_lm_head):
        N, K = lin.weight.shape
        if K % m:
            raise RetortError(f"layer {name}: in_features {K} is not divisible by {m} ({n}:{m} sparsity)")
        w = lin.weight.view(N, K // m, m)  # (N, K/m, m)
        drop = w.abs().argsort(dim=-1)[..., : m - n]  # indices of the m-n smallest
        w.scatter_(-1, drop, 0.0)
        out[name] = float((lin.weight == 0).float().mean())
    return out


def _keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, in their original order."""
    return scores.topk(n_keep).indices.sort().values


def _slice(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def _mlp_channels(model: Transformer, d_ff_new: int) -> list[torch.Tensor]:
    keep = []
    for block in model.model.layers:
        mlp = block.mlp
        # channel j: how much it can write ((|gate_j| + |up_j|) * |down_:,j|)
        score = (
            mlp.gate_proj.weight.norm(dim=1) + mlp.up_proj.weight.norm(dim=1)
        ) * mlp.down_proj.weight.norm(dim=0)
        keep.append(_keep(score, d_ff_new))
    return keep


def _heads(model: Transformer, heads_per_group_new: int) -> list[torch.Tensor]:
    """Kept query-head indices per layer: the same count in every KV group."""
    cfg = model.cfg
    D, rep = cfg.dim_head, cfg.n_heads // cfg.n_kv_heads
    keep = []
    for block in model.model.layers:
        att = block.self_attn
        q = att.q_proj.weight.view(cfg.n_heads, D, -1)  # (H, D, d)
        o = att.o_proj.weight.view(-1, cfg.n_heads, D)  # (d, H, D)
        score = q.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)  # (H,)
        groups = score.view(cfg.n_kv_heads, rep)  # heads h = g*rep + r share kv head g
        idx = [g * rep + _keep(groups[g], heads_per_group_new) for g in range(cfg.n_kv_heads)]
        keep.append(torch.cat(idx))
    return keep


def _head_rows(heads: torch.Tensor, D: int) -> torch.Tensor:
    return (heads[:, None] * D + torch.arange(D)).flatten()  # (H'*D,)


@torch.no_grad()
def structured_prune(
    model: Transformer, mlp_sparsity: float, head_sparsity: float = 0.0, channel_multiple: int = 32
) -> Transformer:
    """A new, smaller Transformer: MLP channels and (optionally) query heads removed per layer."""
    _check_sparsity(mlp_sparsity, "prune.sparsity")
    if not 0.0 <= head_sparsity < 1.0:
        raise RetortError(f"prune.head_sparsity must be in [0, 1), got {head_sparsity}")
    cfg = model.cfg
    d_ff_new = int(round(cfg.d_ff * (1 - mlp_sparsity) / channel_multiple)) * channel_multiple
    d_ff_new = max(channel_multiple, min(d_ff_new, cfg.d_ff))
    rep = cfg.n_heads // cfg.n_kv_heads
    if head_sparsity > 0 and rep == 1:
        raise RetortError(
            "prune.head_sparsity needs grouped-query attention (n_heads > n_kv_heads): removing "
            "a head of an MHA model would need removing its KV head too"
        )
    rep_new = max(1, int(round(rep * (1 - head_sparsity))))
    new_cfg = type(cfg)(
        **{
            **cfg.model_dump(),
            "d_ff": d_ff_new,
            "n_heads": cfg.n_kv_heads * rep_new,
            "head_dim": cfg.dim_head,
        }
    )
    channels, heads = _mlp_channels(model, d_ff_new), _heads(model, rep_new)
    with torch.device("meta"):
        small = Transformer(new_cfg)
    small.model.embed_tokens = model.model.embed_tokens
    small.model.norm = model.model.norm
    if cfg.tie_embeddings:
        small.lm_head.weight = small.model.embed_tokens.weight
    else:
        small.lm_head = model.lm_head
    for i, (old, new) in enumerate(zip(model.model.layers, small.model.layers, strict=True)):
        new.input_layernorm, new.post_attention_layernorm = old.input_layernorm, old.post_attention_layernorm
        rows = _head_rows(heads[i], cfg.dim_head)
        a, b = old.self_attn, new.self_attn
        b.q_proj, b.o_proj = _slice(a.q_proj, rows=rows), _slice(a.o_proj, cols=rows)
        b.k_proj, b.v_proj = a.k_proj, a.v_proj
        m, mn = old.mlp, new.mlp
        ch = channels[i]
        mn.gate_proj, mn.up_proj, mn.down_proj = (
            _slice(m.gate_proj, rows=ch),
            _slice(m.up_proj, rows=ch),
            _slice(m.down_proj, cols=ch),
        )
    return small.eval()


def prune_model(model: Transformer, cfg: PruneConfig) -> tuple[Transformer, dict[str, Any]]:
    """Apply ``cfg``; returns the (possibly new) model and the ``"pruning"`` record for config.json."""
    if is_quantized(model):
        raise RetortError("cannot prune a quantized model: prune first, then quantize")
    before = model.num_params()
    record: dict[str, Any] = {"method": cfg.method}
    if cfg.method == "magnitude":
        per_layer = magnitude_prune(model, cfg.sparsity, cfg.scope, cfg.include_lm_head)
        record.update(scope=cfg.scope, target_sparsity=cfg.sparsity)
    elif cfg.method == "2:4":
        per_layer = semi_structured_prune(model, 2, 4, cfg.include_lm_head)
        record.update(pattern="2:4")
    else:
        model = structured_prune(model, cfg.sparsity, cfg.head_sparsity, cfg.channel_multiple)
        per_layer = {}
        record.update(
            mlp_sparsity=cfg.sparsity,
            head_sparsity=cfg.head_sparsity,
            d_ff=model.cfg.d_ff,
            n_heads=model.cfg.n_heads,
            params_before=before,
        )
    if per_layer:
        total = sum(m.weight.numel() for _, m in prunable(model, cfg.include_lm_head))
        zeros = sum(
            s * m.weight.numel()
            for (n, m) in prunable(model, cfg.include_lm_head)
            for s in [per_layer.get(n, 0.0)]
        )
        record["sparsity"] = round(zeros / total, 6)
        record["layers"] = {n: round(s, 6) for n, s in per_layer.items()}
    record["params"] = model.num_params()
    return model, record


def nonzero_params(model: nn.Module) -> int:
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    return int(sum(int((p != 0).sum()) for p in seen.values()))
