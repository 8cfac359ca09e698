"""The distillation driver: check everything, run a Ray Train ``TorchTrainer``, publish the student.

``run(cfg)`` is what ``python -m train.distill -c FILE`` (and so ``ray job submit`` and
``retort distill``) calls. Before any worker starts it prepares the data, resolves the teacher
from the registry (sha256-verified), refuses a teacher whose tokenizer differs from the data's,
opens and verifies the top-k cache against the data, window length and teacher, and refuses to
resume a run directory that was started with a different training config. Then N workers run
``train.distill.loop`` under ``FailureConfig(max_failures)``: a crashed worker restarts the
group, which resumes from the last reported checkpoint. Rank 0 evaluates the final student; the
driver copies it to ``<run_dir>/student`` and publishes it with its lineage and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.config.base import dump_yaml
from cluster.config.distill import DistillConfig
from cluster.errors import JobFailed, RetortError
from train.distill.loop import FAULT_ENV, Plan

RUN_CONFIG = "config.json"  # <run_dir>/config.json: the training hash a resume must match
TORCH_EXT = "~/.cache/retort/torch_extensions"


def run_dir_of(cfg: DistillConfig) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(cfg.run_dir))).resolve()


def check_run_dir(cfg: DistillConfig, run_dir: Path) -> bool:
    """Refuse to resume a run dir written by another training config; returns True if resuming."""
    marker = run_dir / RUN_CONFIG
    has_ckpt = any((run_dir / "ray").glob("*/checkpoint_*")) or any((run_dir / "checkpoints").glob("step_*"))
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old.get("training_hash") != cfg.training_hash() and has_ckpt:
            raise RetortError(
                f"{run_dir} holds checkpoints of a run with a different training config "
                f"({old.get('training_hash')} != {cfg.training_hash()}); resume with the same config "
                "or choose a new run_dir"
            )
    if (run_dir / "result.json").is_file():
        raise RetortError(
            f"{run_dir} holds a finished run (see its result.json and student/): choose a new run_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(
        json.dumps({"training_hash": cfg.training_hash(), "config": cfg.model_dump(mode="json")}, indent=2)
        + "\n"
    )
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return has_ckpt


def make_plan(cfg: DistillConfig, job_id: str) -> tuple[Plan, dict[str, Any]]:
    """Everything the workers need, checked: data, teacher (+ tokenizer match), top-k cache, run dir."""
    from cluster.registry import open_registry
    from train.data import prepare
    from train.distill.losses import check_same_tokenizer

    data = prepare(cfg.data)
    reg = open_registry(cfg.registry)
    init_ref = pin_student_init(cfg, reg, data.tokenizer_sha256) if cfg.student_init else None
    student = cfg.student_model()
    if student.vocab_size < data.vocab_size:
        raise RetortError(f"student vocab_size {student.vocab_size} < the tokenizer's {data.vocab_size}")
    teacher_ref = reg.ref(cfg.teacher)  # name@alias -> name:N, pinned for the lineage
    teacher_dir = reg.resolve(teacher_ref)
    check_same_tokenizer(teacher_dir, data.tokenizer_sha256)
    teacher_cfg = json.loads((Path(teacher_dir) / "config.json").read_text())
    if teacher_cfg.get("vocab_size", 0) < data.vocab_size:
        raise RetortError(
            f"teacher {teacher_ref} has vocab_size {teacher_cfg.get('vocab_size')} < the tokenizer's {data.vocab_size}"
        )
    topk_dir = None
    if cfg.teacher_source == "topk":
        from train.topk import TopKCache, weights_sha256

        cache = TopKCache(
            find_topk_dir(cfg, Path(data.dir), teacher_ref), verify=True
        )  # every shard's sha256: missing/corrupt -> error here
        cache.check(
            data_fingerprint=data.fingerprint, seq_len=cfg.seq_len, teacher_sha256=weights_sha256(teacher_dir)
        )
        topk_dir = str(cache.dir.resolve())
    run_dir = run_dir_of(cfg)
    resuming = check_run_dir(cfg, run_dir)
    plan = Plan(
        data_dir=str(data.dir),
        vocab_size=data.vocab_size,
        teacher_dir=str(teacher_dir),
        topk_dir=topk_dir,
        config_hash=cfg.training_hash(),
        job_id=job_id,
        metrics_path=str(run_dir / "metrics.jsonl"),
    )
    info = {
        "teacher_ref": str(teacher_ref),
        "data_fingerprint": data.fingerprint,
        "tokenizer_sha256": data.tokenizer_sha256,
        "tokenizer_dir": str(data.tokenizer_dir),
        "run_dir": str(run_dir),
        "resuming": resuming,
        "student_init_ref": init_ref,
    }
    return plan, info


def pin_student_init(cfg: DistillConfig, reg, tokenizer_sha256: str) -> str:
    """Resolve ``cfg.student_init`` (sha256-verified when from the registry) and pin it in ``cfg``.

    Afterwards ``cfg.student_init`` is the checkpoint directory and ``cfg.student`` its
    architecture, so the workers (which may not see the driver's registry settings) load exactly
    that checkpoint, and the training hash covers both. Returns the pinned ref (``name:N``) or the
    directory, for the lineage. Refuses an explicit student / student_preset that differs from the
    checkpoint's architecture, a quantized checkpoint and a tokenizer other than the data's.
    """
    from pydantic import ValidationError

    from cluster.checkpoint import config_from_hf, read_hf_config
    from cluster.config.distill import init_is_dir
    from cluster.config.model import preset
    from train.distill.losses import check_same_tokenizer

    given = cfg.student_init
    if init_is_dir(given):
        path = Path(given).expanduser().resolve()
        ref = str(path)
    else:
        pinned = reg.ref(given)  # unknown name / version / alias -> one-line RetortError
        path, ref = Path(reg.resolve(pinned)), str(pinned)
    hf = read_hf_config(path)
    if hf.get("quantization_config"):
        raise RetortError(
            f"student_init {ref} is quantized ({hf['quantization_config'].get('scheme')}); "
            "distillation trains floating-point weights"
        )
    arch = config_from_hf(hf, source=str(path / "config.json"))
    if cfg.student is not None:
        explicit, what = cfg.student, "student"
    elif "student_preset" in cfg.model_fields_set:
        explicit, what = preset(cfg.student_preset), f"student_preset {cfg.student_preset!r}"
    else:
        explicit = None
    ignore = {"init_std"}  # only shapes fresh weights
    if explicit is not None and explicit.model_dump(exclude=ignore) != arch.model_dump(exclude=ignore):
        diff = ", ".join(
            f"{k} {v} != {getattr(arch, k)}"
            for k, v in explicit.model_dump(exclude=ignore).items()
            if getattr(arch, k) != v
        )
        raise RetortError(
            f"{what} conflicts with student_init {ref} ({diff}): the architecture comes from the "
            "checkpoint; drop the explicit one"
        )
    try:
        check_same_tokenizer(path, tokenizer_sha256)
    except RetortError as e:
        raise RetortError(f"student_init {ref}: {e}") from None
    try:
        cfg.student_init, cfg.student = str(path), arch
    except ValidationError as e:
        raise RetortError(
            f"student_init {ref}: {e.errors()[0]['msg'].removeprefix('Value error, ')}"
        ) from None
    return ref


def find_topk_dir(cfg: DistillConfig, data_dir: Path, teacher_ref) -> Path:
    """``topk.dir``, or the one cache ``train.topk`` wrote by default for this teacher version and seq_len."""
    if cfg.topk.dir:
        return Path(os.path.expandvars(os.path.expanduser(cfg.topk.dir)))
    found = sorted((data_dir / "topk").glob(f"{teacher_ref.name}-v{teacher_ref.version}-L{cfg.seq_len}-k*"))
    if len(found) != 1:
        what = (
            "no top-k cache"
            if not found
            else f"{len(found)} top-k caches ({', '.join(p.name for p in found)})"
        )
        raise RetortError(
            f"{what} for teacher {teacher_ref} at seq_len {cfg.seq_len} under {data_dir / 'topk'}: build one with "
            f"`python -m train.topk -c configs/teacher/<preset>.yaml topk.seq_len={cfg.seq_len}` or set topk.dir"
        )
    return found[0]


def lineage_of(cfg: DistillConfig, info: dict[str, Any], job_id: str) -> dict[str, Any]:
    init = (
        [info["student_init_ref"]] if info.get("student_init_ref") else []
    )  # a fine-tuned checkpoint's origin
    return {
        "parents": [info["teacher_ref"], *init],
        "dataset_fingerprint": info["data_fingerprint"],
        "tokenizer_sha256": info["tokenizer_sha256"],
        "config": cfg.model_dump(mode="json"),
        "ray_job_id": job_id,
        "kind": "distill",
        "mode": cfg.mode,
        "zero_stage": cfg.zero_stage,
    }


def init_ray(cfg: DistillConfig) -> str:
    """Join the cluster (``ray job submit`` / RAY_ADDRESS) or start a local one sized for the workers."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            need = cfg.num_workers * cfg.cpus_per_worker
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, int(need) + 1),
                num_gpus=cfg.num_workers if cfg.use_gpu else 0,
                object_store_memory=256 * 1024**2,
                include_dashboard=False,
            )
    return ray.get_runtime_context().get_job_id()


