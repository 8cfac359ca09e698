"""``train_loop_per_worker``: one DeepSpeed engine per worker, KD steps, checkpoints, exact resume.

The same ``run_worker`` serves Ray Train (``RayHooks``: ``ray.train.report`` /
``get_checkpoint``) and plain torchrun (``train.distill.torchrun_main``: checkpoints in the
run dir). What a step does:

- zero mode: draw this rank's rows of the global batch (``packed_batches(start_step=step)``),
  split them into ``grad_accum`` micro-batches; per micro-batch the teacher side (online
  frozen teacher under ``no_grad``, or the top-k cache looked up by window index) and the
  student's ``kd_loss`` (``fused_kd``: ``fused_kd_loss`` from both models' final hidden states,
  no full logits); ``engine.backward`` + ``engine.step`` (DeepSpeed steps the optimizer and the
  LR scheduler at the accumulation boundary). The step's metrics stay on the device until one
  all-reduce and one host read per step.
- pipeline mode: the same rows as ``grad_accum`` micro-batches ``(tokens, (labels, ids,
  logprobs))`` through ``engine.train_batch``; the last stage computes KD.

A checkpoint holds DeepSpeed's own files (module, optimizer, scheduler; all ranks save) plus
``meta.json`` (step, config hash) and each rank's RNG state, so a restart resumes at exactly
the next step with the same data, optimizer moments, LR and RNG (ray#46814: the loop itself
must load ``get_checkpoint()``).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cluster.config.distill import DistillConfig
from cluster.errors import RetortError
from cluster.model import Transformer
from train.distill.hooks import Hooks

FAULT_ENV = "RETORT_DISTILL_FAULT"  # "STEP:RANK:MARKER": os._exit(1) once at STEP on RANK (tests)
META = "meta.json"


@dataclass
class Plan:
    """What the driver resolved before any worker started (all JSON-serialisable)."""

    data_dir: str
    vocab_size: int  # the tokenizer's real vocab (logits are sliced to it)
    teacher_dir: str | None  # resolved teacher (online teacher and teacher ppl)
    topk_dir: str | None
    config_hash: str
    job_id: str
    metrics_path: str  # rank 0 appends one JSON line per step


class DistillModule(nn.Module):
    """The trained module: the student [+ the hidden-state projector]; ``x (B, T) -> (logits, hidden|None)``.

    ``head=False`` (the fused KD loss) skips the LM head: ``x -> (None, final hidden (B, T, d))``.
    """

    def __init__(self, student: Transformer, projector: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, x: torch.Tensor, head: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not head:
            from train.distill.fused_kd import decoder_hidden

            return None, decoder_hidden(self.student, x)
        if self.projector is None:
            return self.student(x), None
        return self.student(x, return_hidden=True)


# ---------------------------------------------------------------------------------------------- setup


def device_for(cfg: DistillConfig) -> torch.device:
    if cfg.use_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_student(cfg: DistillConfig, teacher_d: int | None) -> DistillModule:
    from train.distill.losses import HiddenProjector

    torch.manual_seed(cfg.seed)
    if cfg.student_init is not None:  # make_plan pinned it to a verified checkpoint directory
        student = Transformer.from_pretrained(cfg.student_init).float()
    else:
        student = Transformer(cfg.student_model()).init_weights(cfg.seed)
    proj = None
    if cfg.loss.hidden_weight > 0:
        if teacher_d is None:
            raise RetortError("loss.hidden_weight > 0 needs the online teacher's hidden size")
        proj = HiddenProjector(student.cfg.d_model, teacher_d)
    return DistillModule(student, proj)


def load_teacher(plan: Plan, device: torch.device, bf16: bool) -> Transformer:
    if plan.teacher_dir is None:
        raise RetortError("no teacher directory was resolved")
    t = Transformer.from_pretrained(plan.teacher_dir, device=device, dtype=torch.bfloat16 if bf16 else None)
    t.eval().requires_grad_(False)
    return t


def build_engine(cfg: DistillConfig, module: DistillModule, plan: Plan):
    """DeepSpeed engine over ``module`` with torch AdamW and a warm-up + cosine LambdaLR."""
    import deepspeed

    from train.distill.ds_config import deepspeed_config, lr_lambda, param_groups

    ds_cfg = deepspeed_config(cfg)
    if cfg.mode == "pipeline":
        from train.distill.pipeline import PipeKDLoss, build_pipeline

        loss_fn = PipeKDLoss(cfg.loss, plan.vocab_size)
        module = build_pipeline(module.student, cfg.pipeline_stages, loss_fn, cfg.seed)
    # CUDA: torch's fused AdamW (one kernel over DeepSpeed's flat fp32 partition); CPU: the reference loop
    fused = cfg.use_gpu and not cfg.offload_optimizer
    opt = torch.optim.AdamW(
        param_groups(module, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        fused=fused,
        foreach=False if fused else cfg.use_gpu,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    return engine


# ---------------------------------------------------------------------------------------------- data


class Batches:
    """This rank's rows of each global batch, resumable at any step, with the teacher side attached."""

    def __init__(self, cfg: DistillConfig, plan: Plan, dp_rank: int, start_step: int) -> None:
        from train.data import load_split
        from train.data.loader import packed_batches

        self.cfg = cfg
        tokens = load_split(plan.data_dir, "train")
        self.cache = None
        if cfg.teacher_source == "topk":
            from train.topk import TopKCache

            self.cache = TopKCache(plan.topk_dir, verify=False)  # the driver verified every shard
            tokens = tokens[: self.cache.token_limit]  # draw only cached windows
        per_rank = cfg.micro_batch_size * cfg.grad_accum  # the loader's batch_size is per rank
        self.it = packed_batches(
            tokens,
            cfg.seq_len,
            per_rank,
            seed=cfg.seed,
            rank=dp_rank,
            world_size=cfg.dp_world,
            start_step=start_step,
        )

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        """-> ``grad_accum`` micro-batches ``(x (b, T), y (b, T), topk (ids, logprobs) (b, T, k) | None)``."""
        widx, xy = next(self.it)  # (B,), (B, T+1)
        b = self.cfg.micro_batch_size
        if xy.shape[0] != b * self.cfg.grad_accum:
            raise RetortError(f"loader gave {xy.shape[0]} rows, expected {b * self.cfg.grad_accum} per rank")
        topk = self.cache.lookup(widx) if self.cache is not None else None
        out = []
        for i in range(self.cfg.grad_accum):
            sl = slice(i * b, (i + 1) * b)
            x, y = xy[sl, :-1].long(), xy[sl, 1:].long()
            tk = None
            if topk is not None:
                tk = (torch.as_tensor(topk[0][sl]).long(), torch.as_tensor(topk[1][sl]).float())
            out.append((x, y, tk))
        return out


