"""Run one stage as a subprocess with a live progress line and a log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import JobFailed

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 20.0
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def fmt_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


@dataclass
class StageRun:
    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    lines: deque = field(
        default_factory=lambda: deque(maxlen=200)
    )  # stdout and stderr, for progress and errors
    out: deque = field(
        default_factory=lambda: deque(maxlen=50)
    )  # stdout only: a stage's result is its last line

    def last_line(self, stdout_only: bool = False) -> str:
        for line in reversed(self.out if stdout_only else self.lines):
            if line.strip():
                return line.strip()
        return ""


def _pump(stream, run: StageRun, fh, lock: threading.Lock, is_stdout: bool) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        # progress bars redraw with \r; keep the latest frame only
        line = ANSI.sub("", line.split("\r")[-1])
        with lock:
            fh.write(line + "\n")
            fh.flush()
            run.lines.append(line)
            if is_stdout:
                run.out.append(line)


def execute(run: StageRun, index: int, total: int, ok_codes: tuple[int, ...] = (0,)) -> tuple[str, float]:
    """Run ``run.cmd``; return (last non-empty stdout line, seconds). Raise JobFailed on failure."""
    run.log.parent.mkdir(parents=True, exist_ok=True)
    print(f"▶ [{index}/{total}] {run.name:<9} started   (logs: {run.log})", flush=True)
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **run.env}
    with open(run.log, "w") as fh:
        fh.write(f"$ {' '.join(run.cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(run.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lock = threading.Lock()
        pumps = [
            threading.Thread(target=_pump, args=(stream, run, fh, lock, stream is proc.stdout), daemon=True)
            for stream in (proc.stdout, proc.stderr)
        ]
        for pump in pumps:
            pump.start()
        while True:
            try:
                rc = proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                tail = run.last_line()[:100]
                print(f"  … {run.name:<9} {fmt_duration(time.monotonic() - t0):>7}  {tail}", flush=True)
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait(timeout=30)
                raise
        for pump in pumps:
            pump.join(timeout=10)
    seconds = time.monotonic() - t0
    if rc not in ok_codes:
        why = next(
            (ln.strip() for ln in reversed(run.lines) if "error" in ln.lower() or "failed" in ln.lower()),
            run.last_line(),
        )
        print(
            f"✘ [{index}/{total}] {run.name:<9} failed after {fmt_duration(seconds)}: {why[:200]}", flush=True
        )
        raise JobFailed(f"stage {run.name!r} failed (exit {rc}): {why[:300]} — full log: {run.log}")
    note = "" if rc == 0 else f" (exit {rc}: {run.last_line()[:80]})"
    print(f"✔ [{index}/{total}] {run.name:<9} done in {fmt_duration(seconds)}{note}", flush=True)
    return run.last_line(stdout_only=True), seconds


def retort_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", *args]
