"""Where a distillation worker's checkpoints come from and go: Ray Train (``RayHooks``:
``ray.train.report`` / ``get_checkpoint``) or a plain run directory for torchrun (``DirHooks``).
``train.distill.loop.run_worker`` takes either."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist


class Hooks:
    """Where checkpoints come from and go (Ray Train or a plain directory for torchrun)."""

    def restored_dir(self):  # -> contextmanager yielding a directory path or None
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        raise NotImplementedError

    def settle(self, timeout: float = 120.0) -> None:
        """Block until the last reported checkpoint is durable (before an injected crash)."""


class RayHooks(Hooks):
    """Ray Train V2: checkpoints go through ``ray.train.report``; restarts read ``get_checkpoint()``.

    ``snapshot`` is the controller's checkpoint-manager snapshot in the run's storage; the
    controller (re)writes it when it registers a reported checkpoint, which happens when it next
    polls the workers (every ~2 s), not inside ``report``.
    """

    def __init__(self, snapshot: str | None = None) -> None:
        self.snapshot, self.last_ckpt = snapshot, 0.0

    def settle(self, timeout: float = 120.0) -> None:
        if not self.snapshot or not self.last_ckpt:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(self.snapshot) and os.path.getmtime(self.snapshot) >= self.last_ckpt:
                return
            time.sleep(0.2)

    def restored_dir(self):
        import contextlib

        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return contextlib.nullcontext(None)
        return ckpt.as_directory()

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        import ray.train

        if ckpt_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
        self.last_ckpt = time.time()
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # persisted into the run's storage by now


class DirHooks(Hooks):
    """torchrun: checkpoints under ``<run_dir>/checkpoints/step_N`` (rank 0 renames; all ranks write first)."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep

    def restored_dir(self):
        import contextlib

        done = (
            sorted(self.root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
            if self.root.is_dir()
            else []
        )
        return contextlib.nullcontext(str(done[-1]) if done else None)

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        final = bool(metrics.get("final"))
        if not final and ckpt_dir is None:
            return  # plain metrics: the JSONL log has them
        target = self.root.parent / "final" if final else self.root / f"step_{metrics['step']}"
        dirs = _gathered_dirs(ckpt_dir)  # every rank's temp dir (single-node torchrun: all local)
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for src in dirs:
                if src:
                    shutil.copytree(src, tmp, dirs_exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            done = sorted(self.root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _gathered_dirs(mine: str | None) -> list[str | None]:
    dirs: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, mine)
    return dirs