# ---------------------------------------------------------------------------------------------- steps


def zero_step(
    engine, micro, teacher: Transformer | None, cfg: DistillConfig, plan: Plan, device
) -> dict[str, torch.Tensor]:
    """One optimizer step over ``micro``; returns the micro-batch means as float64 device scalars (no host sync)."""
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "kd", "ce")}
    for x, y, tk in micro:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.fused_kd and teacher is not None:
            out = fused_micro_loss(engine, teacher, x, y, cfg, plan)
        else:
            out = micro_loss(engine, teacher, x, y, tk, cfg, plan)
        engine.backward(out["loss"])
        engine.step()
        for k in sums:
            sums[k] += out[k].detach().double() / len(micro)
    return sums


def micro_loss(
    engine, teacher: Transformer | None, x: torch.Tensor, y: torch.Tensor, tk, cfg: DistillConfig, plan: Plan
) -> dict[str, torch.Tensor]:
    """The reference KD loss of one micro-batch (``losses.kd_loss`` on both sides' full logits)."""
    from train.distill.losses import DenseTeacher, TopKTeacher, kd_loss

    if teacher is not None:
        hidden = cfg.loss.hidden_weight > 0
        with torch.no_grad():
            t_out = teacher(x, return_hidden=hidden)
        t = DenseTeacher(*t_out) if hidden else DenseTeacher(t_out)
    else:
        t = TopKTeacher(tk[0].to(x.device), tk[1].to(x.device))
    logits, h = engine(x)  # (b, T, V), (b, T, d)|None
    return kd_loss(
        logits,
        t,
        y,
        cfg.loss,
        vocab_size=plan.vocab_size,
        student_hidden=h,
        projector=engine.module.projector,
    )


def fused_micro_loss(
    engine, teacher: Transformer, x: torch.Tensor, y: torch.Tensor, cfg: DistillConfig, plan: Plan
) -> dict[str, torch.Tensor]:
    """The fused KD loss of one micro-batch: neither model's full logits are ever built (``fused_kd.py``)."""
    from train.distill.fused_kd import decoder_hidden, fused_kd_loss

    with torch.no_grad():
        h_t = decoder_hidden(teacher, x)  # (b, T, d_t)
    _, h = engine(x, head=False)  # (b, T, d): the engine's forward, without the LM head
    module = engine.module
    return fused_kd_loss(
        h,
        module.student.lm_head.weight,
        h_t,
        teacher.lm_head.weight,
        y,
        cfg.loss,
        vocab_size=plan.vocab_size,
        projector=module.projector,
        compile=cfg.compile,
    )


