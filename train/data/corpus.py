"""The corpus: which files a ``DataConfig`` names, their documents, and the train/validation split.

A source is ``stdlib`` (the running interpreter's standard library ``.py`` files, never
site-packages), a file, a directory, or a glob. A ``.jsonl`` file holds one document per line
(a JSON object whose ``jsonl_text_field`` is the text); any other file is one document. Text is
read as UTF-8 with ``errors="replace"``.

Every document carries the sha256 of its bytes; the split puts a document in validation when
``sha256(seed, digest)`` read as a fraction of 2**64 is below ``val_fraction``: a pure function
of its content, so adding or removing other documents never moves it, and exact duplicates
always share a split.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.config.data import DataConfig
from cluster.errors import RetortError

STDLIB = "stdlib"
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
GLOB_CHARS = frozenset("*?[")
BINARY_SNIFF_BYTES = 8192
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SourceFile:
    """One file to read: ``name`` is stable across machines (used in fingerprints and doc names)."""

    spec: str  # the source string it came from
    name: str
    path: Path
    jsonl: bool


@dataclass(frozen=True)
class Document:
    name: str  # "stdlib/asyncio/events.py", "data/a.txt", "data/c.jsonl:12"
    data: bytes  # the raw file, or a JSONL text as UTF-8
    digest: str  # sha256 hex of ``data``

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def text(self) -> str:
        """Decoded on use, so a re-run that reuses its shards never pays for decoding."""
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class FileRecord:
    """What the fingerprint covers for one source file."""

    name: str
    size: int
    sha256: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffix: str | None, include_tests: bool) -> list[Path]:
    """Files below ``root`` in sorted order; hidden entries, caches and site-packages skipped."""
    out: list[Path] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(
            x
            for x in dirs
            if not x.startswith(".") and x not in SKIP_DIRS and (include_tests or x not in TEST_DIRS)
        )
        for f in sorted(files):
            if not f.startswith(".") and (suffix is None or f.endswith(suffix)):
                out.append(Path(d) / f)
    return out


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def _files_of(spec: str, cfg: DataConfig) -> list[SourceFile]:
    def sf(name: str, path: Path) -> SourceFile:
        return SourceFile(spec, name, path, path.name.endswith(".jsonl"))

    if spec == STDLIB:
        root = stdlib_root()
        return [
            sf(f"stdlib/{p.relative_to(root).as_posix()}", p) for p in _walk(root, ".py", cfg.include_tests)
        ]
    expanded = os.path.expandvars(os.path.expanduser(spec))
    if GLOB_CHARS & set(expanded):
        matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True))
        files = [m for m in matches if m.is_file() and not _is_binary(m)]
        if not files:
            raise RetortError(f"source {spec!r}: no text files match")
        return [sf(m.as_posix(), m) for m in files]
    p = Path(expanded)
    if p.is_dir():
        files = [f for f in _walk(p, None, include_tests=True) if not _is_binary(f)]
        if not files:
            raise RetortError(f"source {spec!r}: no text files in this directory (empty corpus)")
        return [sf(f"{spec.rstrip('/')}/{f.relative_to(p).as_posix()}", f) for f in files]
    if p.is_file():
        return [sf(spec, p)]
    raise RetortError(f"source {spec!r}: no such file or directory")


def list_files(cfg: DataConfig) -> list[SourceFile]:
    """Every file the sources name, in source order (sorted within a source), each file once."""
    seen: set[tuple[int, int]] = set()
    out: list[SourceFile] = []
    for spec in cfg.sources:
        for f in _files_of(spec, cfg):
            st = f.path.stat()
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _jsonl_docs(f: SourceFile, raw: bytes, field: str) -> Iterator[Document]:
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RetortError(f"{f.name}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise RetortError(f"{f.name}:{lineno}: no field {field!r} (set data.jsonl_text_field)")
        text = obj[field]
        if not isinstance(text, str):
            raise RetortError(f"{f.name}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
        data = text.encode("utf-8", errors="replace")  # a lone surrogate ("\\ud800") becomes "?"
        yield Document(f"{f.name}:{lineno}", data, hashlib.sha256(data).hexdigest())


def _docs_of(f: SourceFile, raw: bytes, digest: str, cfg: DataConfig) -> Iterator[Document]:
    if f.jsonl:
        yield from _jsonl_docs(f, raw, cfg.jsonl_text_field)
    else:
        yield Document(f.name, raw, digest)


def read_corpus(
    cfg: DataConfig, files: list[SourceFile] | None = None
) -> tuple[list[Document], list[FileRecord]]:
    """Read the documents (up to ``max_docs`` / ``max_bytes``) and the records of the files read.

    Empty documents are dropped. A source that yields no text is an error naming it.
    """
    files = list_files(cfg) if files is None else files
    docs: list[Document] = []
    records: list[FileRecord] = []
    produced: dict[str, int] = {f.spec: 0 for f in files}  # a spec whose files all came earlier is absent
    nbytes = 0
    capped = False
    n_read = 0
    for f in files:
        n_read += 1
        raw = f.path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        records.append(FileRecord(f.name, len(raw), digest))
        for doc in _docs_of(f, raw, digest, cfg):
            if not doc.data.strip():  # empty or ASCII whitespace only
                continue
            docs.append(doc)
            produced[f.spec] += 1
            nbytes += doc.nbytes
            capped = (cfg.max_docs is not None and len(docs) >= cfg.max_docs) or (
                cfg.max_bytes is not None and nbytes >= cfg.max_bytes
            )
            if capped:
                break
        if capped:
            break
    if not docs:
        raise RetortError(f"empty corpus: source(s) {', '.join(map(repr, cfg.sources))} yielded no text")
    for spec, n in produced.items():
        unread = any(f.spec == spec for f in files[n_read:])
        if n == 0 and not unread:
            raise RetortError(f"source {spec!r}: no text (empty corpus)")
    return docs, records


def val_score(digest: str, seed: int) -> float:
    """A document's place in [0, 1): the split is ``val`` iff this is below ``val_fraction``."""
    h = hashlib.sha256(f"{seed}:{digest}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    """Split by content hash. ``val`` keeps corpus order; ``train`` is in the order of the same seeded
    hash, so that any prefix of the train shard is a uniform sample of documents (a distillation that
    reads only the first N windows — a top-k cache of what it draws — sees the whole corpus's mix, not
    the first modules of an alphabetical listing).

    If the hash leaves a split empty (a tiny corpus), the document closest to the threshold
    moves over, so both splits exist whenever there are at least two documents.
    """
    if len(docs) < 2:
        raise RetortError(
            f"the corpus has {len(docs)} document; a train/validation split needs at least 2 "
            "(use several files, or JSONL with one document per line)"
        )
    scores = [val_score(d.digest, seed) for d in docs]
    in_val = [s < val_fraction for s in scores]
    if not any(in_val):
        in_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(in_val):
        in_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = sorted((s, i) for i, (s, v) in enumerate(zip(scores, in_val, strict=True)) if not v)
    return {
        "train": [docs[i] for _, i in train],
        "val": [d for d, v in zip(docs, in_val, strict=True) if v],
    }
