"""Start background servers and stop exactly the processes we started.

``ray stop`` kills every Ray process on the machine, including other users' clusters, so Retort
never calls it. Instead each server is started in a new session (its own process group), its
processes carry a marker in their environment, and stopping collects:

* every process in the server's process group,
* every process whose environment holds our marker (Ray workers rename their command line to
  ``ray::Task`` and call ``setpgid``, but they inherit the raylet's environment),
* every descendant of those (job drivers, Serve replicas),

then sends SIGTERM, waits, and SIGKILLs what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

MARKER_ENV = "RETORT_PROCESS_SCOPE"


def spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` detached in a new session with stdout/stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )


def alive(pid: int | None) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def scope_processes(scope: str, pgids: Iterable[int] = ()) -> list[psutil.Process]:
    """Processes that belong to ``scope`` (marker env var), or to one of ``pgids``, and their descendants."""
    pgids = {g for g in pgids if g}
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if (pgids and os.getpgid(p.pid) in pgids) or p.environ().get(MARKER_ENV) == scope:
                found[p.pid] = p
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if c.pid != me:
                    found.setdefault(c.pid, c)
        except psutil.Error:
            continue
    return list(found.values())


def terminate(procs: list[psutil.Process], grace_s: float = 10.0) -> int:
    """SIGTERM ``procs``, wait up to ``grace_s``, SIGKILL the rest. Returns how many were signalled."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)
    return len(procs)


def stop_scope(scope: str, pgids: Iterable[int] = (), grace_s: float = 10.0) -> int:
    """Stop every process of ``scope`` (see module doc). Loops until nothing of it is left."""
    total = 0
    for _ in range(5):
        procs = scope_processes(scope, pgids)
        if not procs:
            break
        total += terminate(procs, grace_s)
        time.sleep(0.2)
    return total
