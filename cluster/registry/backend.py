"""Registry storage: the backend boundary and the local-filesystem backend.

Local layout under the root::

    <name>/versions/<N>/manifest.json + files   one immutable version (files are read-only)
    <name>/aliases/<alias>.json                  {"version": N, ...}, replaced atomically
    <name>/audit.jsonl                           one JSON line per publish / alias move
    <name>/.lock                                 flock for alias moves (released if the holder dies)
    .staging/<uuid>+<pid>+<host>/                publishes in progress (never visible as a version)

Publishing copies into a private staging folder, writes ``manifest.json`` last, then renames
the folder to ``versions/<max+1>`` with ``renameat2(RENAME_NOREPLACE)`` (plain ``rename``
onto a non-empty folder where unavailable): two publishers that pick the same number cannot
both win, and the loser retries with the next one. No lock is held while copying, so a
publisher killed by SIGKILL leaves only its staging folder, which the next publish removes
(its pid is gone) — nothing to go stale.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from cluster.registry.manifest import (
    MANIFEST,
    SourceFile,
    copy_hashed,
    manifest_bytes,
    parse_manifest,
    sha256_file,
)
from cluster.registry.refs import NAME_RE

STAGING = ".staging"
STALE_REMOTE_HOST_S = 24 * 3600
Finalize = Callable[[int, dict[str, tuple[str, int]]], dict[str, Any]]


class Backend(Protocol):
    """Where versions, aliases and the audit log are stored (local folder or object store)."""

    root: str

    def names(self) -> list[str]: ...
    def versions(self, name: str) -> list[int]: ...
    def read_manifest(self, name: str, version: int) -> dict[str, Any]: ...
    def publish(
        self, name: str, files: list[SourceFile], finalize: Finalize, progress=None
    ) -> dict[str, Any]: ...
    def stored_hashes(
        self, name: str, version: int, manifest: dict[str, Any], progress=None
    ) -> dict[str, tuple[str, int]]: ...
    def local_dir(self, name: str, version: int, manifest: dict[str, Any], progress=None) -> Path: ...
    def evict(self, name: str, version: int) -> None: ...
    def aliases(self, name: str) -> dict[str, dict[str, Any]]: ...
    def set_alias(
        self, name: str, alias: str, record: Callable[[int | None], dict[str, Any]]
    ) -> dict[str, Any]: ...
    def append_audit(self, name: str, entry: dict[str, Any]) -> None: ...
    def audit(self, name: str) -> list[dict[str, Any]]: ...


# --- small filesystem helpers ----------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Any
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):
    _renameat2 = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (even as an empty folder)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.rename(src, dst)  # refuses a non-empty target; our version folders are never empty
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, e.strerror, str(dst)) from None
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hash_tree(root: Path, progress=None) -> dict[str, tuple[str, int]]:
    """sha256 and size of every file under ``root`` except the manifest."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                out[rel] = sha256_file(p, progress)
    return out


# --- the local backend -----------------------------------------------------------------------


class LocalBackend:
    """A registry in a local (or shared POSIX) folder."""

    def __init__(self, root: Path) -> None:
        self.path = root
        self.root = str(root)

    def _model(self, name: str) -> Path:
        return self.path / name

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(d.name for d in self.path.iterdir() if NAME_RE.match(d.name) and self.versions(d.name))

    def versions(self, name: str) -> list[int]:
        vdir = self._model(name) / "versions"
        try:
            entries = os.listdir(vdir)
        except FileNotFoundError:
            return []
        return sorted(int(e) for e in entries if e.isdigit())

    def version_dir(self, name: str, version: int) -> Path:
        return self._model(name) / "versions" / str(version)

    def read_manifest(self, name: str, version: int) -> dict[str, Any]:
        p = self.version_dir(name, version) / MANIFEST
        return parse_manifest(p.read_bytes(), str(p))

    def publish(
        self, name: str, files: list[SourceFile], finalize: Finalize, progress=None
    ) -> dict[str, Any]:
        self.sweep_staging()
        stage = self.path / STAGING / f"{uuid.uuid4().hex}+{os.getpid()}+{socket.gethostname()}"
        stage.mkdir(parents=True)
        try:
            hashed = {f.rel: copy_hashed(f.path, stage / f.rel, progress) for f in files}
            for f in files:
                os.chmod(stage / f.rel, 0o444)
            vdir = self._model(name) / "versions"
            vdir.mkdir(parents=True, exist_ok=True)
            while True:
                version = max(self.versions(name), default=0) + 1
                manifest = finalize(version, hashed)
                write_atomic(stage / MANIFEST, manifest_bytes(manifest), mode=0o444)
                try:
                    rename_noreplace(stage, vdir / str(version))
                    break
                except FileExistsError:
                    continue  # another publisher took this number: take the next one
            fsync_dir(vdir)
            return manifest
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def sweep_staging(self) -> list[Path]:
        """Remove staging folders of dead publishers (same host: pid gone; other hosts: 24 h old)."""
        removed: list[Path] = []
        sdir = self.path / STAGING
        if not sdir.is_dir():
            return removed
        host = socket.gethostname()
        for d in sdir.iterdir():
            _, _, rest = d.name.partition("+")
            pid_s, _, owner = rest.partition("+")
            try:
                age = time.time() - d.stat().st_mtime
            except FileNotFoundError:
                continue
            dead = (owner == host and pid_s.isdigit() and not pid_alive(int(pid_s))) or (
                owner != host and age > STALE_REMOTE_HOST_S
            )
            if dead:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    def stored_hashes(
        self, name: str, version: int, manifest: dict[str, Any], progress=None
    ) -> dict[str, tuple[str, int]]:
        return hash_tree(self.version_dir(name, version), progress)

    def local_dir(self, name: str, version: int, manifest: dict[str, Any], progress=None) -> Path:
        return self.version_dir(name, version)

    def evict(self, name: str, version: int) -> None:
        """Nothing is cached for a local root."""

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        adir = self._model(name) / "aliases"
        out: dict[str, dict[str, Any]] = {}
        if not adir.is_dir():
            return out
        for p in sorted(adir.glob("*.json")):
            if p.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                out[p.stem] = json.loads(p.read_bytes())
        return out

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """An flock on ``<name>/.lock``; the kernel drops it if the holder dies, so it never goes stale."""
        lock = self._model(name) / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def set_alias(
        self, name: str, alias: str, record: Callable[[int | None], dict[str, Any]]
    ) -> dict[str, Any]:
        adir = self._model(name) / "aliases"
        adir.mkdir(parents=True, exist_ok=True)
        with self._locked(name):
            old = self.aliases(name).get(alias)
            entry = record(old["version"] if old else None)
            write_atomic(
                adir / f"{alias}.json", json.dumps({k: entry[k] for k in ("version", "when", "who")}).encode()
            )
            self._append(name, entry)
        return entry

    def append_audit(self, name: str, entry: dict[str, Any]) -> None:
        with self._locked(name):
            self._append(name, entry)

    def _append(self, name: str, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self._model(name) / "audit.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def audit(self, name: str) -> list[dict[str, Any]]:
        p = self._model(name) / "audit.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