def pipeline_step(engine, micro) -> dict[str, float]:
    data = iter([(x, (y, tk[0], tk[1])) for x, y, tk in micro])
    loss = engine.train_batch(data_iter=data)  # mean over micro-batches, same on every stage
    kd, ce = engine.module.loss_fn.pop_means() if engine.is_last_stage() else (0.0, 0.0)
    parts = torch.tensor([kd, ce], dtype=torch.float64)  # zeros except on last-stage ranks
    dist.all_reduce(parts)  # every last-stage rank holds its dp shard's kd/ce
    parts /= engine.grid.get_data_parallel_world_size()
    return {"loss": float(loss), "kd": float(parts[0]), "ce": float(parts[1])}


def mean_over_dp(vals: dict[str, torch.Tensor], device) -> dict[str, float]:
    """Mean of each rank's step metrics (device scalars): one all-reduce and one host sync per step."""
    t = torch.stack([vals["loss"], vals["kd"], vals["ce"]]).to(device, torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    loss, kd, ce = t.tolist()
    return {"loss": loss, "kd": kd, "ce": ce}


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(engine, step: int, cfg: DistillConfig, plan: Plan, rank: int) -> str:
    """All ranks: DeepSpeed checkpoint + meta + this rank's RNG into a fresh temp dir; returns it."""
    d = tempfile.mkdtemp(prefix=f"retort-ckpt-{step}-")
    tag = f"step{step}"
    engine.save_checkpoint(d, tag=tag, client_state={"step": step})
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if cfg.use_gpu else None,
        },
        Path(d) / f"rng_rank{rank}.pt",
    )
    if rank == 0:
        (Path(d) / META).write_text(
            json.dumps(
                {
                    "kind": "deepspeed",
                    "step": step,
                    "tag": tag,
                    "config_hash": plan.config_hash,
                    "mode": cfg.mode,
                    "zero_stage": cfg.zero_stage,
                    "num_workers": cfg.num_workers,
                }
            )
        )
    return d


def read_meta(d: str | Path) -> dict[str, Any]:
    p = Path(d) / META
    if not p.is_file():
        raise RetortError(f"checkpoint {d} has no {META}: not a Retort distill checkpoint")
    return json.loads(p.read_text())


def check_resumable(meta: dict[str, Any], plan: Plan, where: str) -> None:
    if meta.get("config_hash") != plan.config_hash:
        raise RetortError(
            f"cannot resume from {where}: it was written with training config {meta.get('config_hash')}, this run's is "
            f"{plan.config_hash} (a field that shapes training changed); use a new run_dir or restore the old config"
        )


