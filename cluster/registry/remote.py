"""A registry on an object store (``s3://bucket/prefix``, any fsspec URI) with a local verified cache.

Object stores have no rename, so a version is made visible by a single conditional write::

    <name>/objects/<uuid>/<files>     uploaded first, under a fresh random prefix (invisible)
    <name>/versions/<N>.json          the manifest, created with If-None-Match: * — the commit
    <name>/aliases/<alias>.json       {"version": N, ...}; a PUT replaces an object atomically
    <name>/audit/<time>-<uuid>.json   one object per event (objects cannot be appended to)

Two publishers racing for ``N`` both try to create ``versions/N.json``; the store lets exactly
one succeed, the other gets FileExistsError and tries ``N+1``. The create-if-absent is atomic
where the fsspec backend implements ``pipe_file(mode="create")`` natively (s3fs sends
``If-None-Match: *``, honoured by AWS S3, MinIO and moto); on other backends fsspec checks
existence first, which is racy, so run one publisher per name there. A publisher killed
mid-upload leaves only an unreferenced ``objects/<uuid>/`` prefix (``orphans()`` lists them).

Alias moves are atomic for readers (a PUT is all-or-nothing); the ``from`` recorded in the
audit log is read just before the PUT, so two concurrent promoters of the same alias may
both record the same ``from`` — the final state is still one of the two versions.

``local_dir`` downloads a version into ``<cache_dir>/<hash of root>/<name>/<N>/`` (staged in a
temporary folder, renamed into place). The registry re-hashes every cached file on every
resolve (full sha256, no size/mtime shortcut) and re-downloads once if the cache was damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.registry.manifest import CHUNK, SourceFile, manifest_bytes, now_iso, parse_manifest
from cluster.registry.refs import NAME_RE


class FsspecBackend:
    """A registry under an fsspec URI; credentials and endpoints come from the usual env/config."""

    def __init__(self, root: str, cache_dir: Path, **storage_options: Any) -> None:
        import fsspec  # noqa: PLC0415 - only remote roots need it

        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **storage_options)
        self.base = self.base.rstrip("/")
        self.cache = cache_dir / hashlib.sha256(self.root.encode()).hexdigest()[:16]

    def _p(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _ls(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def names(self) -> list[str]:
        return sorted(n for n in self._ls(self.base) if NAME_RE.match(n) and self.versions(n))

    def versions(self, name: str) -> list[int]:
        out = []
        for e in self._ls(self._p(name, "versions")):
            stem, dot, ext = e.partition(".")
            if stem.isdigit() and dot and ext == "json":
                out.append(int(stem))
        return sorted(out)

    def read_manifest(self, name: str, version: int) -> dict[str, Any]:
        p = self._p(name, "versions", f"{version}.json")
        return parse_manifest(self.fs.cat_file(p), f"{self.root}/{name}/versions/{version}.json")

    def publish(self, name: str, files: list[SourceFile], finalize, progress=None) -> dict[str, Any]:
        prefix = f"objects/{uuid.uuid4().hex}"
        hashed = {f.rel: self._upload(f.path, self._p(name, prefix, f.rel), progress) for f in files}
        while True:
            version = max(self.versions(name), default=0) + 1
            manifest = finalize(version, hashed)
            manifest["storage"] = {"data_prefix": prefix}
            try:
                self.fs.pipe_file(
                    self._p(name, "versions", f"{version}.json"), manifest_bytes(manifest), mode="create"
                )
                return manifest
            except FileExistsError:
                continue  # another publisher committed this number first

    def _upload(self, src: Path, dst: str, progress=None) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as fi, self.fs.open(dst, "wb") as fo:
            while chunk := fi.read(CHUNK):
                fo.write(chunk)
                h.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
        return h.hexdigest(), size

    def _data(self, name: str, manifest: dict[str, Any]) -> str:
        return self._p(name, manifest["storage"]["data_prefix"])

    def _objects(self, name: str, manifest: dict[str, Any]) -> dict[str, str]:
        """rel path -> object path for every object stored under the version's data prefix."""
        data = self._data(name, manifest)
        self.fs.invalidate_cache(data)
        return {p[len(data) + 1 :]: p for p in self.fs.find(data)}

    def stored_hashes(
        self, name: str, version: int, manifest: dict[str, Any], progress=None
    ) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        for rel, path in self._objects(name, manifest).items():
            h = hashlib.sha256()
            size = 0
            with self.fs.open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
            out[rel] = (h.hexdigest(), size)
        return out

    def cached_dir(self, name: str, version: int) -> Path:
        return self.cache / name / str(version)

    def local_dir(self, name: str, version: int, manifest: dict[str, Any], progress=None) -> Path:
        final = self.cached_dir(name, version)
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{version}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            for rel, path in self._objects(name, manifest).items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(dst))
                if progress is not None:
                    progress.update(dst.stat().st_size)
            (tmp / "manifest.json").write_bytes(manifest_bytes(manifest))
            try:
                os.rename(tmp, final)
            except OSError:  # a concurrent resolver put it there first; theirs is verified too
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def evict(self, name: str, version: int) -> None:
        d = self.cached_dir(name, version)
        if d.exists():
            trash = d.with_name(f".{version}.{uuid.uuid4().hex[:8]}.evicted")
            os.rename(d, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for e in self._ls(self._p(name, "aliases")):
            if e.endswith(".json"):
                try:
                    out[e[: -len(".json")]] = json.loads(self.fs.cat_file(self._p(name, "aliases", e)))
                except FileNotFoundError:
                    continue
        return dict(sorted(out.items()))

    def set_alias(
        self, name: str, alias: str, record: Callable[[int | None], dict[str, Any]]
    ) -> dict[str, Any]:
        old = self.aliases(name).get(alias)
        entry = record(old["version"] if old else None)
        body = json.dumps({k: entry[k] for k in ("version", "when", "who")}).encode()
        self.fs.pipe_file(self._p(name, "aliases", f"{alias}.json"), body)
        self.append_audit(name, entry)
        return entry

    def append_audit(self, name: str, entry: dict[str, Any]) -> None:
        key = f"{entry.get('when', now_iso())}-{uuid.uuid4().hex[:8]}.json"
        self.fs.pipe_file(self._p(name, "audit", key), json.dumps(entry, sort_keys=True).encode())

    def audit(self, name: str) -> list[dict[str, Any]]:
        entries = sorted(self._ls(self._p(name, "audit")))
        return [json.loads(self.fs.cat_file(self._p(name, "audit", e))) for e in entries]

    def orphans(self, name: str) -> list[str]:
        """``objects/<uuid>`` prefixes no manifest refers to (publishers that died mid-upload)."""
        used = {self.read_manifest(name, v)["storage"]["data_prefix"] for v in self.versions(name)}
        return sorted(
            f"objects/{u}" for u in self._ls(self._p(name, "objects")) if f"objects/{u}" not in used
        )
