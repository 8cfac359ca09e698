"""Token shards: corpus -> tokenizer -> one memory-mapped token file per split, plus a manifest.

Layout of ``<out_dir>/<fingerprint[:16]>/`` (written in a temp dir, then renamed into place)::

    manifest.json      fingerprint, resolved config, splits, tokenizer sha256, timings
    documents.jsonl    one line per document: name, split, sha256, bytes, token offset and count
    tokenizer/         the HF tokenizer dir the ids come from
    train.bin val.bin  raw little-endian uint16 (vocab <= 65535) or uint32 token ids;
                       every document is followed by <|endoftext|>

The fingerprint is the sha256 of: the format version, every source file read (name, size,
content sha256), the document caps, the split settings and the tokenizer key. The tokenizer key
covers the tokenizer settings, the same files and the ``tokenizers`` version; trained tokenizers
are cached under ``<out_dir>/tokenizers/<key[:16]>/`` so a split change does not retrain them.
A re-run with the same fingerprint only reads and hashes the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.config.data import UINT16_VOCAB_LIMIT, DataConfig
from cluster.errors import RetortError
from cluster.tokenizer import SPECIAL_TOKENS
from train.data.corpus import Document, FileRecord, read_corpus, split_documents

if TYPE_CHECKING:
    import numpy as np

    from cluster.tokenizer import Tokenizer

FORMAT_VERSION = 1
TOKENIZER_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
TOKENIZER_DIR = "tokenizer"
ENCODE_BATCH_DOCS = 128
STALE_TMP_AGE_S = 24 * 3600.0


@dataclass(frozen=True)
class DataManifest:
    """A prepared data dir (see the module docstring); ``load_manifest(dir)`` reads one back."""

    dir: Path
    fingerprint: str
    vocab_size: int
    tokenizer_dir: Path
    tokenizer_sha256: str
    n_tokens: dict[str, int]
    dtype: str
    eos_id: int
    pad_id: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST

    def split_path(self, split: str) -> Path:
        if split not in self.n_tokens:
            raise RetortError(f"{self.dir}: no split {split!r} (splits: {', '.join(self.n_tokens)})")
        return self.dir / self.raw["splits"][split]["file"]


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _files_json(records: list[FileRecord]) -> list[list[Any]]:
    return [[r.name, r.size, r.sha256] for r in records]


def tokenizer_key(cfg: DataConfig, records: list[FileRecord]) -> str:
    """What a trained tokenizer depends on: its settings, the files it was trained on, the library."""
    return _sha256_json(
        {
            "format": TOKENIZER_FORMAT_VERSION,
            "algorithm": "byte-level-bpe",
            "vocab_size": cfg.vocab_size,
            "min_frequency": cfg.min_frequency,
            "special_tokens": list(SPECIAL_TOKENS),
            "caps": [cfg.max_docs, cfg.max_bytes, cfg.jsonl_text_field],
            "files": _files_json(records),
            "tokenizers": version("tokenizers"),
        }
    )


def fingerprint(cfg: DataConfig, records: list[FileRecord], tok_key: str) -> str:
    return _sha256_json(
        {
            "format": FORMAT_VERSION,
            "files": _files_json(records),
            "caps": [cfg.max_docs, cfg.max_bytes, cfg.jsonl_text_field],
            "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "by": "sha256(seed:doc_sha256)"},
            "tokenizer": tok_key,
            "layout": "doc eos doc eos ... (train documents in seeded-hash order)",
        }
    )


def token_dtype(vocab_size: int) -> str:
    """Shard dtype: uint16 while every id fits (vocab <= 65535), else uint32."""
    if vocab_size > 2**32:
        raise RetortError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    return "uint16" if vocab_size <= UINT16_VOCAB_LIMIT else "uint32"


def _manifest_from(d: Path, raw: dict[str, Any]) -> DataManifest:
    tok = raw["tokenizer"]
    return DataManifest(
        dir=d,
        fingerprint=raw["fingerprint"],
        vocab_size=tok["vocab_size"],
        tokenizer_dir=d / tok["dir"],
        tokenizer_sha256=tok["sha256"],
        n_tokens={s: v["n_tokens"] for s, v in raw["splits"].items()},
        dtype=raw["dtype"],
        eos_id=tok["eos_id"],
        pad_id=tok["pad_id"],
        raw=raw,
    )


def load_manifest(path: str | os.PathLike[str]) -> DataManifest:
    """Read a data dir (or its ``manifest.json``); checks that every shard has its recorded size."""
    p = Path(path).expanduser()
    d = p.parent if p.name == MANIFEST else p
    mf = d / MANIFEST
    if not mf.is_file():
        raise RetortError(f"{d}: no {MANIFEST} (not a prepared data dir; run `retort data`)")
    try:
        raw = json.loads(mf.read_text())
        m = _manifest_from(d, raw)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RetortError(f"{mf}: unreadable manifest ({e})") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise RetortError(
            f"{mf}: format_version {raw.get('format_version')} (this build reads {FORMAT_VERSION})"
        )
    itemsize = 2 if m.dtype == "uint16" else 4
    for split, n in m.n_tokens.items():
        f = m.split_path(split)
        if not f.is_file() or f.stat().st_size != n * itemsize:
            raise RetortError(f"{f}: missing or truncated (expected {n} {m.dtype} tokens)")
    if not (m.tokenizer_dir / "tokenizer.json").is_file():
        raise RetortError(f"{m.tokenizer_dir}: tokenizer missing")
    return m


def load_split(path: str | os.PathLike[str], split: str) -> np.memmap:
    """The split's token ids as a read-only 1-D memmap; documents are separated by eos."""
    import numpy as np

    m = load_manifest(path)
    return np.memmap(m.split_path(split), dtype=m.dtype, mode="r", shape=(m.n_tokens[split],))