def worker_env() -> dict[str, str]:
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser(TORCH_EXT),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the worker group runs this on every rank."""
    from train.distill.export import finish_worker
    from train.distill.hooks import RayHooks
    from train.distill.loop import run_worker

    cfg = DistillConfig.model_validate(config["cfg"])
    plan = Plan(**config["plan"])
    hooks = RayHooks(config["snapshot"])
    res = run_worker(cfg, plan, hooks, use_ray=True)
    finish_worker(cfg, plan, res, hooks, config["tokenizer_dir"], res["stats"])


def fit(cfg: DistillConfig, plan: Plan, info: dict[str, Any]):
    """Run the TorchTrainer; returns Ray Train's ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(info["run_dir"])
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": asdict(plan),
            "tokenizer_dir": info["tokenizer_dir"],
            "snapshot": str(run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="train",  # fixed: re-running the same run_dir resumes from its last checkpoint
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; name the stage and the logs
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if isinstance(cause, RetortError):
            raise
        raise JobFailed(
            f"distill training failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:400]} "
            f"(worker logs: Ray Train output above; run dir {run_dir})"
        ) from e


def run(cfg: DistillConfig) -> dict[str, Any]:
    """The job: plan, train, copy the student to the run dir, publish; returns the final metrics."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(TORCH_EXT))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    job_id = init_ray(cfg)
    plan, info = make_plan(cfg, job_id)
    print(
        f"distill: {cfg.mode} (ZeRO-{cfg.zero_stage}) x{cfg.num_workers} workers, teacher {info['teacher_ref']}, "
        f"{cfg.steps} steps x {cfg.global_batch} x {cfg.seq_len} tokens, run dir {info['run_dir']}"
        f"{' (resuming)' if info['resuming'] else ''}",
        flush=True,
    )
    result = fit(cfg, plan, info)
    metrics = dict(result.metrics or {})
    if not metrics.get("final") or result.checkpoint is None:
        raise JobFailed(f"distill finished without a final student (last metrics: {metrics})")
    out = Path(info["run_dir"]) / "student"
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(Path(d) / "hf", out)
    metrics = {k: v for k, v in metrics.items() if k not in ("final",)}
    if cfg.publish:
        ref = publish_and_print(cfg, out, metrics, lineage_of(cfg, info, job_id))
        metrics["ref"] = ref
    (Path(info["run_dir"]) / "result.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def publish_and_print(cfg: DistillConfig, out: Path, metrics: dict[str, Any], lineage: dict[str, Any]) -> str:
    from train.distill.export import publish_student

    ref = publish_student(cfg, out, metrics, lineage)
    print(
        f"published {ref}" + (f" (@{cfg.publish_alias})" if cfg.publish_alias else ""),
        file=sys.stderr,
        flush=True,
    )
    import ray

    if ray.is_initialized():  # workers' late log lines are forwarded to this stdout until we disconnect
        ray.shutdown()
    print(ref, flush=True)  # last stdout line: the registry ref
    return ref
