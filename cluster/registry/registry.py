"""``Registry``: publish, resolve, promote, list, show, verify, diff — over any backend.

Every read path fails closed: ``resolve`` hashes every file of the version it returns and
raises ``IntegrityError`` naming the first file that differs from the manifest; unknown names,
versions and aliases raise a one-line error listing what exists.
"""

from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path
from typing import Any

from cluster.errors import RetortError
from cluster.registry import manifest as mf
from cluster.registry.backend import Backend, LocalBackend, hash_tree
from cluster.registry.diff import diff_manifests
from cluster.registry.refs import LATEST, ModelRef, ParsedRef, RefError, check_alias, check_name, parse_ref

DEFAULT_ROOT = "~/.retort/registry"
DEFAULT_CACHE = "~/.retort/cache"
PROGRESS_MIN_BYTES = 64 * 1024 * 1024  # show a progress bar for work bigger than this


def _progress(total: int, desc: str):
    """A tqdm bar on stderr for big transfers, else None (callers accept None)."""
    if total < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def _ranges(versions: list[int]) -> str:
    if not versions:
        return "none"
    out, start, prev = [], versions[0], versions[0]
    for v in [*versions[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


class Registry:
    """A model registry rooted at a local folder or an object-store URI."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def root(self) -> str:
        return self.backend.root

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # --- naming ------------------------------------------------------------------------------

    def _versions(self, name: str) -> list[int]:
        versions = self.backend.versions(name)
        if not versions:
            names = self.backend.names()
            raise RefError(f"no model {name!r} in registry {self.root}; models: {', '.join(names) or 'none'}")
        return versions

    def ref(self, ref: str | ModelRef) -> ModelRef:
        """The exact version a reference points to now (``m`` and ``m@latest`` = highest)."""
        p: ParsedRef = parse_ref(ref)
        versions = self._versions(p.name)
        if p.version is not None:
            if p.version not in versions:
                raise RefError(f"{p.name} has no version {p.version}; versions: {_ranges(versions)}")
            return ModelRef(p.name, p.version)
        if p.alias is not None:
            aliases = self.backend.aliases(p.name)
            if p.alias not in aliases:
                known = ", ".join(f"@{a} -> {r['version']}" for a, r in aliases.items()) or "none"
                raise RefError(f"{p.name} has no alias {p.alias!r}; aliases: {known} (and @{LATEST})")
            return ModelRef(p.name, int(aliases[p.alias]["version"]))
        return ModelRef(p.name, versions[-1])

    # --- writing -----------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        src_dir: str | os.PathLike[str],
        lineage: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> ModelRef:
        """Copy a checkpoint directory into a new immutable version; returns ``name:N``.

        Everything is checked before anything is written: the name, the file types (no
        pickles), the presence of weights and config.json, the safetensors headers, and that
        lineage/metrics are JSON. Parent references that exist in this registry are pinned to
        exact versions (``teacher@production`` is recorded as ``teacher:3``).
        """
        check_name(name)
        src = Path(src_dir).expanduser().resolve()
        files = mf.scan_source(src)
        info = mf.describe_checkpoint(src, files)
        lineage = mf.base_lineage(mf.jsonable(lineage, "lineage"))
        lineage["parents"] = [self._pin(p) for p in lineage["parents"]]
        if lineage["tokenizer_sha256"] is None and (src / "tokenizer.json").is_file():
            lineage["tokenizer_sha256"] = mf.sha256_file(src / "tokenizer.json")[0]  # = Tokenizer.sha256
        metrics = mf.jsonable(metrics, "metrics")
        total = sum(f.size for f in files)
        metrics.setdefault("size_bytes", total)
        created, by = mf.now_iso(), mf.who()

        def finalize(version: int, hashed: dict[str, tuple[str, int]]) -> dict[str, Any]:
            return {
                "schema": mf.SCHEMA,
                "name": name,
                "version": version,
                "ref": f"{name}:{version}",
                "created": created,
                "created_by": by,
                "source": str(src),
                "size_bytes": sum(s for _, s in hashed.values()),
                **info,
                "files": mf.file_entries(hashed),
                "lineage": lineage,
                "metrics": metrics,
            }

        bar = _progress(total, f"publish {name}")
        try:
            m = self.backend.publish(name, files, finalize, bar)
        finally:
            if bar is not None:
                bar.close()
        self.backend.append_audit(
            name,
            {"action": "publish", "name": name, "version": m["version"], "when": m["created"], "who": by},
        )
        return ModelRef(name, m["version"])

    def _pin(self, parent: str) -> str:
        try:
            p = parse_ref(parent)
        except RefError:
            return parent  # not a registry reference (e.g. a Hugging Face repo id): kept verbatim
        if not self.backend.versions(p.name):
            return parent
        return str(self.ref(parent))

    def promote(self, name: str, version: int | str, alias: str) -> dict[str, Any]:
        """Point ``name@alias`` at ``version`` atomically and append the move to the audit log."""
        check_name(name)
        check_alias(alias)
        if alias == LATEST:
            raise RefError(f"@{LATEST} is the highest version and cannot be promoted to")
        if isinstance(version, str) and not version.isdigit():
            raise RefError(f"invalid version {version!r}: versions are integers >= 1")
        target = self.ref(ModelRef(name, int(version)))

        def record(old: int | None) -> dict[str, Any]:
            return {
                "action": "promote",
                "name": name,
                "alias": alias,
                "from": old,
                "to": target.version,
                "version": target.version,
                "when": mf.now_iso(),
                "who": mf.who(),
            }

        entry = self.backend.set_alias(name, alias, record)
        _count_promotion(name, alias)
        return entry

    # --- reading -----------------------------------------------------------------------------

    def manifest(self, ref: str | ModelRef) -> dict[str, Any]:
        r = self.ref(ref)
        return self.backend.read_manifest(r.name, r.version)

    def resolve(self, ref: str | ModelRef) -> Path:
        """A local directory holding exactly the files of ``ref``, every sha256 checked first."""
        r = self.ref(ref)
        m = self.backend.read_manifest(r.name, r.version)
        where = f"{r} ({self.root})"
        for attempt in (0, 1):
            bar = _progress(m["size_bytes"], f"resolve {r}")
            try:
                path = self.backend.local_dir(r.name, r.version, m, bar)
                mf.check_files(m["files"], hash_tree(path), where)
                return path
            except mf.IntegrityError:
                if attempt or isinstance(self.backend, LocalBackend):
                    raise
                self.backend.evict(r.name, r.version)  # a damaged cache copy: fetch once more
            finally:
                if bar is not None:
                    bar.close()
        raise AssertionError("unreachable")

    def verify(self, ref: str | ModelRef) -> None:
        """Re-hash the stored files of ``ref`` (in the store, not a cache); raise if any differ."""
        r = self.ref(ref)
        m = self.backend.read_manifest(r.name, r.version)
        bar = _progress(m["size_bytes"], f"verify {r}")
        try:
            actual = self.backend.stored_hashes(r.name, r.version, m, bar)
        finally:
            if bar is not None:
                bar.close()
        mf.check_files(m["files"], actual, f"{r} ({self.root})")

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        """One row per version (of ``name``, or of every model), oldest first, with its aliases."""
        names = [name] if name is not None else self.backend.names()
        rows: list[dict[str, Any]] = []
        for n in names:
            check_name(n)
            versions = self._versions(n)
            by_version: dict[int, list[str]] = {}
            for a, rec in self.backend.aliases(n).items():
                by_version.setdefault(int(rec["version"]), []).append(a)
            for v in versions:
                m = self.backend.read_manifest(n, v)
                rows.append(
                    {
                        "name": n,
                        "version": v,
                        "ref": f"{n}:{v}",
                        "aliases": sorted(by_version.get(v, [])) + ([LATEST] if v == versions[-1] else []),
                        "created": m["created"],
                        "created_by": m["created_by"],
                        "architecture": m.get("architecture"),
                        "num_parameters": m.get("num_parameters"),
                        "size_bytes": m["size_bytes"],
                        "quantization": (m.get("quantization") or {}).get("scheme"),
                        "sparsity": (m.get("pruning") or {}).get("sparsity"),
                        "parents": m["lineage"].get("parents", []),
                        "metrics": m.get("metrics", {}),
                    }
                )
        return rows

    def show(self, ref: str | ModelRef) -> dict[str, Any]:
        """The manifest of ``ref`` plus the aliases that point to it now."""
        r = self.ref(ref)
        m = self.backend.read_manifest(r.name, r.version)
        m["aliases"] = sorted(
            a for a, rec in self.backend.aliases(r.name).items() if int(rec["version"]) == r.version
        )
        return m

    def aliases(self, name: str) -> dict[str, int]:
        self._versions(check_name(name))
        return {a: int(rec["version"]) for a, rec in self.backend.aliases(name).items()}

    def audit(self, name: str) -> builtins.list[dict[str, Any]]:
        self._versions(check_name(name))
        return self.backend.audit(name)

    def diff(self, a: str | ModelRef, b: str | ModelRef) -> dict[str, Any]:
        """What changed from ``a`` to ``b``: files, config.json, metrics, lineage, headline facts."""
        return diff_manifests(self.manifest(a), self.manifest(b))


_PROMOTIONS = None


def _count_promotion(name: str, alias: str) -> None:
    """Count the move in Prometheus only inside a running Ray runtime; never start one."""
    global _PROMOTIONS
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from cluster.metrics import REGISTRY_PROMOTIONS, make  # noqa: PLC0415

    if _PROMOTIONS is None:
        _PROMOTIONS = make(REGISTRY_PROMOTIONS)
    _PROMOTIONS.inc(1, tags={"model": name, "alias": alias})


def open_registry(cfg=None, *, root: str | None = None, cache_dir: str | None = None) -> Registry:
    """The registry from ``root`` (explicit) > ``$RETORT_REGISTRY`` > ``cfg.root`` > ``~/.retort/registry``.

    A local root is made absolute (``~`` expanded, relative paths against the current folder);
    a URI with a scheme other than ``file://`` (``s3://bucket/prefix``) uses fsspec, with
    ``cache_dir`` (default ``cfg.cache_dir``) as the verified local cache.
    """
    chosen = (
        root or os.environ.get("RETORT_REGISTRY") or (cfg.root if cfg is not None else None) or DEFAULT_ROOT
    )
    cache = cache_dir or (cfg.cache_dir if cfg is not None else None) or DEFAULT_CACHE
    chosen = chosen.strip()
    if not chosen:
        raise RetortError("registry root is empty")
    if chosen.startswith("file://"):
        chosen = chosen[len("file://") :]
    if "://" in chosen:
        from cluster.registry.remote import FsspecBackend  # noqa: PLC0415

        try:
            return Registry(FsspecBackend(chosen, Path(cache).expanduser().absolute()))
        except (ImportError, ValueError) as e:
            raise RetortError(f"registry root {chosen}: cannot open ({e})") from None
    return Registry(LocalBackend(Path(chosen).expanduser().absolute()))