def load_checkpoint(engine, d: str, plan: Plan, rank: int) -> int:
    """Restore engine, optimizer, scheduler and RNG from ``d``; return the step to continue from."""
    meta = read_meta(d)
    check_resumable(meta, plan, d)
    if meta.get("kind") != "deepspeed":
        raise RetortError(
            f"{d} is the finished run's exported student, not a training checkpoint: "
            "this run dir is complete; choose a new run_dir"
        )
    path, _ = engine.load_checkpoint(
        d, tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RetortError(f"DeepSpeed found no checkpoint under {d} (tag {meta['tag']})")
    rng_file = Path(d) / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------- fault injection


def maybe_crash(step: int, rank: int, hooks: Hooks) -> None:
    """Tests: a real worker crash (``os._exit``) once, at ``STEP`` on ``RANK``, if ``MARKER`` is absent.

    It first waits until the last checkpoint is registered, as it would be for any crash that
    comes more than one controller poll after a report (otherwise the restart would, correctly,
    resume from the checkpoint before it, and the test would not know which one).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        hooks.settle()
        Path(marker).write_text(f"crashed at step {step} on rank {rank}\n")
        print(f"[fault injection] rank {rank} exits at step {step}", flush=True)
        os._exit(1)


# ---------------------------------------------------------------------------------------------- the loop


class StepMetrics:
    """Per-step metrics: ray.util.metrics gauges (if Ray is up), a JSONL log and the rank-0 bar."""

    def __init__(self, cfg: DistillConfig, plan: Plan, rank: int, start: int, use_ray: bool) -> None:
        from tqdm import tqdm

        self.rank, self.plan = rank, plan
        self.gauges: dict[str, Any] = {}
        if use_ray and rank == 0:
            from cluster import metrics as M

            tags = {"job": plan.job_id, "mode": f"{cfg.mode}-{cfg.zero_stage}"}
            for key, m in (
                ("loss", M.TRAIN_LOSS),
                ("kd", M.TRAIN_KD_LOSS),
                ("ce", M.TRAIN_CE_LOSS),
                ("tok_s", M.TRAIN_TOKENS_PER_S),
                ("step_time", M.TRAIN_STEP_TIME),
                ("step", M.TRAIN_STEP),
                ("workers", M.TRAIN_WORKERS),
            ):
                self.gauges[key] = M.make(m, tags)
        self.bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc=f"distill {cfg.mode}",
            disable=rank != 0,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        for k, g in self.gauges.items():
            g.set(float(row[k]))
        with open(self.plan.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            kd=f"{row['kd']:.4f}",
            ce=f"{row['ce']:.4f}",
            tok_s=f"{row['tok_s']:.0f}",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def compile_blocks(*models: Transformer | None) -> None:
    """``nn.Module.compile`` every decoder block in place (parameter names, checkpoints and the HF export
    are unchanged; one graph per block shape, reused by all layers)."""
    for m in models:
        if m is not None:
            for block in m.model.layers:
                block.compile()


def teacher_flops_per_token(cfg: DistillConfig, teacher: Transformer | None) -> float:
    """Forward FLOPs per token of the online teacher (``2·N + 4·L·T·H·D``); 0 for the top-k cache."""
    if teacher is None:
        return 0.0
    m = teacher.cfg
    attn = m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.dim_head + m.n_heads * m.dim_head * m.d_model
    n = m.n_layers * (attn + 3 * m.d_model * m.d_ff) + m.vocab_size * m.d_model
    return 2.0 * n + 4.0 * m.n_layers * cfg.seq_len * m.n_heads * m.dim_head


def flops_per_token(cfg: DistillConfig) -> float:
    """Student training FLOPs per token (PaLM's MFU convention): ``6·N + 12·L·T·H·D``.

    ``N`` counts every matmul weight (blocks and LM head; the embedding lookup is free), the second
    term is attention's QK^T and AV (forward 4·L·T·H·D per token, x3 with backward; no causal discount). The
    online teacher's forward (2·N_teacher per token) is extra work not counted here.
    """
    m = cfg.student_model()
    attn = m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.dim_head + m.n_heads * m.dim_head * m.d_model
    n = m.n_layers * (attn + 3 * m.d_model * m.d_ff) + m.vocab_size * m.d_model  # blocks + LM head
    return 6.0 * n + 12.0 * m.n_layers * cfg.seq_len * m.n_heads * m.dim_head


def run_worker(cfg: DistillConfig, plan: Plan, hooks: Hooks, use_ray: bool) -> dict[str, Any]:
    """The whole per-worker job; returns the final metrics (rank 0 also writes the HF export)."""
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # reuses the existing group
    device = device_for(cfg)
    if cfg.use_gpu and cfg.bf16:
        torch.set_float32_matmul_precision("high")  # bf16 run: the few fp32 matmuls (projector) may use TF32
    seed_all(cfg.seed)
    teacher = None
    if cfg.teacher_source == "online":
        teacher = load_teacher(plan, device, cfg.bf16 and cfg.use_gpu)
    module = build_student(cfg, teacher.cfg.d_model if teacher is not None else None)
    if cfg.compile:
        compile_blocks(module.student, teacher)
    engine = build_engine(cfg, module, plan)
    step = 0
    with hooks.restored_dir() as d:
        if d is not None:
            step = load_checkpoint(engine, d, plan, rank)
            if rank == 0:
                print(f"resumed from {d} at step {step}", flush=True)
    dp_rank = engine.grid.get_data_parallel_id() if cfg.mode == "pipeline" else rank
    batches = Batches(cfg, plan, dp_rank, start_step=step)
    log = StepMetrics(cfg, plan, rank, step, use_ray)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    engine.train()
    times: list[float] = []
    while step < cfg.steps:
        maybe_crash(step, rank, hooks)
        t0 = time.perf_counter()
        micro = batches.next_step()
        if cfg.mode == "pipeline":
            vals = pipeline_step(engine, micro)
        else:
            vals = mean_over_dp(zero_step(engine, micro, teacher, cfg, plan, device), device)
        if cfg.use_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        times.append(dt)
        step += 1
        row = {
            "step": step,
            **vals,
            "lr": engine.get_lr()[0],
            "step_time": dt,
            "tok_s": tokens_per_step / dt,
            "workers": world,
        }
        log.log(row)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            hooks.report(row, save_checkpoint(engine, step, cfg, plan, rank))
        elif step % cfg.log_every == 0:
            hooks.report(row, None)
    log.close()
    warm = 3 if cfg.compile and len(times) > 6 else 1  # the first step(s) of a process warm up / compile
    steady = times[warm:] or times
    stats = {
        "train_tokens_per_s": tokens_per_step * len(steady) / max(sum(steady), 1e-9) if steady else 0.0,
        "flops_per_token": flops_per_token(cfg),
        "teacher_flops_per_token": teacher_flops_per_token(cfg, teacher),
        "steps_this_attempt": len(times),
    }
    return {"engine": engine, "teacher": teacher, "step": step, "stats": stats}
