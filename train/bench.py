"""Distillation benchmark (not a test): ``python -m train.bench [--quick]`` prints one table.

(a) the KD student vs the same student trained from scratch (alpha=0: pure cross-entropy) on the
    same tokens, in the same order, with the same schedule: held-out perplexity; goal KD <= 0.9x.
(b) the KD student vs its teacher at <= 1/4 of the teacher's parameters: goal student ppl <= 1.3x.
(c) training tokens/s of each parallel mode (ZeRO 0/1/2/3, 2-stage pipeline) on 2 CPU workers,
    relative to ZeRO-0.

Every number comes from the real job (``train.distill.job.run``: Ray Train + DeepSpeed), measured in
this run. The teacher is ``--teacher REF`` from the registry, or (default) pretrained here with
plain AdamW for ``--teacher-steps`` on the same data and published to a temporary registry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUICK = dict(data="configs/data/tiny.yaml", teacher_preset="tiny", student="d32", teacher_steps=600, steps=300,
             seq_len=64, batch=8, mode_steps=12, eval_tokens=16384)
FULL = dict(data="configs/data/small.yaml", teacher_preset="small", student="small-student", teacher_steps=600,
            steps=400, seq_len=128, batch=16, mode_steps=20, eval_tokens=131072)
STUDENTS = {  # quick: a quarter of the tiny teacher
    "d32": dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256,
                tie_embeddings=True),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny data/teacher/student (minutes on 2 cores)")
    p.add_argument("--teacher", default=None, help="registry ref of a trained teacher (default: pretrain one here)")
    p.add_argument("--teacher-steps", type=int, default=None, help="steps to pretrain the teacher here")
    p.add_argument("--steps", type=int, default=None, help="distillation / scratch steps")
    p.add_argument("--mode-steps", type=int, default=None, help="steps per throughput run (c)")
    p.add_argument("--modes", default="zero-0,zero-1,zero-2,zero-3,pipeline", help="throughput modes for (c)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="KD weight (loss = alpha*T^2*KD + (1-alpha)*CE); measured here: pure KD (1.0) beats 0.5 "
                        "when the teacher saw more tokens than the student")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    p.add_argument("--workdir", default=None, help="keep runs here (default: a temp dir, removed)")
    return p.parse_args(argv)


def pretrain_teacher(data, preset_name: str, steps: int, seq_len: int, batch: int, out: Path) -> Path:
    """Plain AdamW pretraining of the teacher on the train split (single process); saved as an HF dir."""
    import torch
    from tqdm import tqdm

    from cluster.config.distill import DistillConfig
    from cluster.config.model import preset
    from cluster.model import Transformer
    from train.data import load_split
    from train.data.loader import packed_batches
    from train.distill.ds_config import lr_lambda

    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the workers below get 1 CPU each too
    model = Transformer(preset(preset_name)).init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(DistillConfig.model_validate(
        {"student_preset": preset_name, "steps": steps, "warmup_steps": max(1, steps // 20), "seq_len": seq_len})))
    tokens = load_split(data.dir, "train")
    bar = tqdm(packed_batches(tokens, seq_len, batch, seed=1234, max_steps=steps), total=steps, desc="teacher")
    for _, xy in bar:
        logits = model(xy[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[..., : data.vocab_size].flatten(0, 1), xy[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.save_pretrained(out)
    for f in Path(data.tokenizer_dir).iterdir():
        shutil.copy2(f, out / f.name)
    return out


def distill(base: dict[str, Any], **kw) -> dict[str, Any]:
    from cluster.config.distill import DistillConfig
    from train.distill.job import run

    cfg = DistillConfig.model_validate({**base, **kw})
    t0 = time.perf_counter()
    out = run(cfg)
    out["wall_s"] = time.perf_counter() - t0
    return out


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    import ray
    import yaml

    from cluster.config.data import DataConfig
    from cluster.registry import open_registry
    from train.data import prepare

    args = parse(argv)
    o = dict(QUICK if args.quick else FULL)
    for k in ("teacher_steps", "steps", "mode_steps"):
        if getattr(args, k) is not None:
            o[k] = getattr(args, k)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retort-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dict = yaml.safe_load(Path(o["data"]).read_text())
    data = prepare(DataConfig.model_validate(data_dict))
    if args.teacher is None:
        os.environ["RETORT_REGISTRY"] = str(work / "registry")
        tdir = pretrain_teacher(data, o["teacher_preset"], o["teacher_steps"], o["seq_len"], o["batch"], work / "teacher")
        teacher_ref = str(open_registry().publish("bench-teacher", tdir, lineage={}, metrics={}))
    else:
        teacher_ref = args.teacher
    student = {"student": STUDENTS[o["student"]]} if o["student"] in STUDENTS else {"student_preset": o["student"]}
    base = dict(data=data_dict, teacher=teacher_ref, **student, steps=o["steps"], seq_len=o["seq_len"],
                micro_batch_size=o["batch"] // 2, num_workers=2, zero_stage=1, lr=3e-3,
                warmup_steps=max(1, o["steps"] // 20), checkpoint_every=10**6, log_every=10**6, publish=False,
                loss={"kind": "fkl", "temperature": args.temperature, "alpha": args.alpha},
                eval={"batch_size": 16, "max_tokens": o["eval_tokens"], "teacher": True})
    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        kd = distill(base, run_dir=str(work / "kd"))
        scratch = distill(base, run_dir=str(work / "scratch"), loss={"kind": "fkl", "alpha": 0.0},
                          eval={"batch_size": 16, "max_tokens": o["eval_tokens"], "teacher": False})
        modes = {}
        topk_base = None
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            run_dir = str(work / f"mode-{mode}")
            common = dict(steps=o["mode_steps"], warmup_steps=1, eval={"batch_size": 16, "max_tokens": 1024,
                                                                        "teacher": False})
            if mode == "pipeline":
                topk_base = topk_base or build_cache(work, data, teacher_ref, o)
                modes[mode] = distill(base, run_dir=run_dir, mode="pipeline", pipeline_stages=2, zero_stage=1,
                                      teacher_source="topk", topk={"dir": topk_base}, micro_batch_size=max(1, o["batch"] // 4),
                                      grad_accum=4, **common)
            else:
                modes[mode] = distill(base, run_dir=run_dir, zero_stage=int(mode.split("-")[1]), **common)
    finally:
        ray.shutdown()
    print_table(kd, scratch, modes, o, args)
    (work / "bench.json").write_text(json.dumps({"kd": kd, "scratch": scratch, "modes": modes, "options": o}, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def build_cache(work: Path, data, teacher_ref: str, o: dict[str, Any]) -> str:
    from cluster.checkpoint import load_model
    from cluster.registry import open_registry
    from train.data import load_split
    from train.topk import build_topk_cache, weights_sha256

    reg = open_registry()
    tdir = reg.resolve(teacher_ref)
    out = work / "topk"
    build_topk_cache(load_model(tdir), load_split(data.dir, "train"), o["seq_len"], 16, out, 32,
                     vocab_size=data.vocab_size, teacher=teacher_ref, teacher_sha256=weights_sha256(tdir),
                     data_fingerprint=data.fingerprint, max_windows=4096, progress=False)
    return str(out)


def print_table(kd: dict, scratch: dict, modes: dict, o: dict, args) -> None:
    tok = o["steps"] * o["batch"] * o["seq_len"]
    print()
    print(f"Distillation benchmark ({'quick' if args.quick else 'full'}): data {o['data']}, student {o['student']}, "
          f"{o['steps']} steps x {o['batch']} x {o['seq_len']} = {tok:,} tokens, 2 CPU workers, "
          f"KD fkl alpha={args.alpha} T={args.temperature}; eval {o['eval_tokens']:,} val tokens")
    print()
    print("| row | measured | baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    r = kd["val_ppl"] / scratch["val_ppl"]
    print(f"| (a) held-out ppl: KD student vs same student from scratch | {fmt(kd['val_ppl'])} | "
          f"{fmt(scratch['val_ppl'])} | {r:.3f} | <= 0.90 {'OK' if r <= 0.9 else 'MISSED'} |")
    r2 = kd["val_ppl"] / kd["teacher_val_ppl"]
    print(f"| (b) student ppl vs teacher ppl (params {kd['params']:,} vs {kd['teacher_params']:,} = "
          f"{kd['param_ratio']:.2f}x) | {fmt(kd['val_ppl'])} | {fmt(kd['teacher_val_ppl'])} | {r2:.3f} | "
          f"<= 1.30 at <= 0.25x params {'OK' if r2 <= 1.3 and kd['param_ratio'] <= 0.25 else 'MISSED'} |")
    ref = modes.get("zero-0", {}).get("train_tokens_per_s")
    for name, m in modes.items():
        tps = m["train_tokens_per_s"]
        ratio = f"{tps / ref:.2f}" if ref else "-"
        print(f"| (c) tokens/s {name} (2 workers, {o['mode_steps']} steps) | {fmt(tps)} | "
              f"{fmt(ref) if ref else '-'} (zero-0) | {ratio} | - |")
    print()
    print(f"retention (teacher ppl / student ppl): KD {kd['retention']:.3f}; wall: KD run {kd['wall_s']:.0f} s, "
          f"scratch run {scratch['wall_s']:.0f} s (the CPU is shared with other jobs: tokens/s are noisy)")


if __name__ == "__main__":
    sys.exit(main())