def _build_atomically(final: Path, build: Callable[[Path], None], is_valid: Callable[[Path], bool]) -> None:
    """``build(tmp)`` fills a temp dir beside ``final``, which is then renamed into place.

    Readers never see a half-written dir. If another process put a valid ``final`` in place
    first, ours is dropped; an invalid one (damaged by hand) is moved aside and replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        build(tmp)
        _publish_modes(tmp)
        if final.exists():
            if is_valid(final):
                return
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".trash-{final.name}-"))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_valid(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(final: Path, max_age_s: float = STALE_TMP_AGE_S) -> None:
    """Temp dirs a killed process left beside ``final`` (live builders finish long before this age)."""
    now = time.time()
    for pattern in (f".tmp-{final.name}-*", f".trash-{final.name}-*"):
        for p in final.parent.glob(pattern):
            try:
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass


def _publish_modes(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the finished tree the modes the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    root.chmod(0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for x in dirs:
            os.chmod(os.path.join(d, x), 0o777 & ~mask)
        for x in files:
            os.chmod(os.path.join(d, x), 0o666 & ~mask)


def _valid_manifest(d: Path) -> bool:
    try:
        load_manifest(d)
        return True
    except RetortError:
        return False


def cached_tokenizer(cfg: DataConfig, docs: list[Document], key: str) -> tuple[Tokenizer, float | None]:
    """The tokenizer for ``key``: loaded from the cache, or trained on ``docs`` and cached.

    Returns the tokenizer and the training time (None when it came from the cache).
    """
    from cluster.tokenizer import load_tokenizer, train_tokenizer

    d = cfg.out_path / "tokenizers" / key[:16]
    if (d / "tokenizer.json").is_file():
        return load_tokenizer(d), None
    print(f"training a {cfg.vocab_size}-token byte-level BPE on {len(docs)} documents", file=sys.stderr)
    t0 = time.perf_counter()

    def build(tmp: Path) -> None:
        train_tokenizer(
            (doc.text for doc in docs),
            cfg.vocab_size,
            tmp,
            min_frequency=cfg.min_frequency,
            length=len(docs),
            show_progress=sys.stderr.isatty(),
        )
        (tmp / "retort_tokenizer_key").write_text(key + "\n")

    _build_atomically(d, build, lambda p: (p / "tokenizer.json").is_file())
    return load_tokenizer(d), time.perf_counter() - t0


def write_split(
    tok: Tokenizer, docs: list[Document], path: Path, dtype: str, split: str, index: list[dict[str, Any]]
) -> int:
    """Tokenize ``docs`` (batched, special-token strings as plain text) into ``path``; returns tokens."""
    import numpy as np
    from tqdm import tqdm

    eos = np.array([tok.eos_id], dtype=dtype)
    offset = 0
    with (
        open(path, "wb") as f,
        tqdm(
            total=sum(d.nbytes for d in docs),
            unit="B",
            unit_scale=True,
            desc=f"tokenize {split}",
            file=sys.stderr,
            mininterval=0.5,
        ) as bar,
    ):
        for i in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = docs[i : i + ENCODE_BATCH_DOCS]
            parts = []
            for doc, ids in zip(batch, tok.encode_ordinary_batch([d.text for d in batch]), strict=True):
                parts += [np.asarray(ids, dtype=dtype), eos]
                index.append(
                    {
                        "name": doc.name,
                        "split": split,
                        "sha256": doc.digest,
                        "bytes": doc.nbytes,
                        "offset": offset,
                        "n_tokens": len(ids) + 1,
                    }
                )
                offset += len(ids) + 1
            np.concatenate(parts).tofile(f)
            bar.update(sum(d.nbytes for d in batch))
    return offset


def _build_shards(
    tmp: Path,
    cfg: DataConfig,
    fp: str,
    tok: Tokenizer,
    tok_key: str,
    splits: dict[str, list[Document]],
    records: list[FileRecord],
    tok_train_s: float | None,
) -> None:
    dtype = token_dtype(tok.vocab_size)
    assert tok.path is not None, "a cached tokenizer is loaded from its dir"
    shutil.copytree(tok.path, tmp / TOKENIZER_DIR, ignore=shutil.ignore_patterns("retort_tokenizer_key"))
    index: list[dict[str, Any]] = []
    split_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    for split, docs in splits.items():
        n = write_split(tok, docs, tmp / f"{split}.bin", dtype, split, index)
        split_info[split] = {
            "file": f"{split}.bin",
            "n_tokens": n,
            "n_docs": len(docs),
            "n_bytes": sum(d.nbytes for d in docs),
        }
    tokenize_s = time.perf_counter() - t0
    with open(tmp / DOCUMENTS, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in index)
    n_tok = sum(v["n_tokens"] for v in split_info.values())
    n_bytes = sum(v["n_bytes"] for v in split_info.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.model_dump(mode="json"),
        "dtype": dtype,
        "layout": "each document followed by eos; raw little-endian ids",
        "splits": split_info,
        "tokenizer": {
            "dir": TOKENIZER_DIR,
            "sha256": tok.sha256,
            "key": tok_key,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "special_tokens": list(SPECIAL_TOKENS),
        },
        "files": {"count": len(records), "bytes": sum(r.size for r in records)},
        "stats": {
            "tokenizer_train_s": None if tok_train_s is None else round(tok_train_s, 3),
            "tokenize_s": round(tokenize_s, 3),
            "tokens": n_tok,
            "bytes": n_bytes,
            "tokens_per_s": round(n_tok / max(tokenize_s, 1e-9)),
            "tokens_per_byte": round(n_tok / max(n_bytes, 1), 4),
        },
        "versions": {"tokenizers": version("tokenizers"), "python": sys.version.split()[0]},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def prepare(cfg: DataConfig) -> DataManifest:
    """Corpus -> tokenizer -> token shards under ``<out_dir>/<fingerprint[:16]>``; reused when present."""
    docs, records = read_corpus(cfg)
    tok_key = tokenizer_key(cfg, records)
    fp = fingerprint(cfg, records, tok_key)
    final = cfg.out_path / fp[:16]
    if (final / MANIFEST).is_file():
        try:
            m = load_manifest(final)
            if m.fingerprint == fp:
                return m
        except RetortError as e:
            print(f"rebuilding {final}: {e}", file=sys.stderr)
    splits = split_documents(docs, cfg.val_fraction, cfg.seed)
    tok, tok_train_s = cached_tokenizer(cfg, docs, tok_key)
    _build_atomically(
        final,
        lambda tmp: _build_shards(tmp, cfg, fp, tok, tok_key, splits, records, tok_train_s),
        _valid_manifest,
    )
    return load_manifest(final)
