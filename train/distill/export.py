"""The final student: gather the weights (ZeRO-3 / pipeline stages), evaluate, write an HF dir, publish.

Workers (``finish_worker``): every rank takes part in gathering the full state dict (ZeRO-3
parameters are partitioned; pipeline stages each hold a slice), rank 0 rebuilds a plain
``Transformer``, measures held-out perplexity of the student (and the teacher, for retention)
on the val split, and writes a Hugging Face checkpoint directory with the tokenizer next to it.
The driver (``publish_student``) publishes that directory with its lineage and metrics.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.config.distill import DistillConfig
from cluster.model import Transformer
from train.distill.hooks import Hooks
from train.distill.loop import Plan

DISTILL_INFO = "retort_distill.json"


def gather_student_state(engine, cfg: DistillConfig) -> dict[str, torch.Tensor] | None:
    """All ranks call; rank 0 gets the student's full state dict under HF names, others None."""
    if cfg.mode == "pipeline":
        from train.distill.pipeline import hf_state_dict

        mine = hf_state_dict(engine.module, cfg.student_model())
        parts: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)  # small models; one stage's slice per rank
        if dist.get_rank() != 0:
            return None
        full: dict[str, torch.Tensor] = {}
        for p in parts:
            full.update(p or {})
        return full
    if cfg.zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0 only
    else:
        sd = engine.module.state_dict() if dist.get_rank() == 0 else None
    if sd is None or dist.get_rank() != 0:
        return None
    prefix = "student."
    return {k[len(prefix) :]: v.detach().float().cpu() for k, v in sd.items() if k.startswith(prefix)}


def student_from_state(cfg: DistillConfig, sd: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg.student_model())
    if cfg.student_model().tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"} | {
            "lm_head.weight": sd["model.embed_tokens.weight"]
        }
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def evaluate(
    cfg: DistillConfig, plan: Plan, student: Transformer, teacher: Transformer | None, device: torch.device
) -> dict[str, Any]:
    """Held-out perplexity of the student (and teacher), retention = teacher ppl / student ppl."""
    from train.data import load_split
    from train.evaluate import perplexity, retention

    tokens = load_split(plan.data_dir, "val")
    seq = cfg.eval.seq_len or cfg.seq_len
    stride = cfg.eval.stride or seq
    kw = dict(
        seq_len=seq,
        stride=stride,
        batch_size=cfg.eval.batch_size,
        max_tokens=cfg.eval.max_tokens,
        vocab_size=plan.vocab_size,
    )
    out: dict[str, Any] = {
        "eval_seq_len": seq,
        "eval_stride": stride,
        "eval_tokens": min(len(tokens), cfg.eval.max_tokens or len(tokens)),
    }
    with torch.no_grad():
        out["val_ppl"] = perplexity(student.to(device), tokens, **kw)
        if cfg.eval.teacher and plan.teacher_dir is not None:
            if teacher is None:
                teacher = Transformer.from_pretrained(plan.teacher_dir, device=device).eval()
            out["teacher_val_ppl"] = perplexity(teacher.float(), tokens, **kw)
            out["retention"] = retention(out["teacher_val_ppl"], out["val_ppl"])
            out["teacher_params"] = teacher.num_params()
    out["params"] = student.num_params()
    if "teacher_params" in out:
        out["param_ratio"] = out["params"] / out["teacher_params"]
    return out


def write_hf_dir(student: Transformer, out: Path, tokenizer_dir: Path, info: dict[str, Any]) -> Path:
    """HF checkpoint dir: config.json + model.safetensors + the tokenizer files + our run info."""
    student.cpu().save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    (out / DISTILL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def finish_worker(
    cfg: DistillConfig,
    plan: Plan,
    res: dict[str, Any],
    hooks: Hooks,
    tokenizer_dir: str,
    train_stats: dict[str, Any],
) -> dict[str, Any] | None:
    """All ranks: gather; rank 0: evaluate + write the HF dir and report it as the final checkpoint."""
    from train.distill.loop import device_for

    sd = gather_student_state(res["engine"], cfg)
    final: dict[str, Any] = {"step": res["step"], "final": True}
    out_dir = None
    if sd is not None:
        student = student_from_state(cfg, sd)
        metrics = evaluate(cfg, plan, student, res.get("teacher"), device_for(cfg))
        final.update(metrics, **train_stats)
        out_dir = tempfile.mkdtemp(prefix="retort-student-")
        write_hf_dir(
            student,
            Path(out_dir) / "hf",
            Path(tokenizer_dir),
            {"metrics": final, "config_hash": plan.config_hash, "config": cfg.model_dump(mode="json")},
        )
        (Path(out_dir) / "meta.json").write_text(
            json.dumps({"kind": "final", "step": res["step"], "config_hash": plan.config_hash})
        )
        print(
            "final: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()),
            flush=True,
        )
    hooks.report(final, out_dir)
    return final if sd is not None else None


def publish_student(
    cfg: DistillConfig, hf_dir: Path, metrics: dict[str, Any], lineage: dict[str, Any]
) -> str:
    """Publish ``hf_dir`` to the registry (and move the alias); returns ``name:VERSION``."""
    from cluster.registry import open_registry

    reg = open_registry(cfg.registry)
    ref = reg.publish(cfg.publish_name, hf_dir, lineage=lineage, metrics=metrics)
    if cfg.publish_alias:
        reg.promote(ref.name, ref.version, cfg.publish_alias)
    return str(ref)
