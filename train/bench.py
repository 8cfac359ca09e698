"""Distillation benchmark (not a test): ``python -m train.bench [--quick] [--teacher REF]`` prints one table.

It measures the demo's own recipe (``make demo``'s teacher, top-k cache and student), end to end:

(a) the KD student vs the same student trained from scratch (alpha=0: pure cross-entropy) on the
    same tokens, in the same order, with the same schedule: held-out perplexity; goal KD <= 0.9x.
(b) the KD student vs its teacher at <= 1/4 of the teacher's parameters: goal student ppl <= 1.3x.
(c) training tokens/s of each parallel mode (ZeRO 0/1/2/3, 2-stage pipeline) on 2 CPU workers,
    relative to the first mode listed.

The recipe is the configs the demo runs, unchanged: the teacher is ``configs/teacher/small.yaml``
pretrained by ``train.teacher`` (600 steps x 32 x 64 tokens; or ``--teacher REF``, e.g. the demo's
``teacher@production``), its top-k cache is built by ``train.topk`` over exactly the windows the
students draw, and both students are ``configs/distill/small.yaml`` run by the real job
(``train.distill.job.run``: Ray Train + DeepSpeed), the scratch one with ``loss.alpha=0``. All three
models are evaluated on the same held-out tokens (the val split, ``eval.max_tokens`` of the distill
config). ``--quick`` keeps (a) and (b) as they are and measures (c) on two modes only.

How long: the demo's stage times suggest about 20 minutes on 2 idle CPU cores (teacher ~5, cache ~1,
each student ~4, each throughput run ~1) and about 5 fewer with ``--teacher`` or ``--quick``; the
table's footer prints the measured wall time of every part (and this process's CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEACHER_CONFIG = "configs/teacher/small.yaml"
DISTILL_CONFIG = "configs/distill/small.yaml"
ALL_MODES = "zero-0,zero-1,zero-2,zero-3,pipeline"
QUICK_MODES = "zero-1,pipeline"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help=f"throughput (c) on {QUICK_MODES} only; (a) and (b) unchanged"
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="registry ref of a trained teacher of the same data and tokenizer (e.g. teacher@production "
        "after `make demo`); default: pretrain configs/teacher/small.yaml here",
    )
    p.add_argument(
        "--mode-steps", type=int, default=None, help="steps per throughput run (c); default 20, quick 10"
    )
    p.add_argument("--modes", default=None, help=f"throughput modes for (c); default {ALL_MODES}")
    p.add_argument("--workdir", default=None, help="keep runs here (default: a temp dir, removed)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"overrides of {DISTILL_CONFIG} for both students (e.g. steps=200 loss.temperature=2.0)",
    )
    return p.parse_args(argv)


class Clock:
    """Wall and process CPU seconds of one part (CPU: this process; Ray workers report their own)."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.t0, 1),
            "cpu_s": round(time.process_time() - self.c0, 1),
        }


def teacher_and_cache(args: argparse.Namespace, dcfg, work: Path) -> tuple[str, str, dict[str, Any]]:
    """Pretrain (or take) the teacher and build its top-k cache over the windows the students draw."""
    from cluster.config import load_config, schema_for
    from train.teacher import run as run_teacher
    from train.topk import run as run_topk

    windows = dcfg.steps * dcfg.global_batch  # the loader draws exactly these (see cluster.pipeline.stages)
    over = [
        f"out_dir={work / 'teacher'}",
        f"topk.seq_len={dcfg.seq_len}",
        f"topk.max_windows={windows}",
        f"topk.dir={work / 'topk'}",
    ]
    times: dict[str, Any] = {}
    if args.teacher is None:
        os.environ["RETORT_REGISTRY"] = str(work / "registry")  # a temporary registry for this teacher
        clock = Clock()
        ref = str(run_teacher(load_config(TEACHER_CONFIG, schema_for("teacher"), over)))
        times["teacher"] = clock.read()
    else:
        ref = args.teacher
    clock = Clock()
    info = run_topk(load_config(TEACHER_CONFIG, schema_for("teacher"), [*over, f"topk.teacher={ref}"]))
    times["topk"] = clock.read()
    times["topk"]["k"] = info.k
    return ref, info.dir, times


