"""The DeepSpeed config dict built from a ``DistillConfig``.

The optimizer and LR scheduler are NOT in this dict: the job passes torch's ``AdamW`` and a
``LambdaLR`` to ``deepspeed.initialize`` so DeepSpeed never builds its own fused/CPU Adam
(which needs a compiled op: slow on CPU, and broken for ``TORCH_CUDA_ARCH_LIST=9.0a`` on H200).
"""

from __future__ import annotations

import math
from typing import Any

from cluster.config.distill import DistillConfig


def bf16_supported(use_gpu: bool) -> bool:
    """bf16 needs a GPU that has it (Ampere+); CPU runs stay fp32 (DeepSpeed's CPU bf16 path is slow)."""
    if not use_gpu:
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg: DistillConfig, bf16: bool | None = None) -> dict[str, Any]:
    """ZeRO stage, micro batch, accumulation, clipping, precision, optimizer offload."""
    use_bf16 = cfg.bf16 and (bf16_supported(cfg.use_gpu) if bf16 is None else bf16)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=cfg.use_gpu, reduce_bucket_size=int(5e7))
    if cfg.zero_stage == 3:
        # gather the 16-bit weights on save so export needs no zero_to_fp32 pass
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # progress comes from our bar and metrics, not DeepSpeed's log
        "wall_clock_breakdown": False,
        "seed": cfg.seed,
    }
    if cfg.offload_optimizer:
        # our torch AdamW runs on the offloaded fp32 master copy
        ds["zero_force_ds_cpu_optimizer"] = False
    if cfg.mode == "pipeline":
        ds["pipeline"] = {"activation_checkpoint_interval": 0}
    return ds


def lr_lambda(cfg: DistillConfig):
    """Linear warm-up to 1, then cosine to ``min_lr_ratio`` at ``steps`` (a multiplier of ``lr``)."""
    warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms/biases/embeddings' 1-D params."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
