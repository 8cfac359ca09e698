"""The student as a DeepSpeed ``PipelineModule``: embed | blocks... | norm + head, KD on the last stage.

Layers are built from a fully initialised ``Transformer`` (same seed as the zero-mode student),
so a pipeline run and a single-process run start from identical weights. Tied embeddings use
``TiedLayerSpec("embed", ...)`` at both ends (DeepSpeed all-reduces the tied gradient between
the first and last stage). The teacher is not in the pipeline: its top-k (ids, logprobs) travel
with the labels, which only the last stage reads.

Label packing: one micro-batch is ``(tokens (B, T), (labels (B, T), topk_ids (B, T, k),
topk_logprobs (B, T, k)))``; DeepSpeed hands the label tuple to ``loss_fn`` on the last stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.config.losses import KDLossConfig
from cluster.config.model import ModelConfig
from cluster.model import Block, RMSNorm, Transformer, rope_cos_sin


class EmbedPipe(nn.Module):
    """tokens (B, T) -> hidden (B, T, d). Also the tied LM head (``head_forward``) when tied."""

    def __init__(self, cfg: ModelConfig, weight: torch.Tensor) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)  # (B, T, d)


def head_forward(module: EmbedPipe, h: torch.Tensor) -> torch.Tensor:
    """Tied head: hidden (B, T, d) -> logits (B, T, V) with the embedding matrix."""
    return F.linear(h, module.embed_tokens.weight)


class BlockPipe(nn.Module):
    """One decoder block; RoPE tables are recomputed from T (positions 0..T-1, packed windows)."""

    def __init__(self, cfg: ModelConfig, index: int, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.block = Block(cfg, index)
        self.block.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(pos, self.cfg.dim_head, self.cfg.rope_theta, x.dtype)
        return self.block(x, cos, sin, None)  # (B, T, d)


class NormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, weight: torch.Tensor) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        with torch.no_grad():
            self.norm.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class HeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, weight: torch.Tensor) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)  # (B, T, V)


class PipeKDLoss:
    """``loss_fn(logits, (labels, ids, logprobs))`` on the last stage; keeps the last kd/ce parts."""

    def __init__(self, loss_cfg: KDLossConfig, vocab_size: int) -> None:
        self.cfg, self.vocab_size = loss_cfg, vocab_size
        self.parts: list[tuple[float, float]] = []  # (kd, ce) of each micro-batch since the last pop

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        from train.distill.losses import TopKTeacher, kd_loss

        y, ids, lp = labels  # (B, T), (B, T, k), (B, T, k)
        out = kd_loss(logits, TopKTeacher(ids, lp), y, self.cfg, vocab_size=self.vocab_size)
        self.parts.append((float(out["kd"].detach()), float(out["ce"].detach())))
        return out["loss"]

    def pop_means(self) -> tuple[float, float]:
        if not self.parts:
            return float("nan"), float("nan")
        kd = sum(p[0] for p in self.parts) / len(self.parts)
        ce = sum(p[1] for p in self.parts) / len(self.parts)
        self.parts.clear()
        return kd, ce


def build_pipeline(model: Transformer, num_stages: int, loss_fn: PipeKDLoss, seed: int):
    """``model`` (initialised) -> ``PipelineModule`` with ``num_stages`` stages, partitioned by parameters."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    cfg = model.cfg
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"]
    layers: list = []
    if cfg.tie_embeddings:
        layers.append(TiedLayerSpec("embed", EmbedPipe, cfg, emb, tied_weight_attr="embed_tokens.weight"))
    else:
        layers.append(LayerSpec(EmbedPipe, cfg, emb))
    for i in range(cfg.n_layers):
        prefix = f"model.layers.{i}."
        state = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        layers.append(LayerSpec(BlockPipe, cfg, i, state))
    layers.append(LayerSpec(NormPipe, cfg, sd["model.norm.weight"]))
    if cfg.tie_embeddings:
        layers.append(
            TiedLayerSpec(
                "embed", EmbedPipe, cfg, emb, forward_fn=head_forward, tied_weight_attr="embed_tokens.weight"
            )
        )
    else:
        layers.append(LayerSpec(HeadPipe, cfg, sd["lm_head.weight"]))
    return PipelineModule(
        layers=layers,
        num_stages=num_stages,
        loss_fn=loss_fn,
        partition_method="parameters",
        base_seed=seed,
        activation_checkpoint_interval=0,
    )


def hf_state_dict(pipe, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """This stage's parameters under Hugging Face names (``model.layers.3.mlp.up_proj.weight`` ...)."""
    out: dict[str, torch.Tensor] = {}
    n = cfg.n_layers
    for idx, layer in zip(range(pipe._local_start, pipe._local_stop), pipe.forward_funcs, strict=True):
        mod = layer if isinstance(layer, nn.Module) else None
        if idx == 0:
            name = "model.embed_tokens.weight"
            w = (
                pipe.tied_modules["embed"].embed_tokens.weight
                if cfg.tie_embeddings
                else mod.embed_tokens.weight
            )
            out[name] = w.detach().cpu().clone()
        elif idx <= n:
            for k, v in mod.block.state_dict().items():
                out[f"model.layers.{idx - 1}.{k}"] = v.detach().cpu().clone()
        elif idx == n + 1:
            out["model.norm.weight"] = mod.norm.weight.detach().cpu().clone()
        elif not cfg.tie_embeddings:
            out["lm_head.weight"] = mod.lm_head.weight.detach().cpu().clone()
    return out