def distill(cfg_overrides: list[str]) -> dict[str, Any]:
    from cluster.config import load_config, schema_for
    from train.distill.job import run

    cfg = load_config(DISTILL_CONFIG, schema_for("distill"), cfg_overrides)
    clock = Clock()
    out = run(cfg)
    out.update(clock.read())
    return out


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.config import load_config, schema_for

    args = parse(argv)
    modes = [
        m.strip() for m in (args.modes or (QUICK_MODES if args.quick else ALL_MODES)).split(",") if m.strip()
    ]
    mode_steps = args.mode_steps or (10 if args.quick else 20)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retort-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    dcfg = load_config(DISTILL_CONFIG, schema_for("distill"), args.overrides)
    teacher_ref, topk_dir, times = teacher_and_cache(args, dcfg, work)
    common = [
        *args.overrides,
        f"teacher={teacher_ref}",
        f"topk.dir={topk_dir}",
        "publish=false",
        "checkpoint_every=1000000",
        "log_every=1000000",
    ]
    ray.init(num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        kd = distill([*common, f"run_dir={work / 'kd'}", "eval.teacher=true"])
        scratch = distill([*common, f"run_dir={work / 'scratch'}", "loss.alpha=0.0", "eval.teacher=false"])
        measured = {}
        for mode in modes:
            o = [
                *common,
                f"run_dir={work / f'mode-{mode}'}",
                f"steps={mode_steps}",
                "warmup_steps=1",
                "eval.max_tokens=1024",
                "eval.teacher=false",
            ]
            if mode == "pipeline":  # 2 stages, labels from the cache, the same global batch
                o += [
                    "mode=pipeline",
                    "pipeline_stages=2",
                    "zero_stage=1",
                    "num_workers=2",
                    f"micro_batch_size={max(1, dcfg.global_batch // 4)}",
                    "grad_accum=4",
                ]
            else:
                o += [f"zero_stage={int(mode.split('-')[1])}"]
            measured[mode] = distill(o)
    finally:
        ray.shutdown()
    times.update(
        kd=_clock(kd), scratch=_clock(scratch), total={"wall_s": round(time.perf_counter() - t_all, 1)}
    )
    print_table(kd, scratch, measured, dcfg, teacher_ref, mode_steps, times, argv)
    (work / "bench.json").write_text(
        json.dumps({"kd": kd, "scratch": scratch, "modes": measured, "times": times}, indent=2, default=str)
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _clock(out: dict[str, Any]) -> dict[str, float]:
    return {k: out[k] for k in ("wall_s", "cpu_s")}


def print_table(
    kd: dict,
    scratch: dict,
    modes: dict,
    dcfg,
    teacher_ref: str,
    mode_steps: int,
    times: dict[str, Any],
    argv: list[str] | None,
) -> None:
    cmd = shlex.join(["python", "-m", "train.bench", *(sys.argv[1:] if argv is None else argv)])
    tok = dcfg.steps * dcfg.global_batch * dcfg.seq_len
    loss = dcfg.loss
    print()
    print(f"$ {cmd}")
    print(
        f"Distillation benchmark: teacher {teacher_ref} ({TEACHER_CONFIG}), student {dcfg.student_preset} "
        f"({DISTILL_CONFIG}), {dcfg.steps} steps x {dcfg.global_batch} x {dcfg.seq_len} = {tok:,} tokens, "
        f"{dcfg.num_workers} CPU workers, KD {loss.kind} alpha={loss.alpha} T={loss.temperature} from the "
        f"teacher's top-{times['topk']['k']} cache; held-out: {kd['eval_tokens']:,} "
        f"val tokens at context {kd['eval_seq_len']}, the same for all three models"
    )
    print()
    print("| row | measured | baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    r = kd["val_ppl"] / scratch["val_ppl"]
    print(
        f"| (a) held-out ppl: KD student vs same student from scratch | {fmt(kd['val_ppl'])} | "
        f"{fmt(scratch['val_ppl'])} | {r:.3f} | <= 0.90 {'OK' if r <= 0.9 else 'MISSED'} |"
    )
    r2 = kd["val_ppl"] / kd["teacher_val_ppl"]
    print(
        f"| (b) student ppl vs teacher ppl (params {kd['params']:,} vs {kd['teacher_params']:,} = "
        f"{kd['param_ratio']:.2f}x) | {fmt(kd['val_ppl'])} | {fmt(kd['teacher_val_ppl'])} | {r2:.3f} | "
        f"<= 1.30 at <= 0.25x params {'OK' if r2 <= 1.3 and kd['param_ratio'] <= 0.25 else 'MISSED'} |"
    )
    first = next(iter(modes), None)
    ref = modes[first]["train_tokens_per_s"] if first else None
    for name, m in modes.items():
        tps = m["train_tokens_per_s"]
        print(
            f"| (c) tokens/s {name} (2 workers, {mode_steps} steps) | {fmt(tps)} | {fmt(ref)} ({first}) | "
            f"{tps / ref:.2f} | - |"
        )
    print()
    print(f"retention (teacher ppl / student ppl): KD {kd['retention']:.3f}")
    parts = ", ".join(
        f"{k} {v['wall_s']:.0f} s" + (f" ({v['cpu_s']:.0f} CPU-s in this process)" if "cpu_s" in v else "")
        for k, v in times.items()
        if "wall_s" in v
    )
    print(
        f"wall: {parts}. The distill jobs' CPU is in their Ray workers; on a shared machine tokens/s are noisy."
    )


def cli(argv: list[str] | None = None) -> int:
    from cluster.errors import ConfigError

    try:
        return main(argv)
    except ConfigError as e:  # a bad override: one line, exit 2, before anything runs
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
