"""The same training loop without Ray, under torchrun (for GPU runs and MFU measurements)::

    torchrun --nproc_per_node 1 -m train.distill.torchrun_main -c configs/distill/base.yaml
    torchrun --nproc_per_node 2 -m train.distill.torchrun_main -c configs/distill/base.yaml num_workers=2

``num_workers`` must equal torchrun's world size. Rank 0 prepares the data and resolves the
teacher (the others wait, then reuse them); checkpoints go to ``<run_dir>/checkpoints/step_N``
and a restart resumes from the newest. At the end it prints ``tokens/s``, model FLOPs/token
(``6·N + 12·L·T·H·D``) and, on CUDA, MFU against the GPU's dense bf16 peak
(``RETORT_PEAK_TFLOPS`` overrides; H100/H200 SXM: 989).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops() -> float | None:
    import torch

    if os.environ.get("RETORT_PEAK_TFLOPS"):
        return float(os.environ["RETORT_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def run(cfg) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from cluster.errors import RetortError
    from train.distill.export import finish_worker
    from train.distill.hooks import DirHooks
    from train.distill.job import lineage_of, make_plan, publish_and_print, run_dir_of
    from train.distill.loop import Plan, run_worker

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/retort/torch_extensions"))
    if cfg.use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before any NCCL collective
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.num_workers:
        raise RetortError(f"num_workers={cfg.num_workers} but torchrun started {world} processes")
    if cfg.use_gpu and not torch.cuda.is_available():
        raise RetortError("use_gpu=true but CUDA is not available")
    box: list[Any] = [None]
    if rank == 0:
        try:
            plan_info = make_plan(cfg, job_id=os.environ.get("TORCHELASTIC_RUN_ID", "torchrun"))
            box[0] = (*plan_info, cfg.model_dump())  # make_plan pins cfg (e.g. student_init -> its dir)
        except RetortError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    plan_d, info, cfg_d = box[0]
    cfg = type(cfg).model_validate(cfg_d)  # every rank trains what rank 0 resolved
    plan = plan_d if isinstance(plan_d, Plan) else Plan(**plan_d)
    hooks = DirHooks(run_dir_of(cfg) / "checkpoints", cfg.keep_checkpoints)
    res = run_worker(cfg, plan, hooks, use_ray=False)
    stats = dict(res["stats"])
    peak = peak_flops()
    if peak:
        stats["mfu"] = stats["train_tokens_per_s"] * stats["flops_per_token"] / (peak * world)
        # hardware FLOPs utilisation: the online teacher's forward is work the GPU does too
        stats["hfu_with_teacher"] = (
            stats["train_tokens_per_s"]
            * (stats["flops_per_token"] + stats["teacher_flops_per_token"])
            / (peak * world)
        )
    final = finish_worker(cfg, plan, res, hooks, info["tokenizer_dir"], stats)
    if rank == 0 and final is not None:
        print(
            json.dumps(
                {
                    "torchrun": {
                        k: final[k]
                        for k in (
                            "train_tokens_per_s",
                            "flops_per_token",
                            "teacher_flops_per_token",
                            "mfu",
                            "hfu_with_teacher",
                            "val_ppl",
                        )
                        if k in final
                    },
                    "world": world,
                    "plan": asdict(plan),
                }
            ),
            flush=True,
        )
        student = Path(info["run_dir"]) / "final" / "hf"
        if cfg.publish:
            publish_and_print(
                cfg,
                student,
                {k: v for k, v in final.items() if k != "final"},
                lineage_of(cfg, info, plan.job_id),
            )
    dist.barrier()
    dist.destroy_process_group()
    return final or {}


def main(argv: list[str] | None = None) -> int:
    from cluster.entry import job_main

    return job_main("distill", run, "python -m train.distill.torchrun_main", argv)


if __name__ == "__main__":
    sys.exit(main())
