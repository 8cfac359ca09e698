"""What a registry version is: the file policy, the manifest and its checks.

A version is a Hugging Face checkpoint directory (``config.json`` + safetensors, optionally a
tokenizer and small text/YAML files). Its ``manifest.json`` records the sha256 and size of
every file, what the checkpoint is (architecture, parameter count read from the safetensors
headers without loading a tensor, quantization scheme, pruning sparsity), where it came from
(lineage) and how good it is (metrics). Nothing here imports torch: the registry only ever
parses JSON and safetensors headers, and never unpickles anything.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import RetortError

MANIFEST = "manifest.json"
SCHEMA = 1
CHUNK = 8 * 1024 * 1024

# Files a version may hold. Everything here is data, never code: safetensors, JSON, text.
ALLOWED_SUFFIXES = {
    ".safetensors",
    ".json",
    ".txt",
    ".md",
    ".yaml",
    ".yml",
    ".jinja",
}  # jinja: chat templates
ALLOWED_NAMES = {"tokenizer.model"}  # sentencepiece: a protobuf, not a pickle
# Formats that can execute code when loaded (pickle and friends): refused by name.
PICKLE_SUFFIXES = {
    ".bin",
    ".pt",
    ".pth",
    ".pkl",
    ".pickle",
    ".ckpt",
    ".joblib",
    ".npy",
    ".npz",
    ".h5",
    ".msgpack",
}
MAX_HEADER = 100 * 1024 * 1024
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass(frozen=True)
class SourceFile:
    rel: str  # posix path inside the version
    path: Path  # where to read it from
    size: int


class IntegrityError(RetortError):
    """A stored file does not match its manifest (exit 1: the registry, not the input, is wrong)."""

    exit_code = 1


# --- the file policy -------------------------------------------------------------------------


def scan_source(src_dir: str | os.PathLike[str]) -> list[SourceFile]:
    """Every file to publish from ``src_dir``, or a RetortError naming the first refused one.

    Dot-files and dot-folders (``.cache/``, ``.gitattributes``) are skipped; symlinks are
    followed (Hugging Face cache snapshots are links into a blob store).
    """
    src = Path(src_dir).expanduser()
    if not src.is_dir():
        raise RetortError(f"{src}: not a directory")
    files: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(src).as_posix()
            check_file_type(rel)
            if rel == MANIFEST:
                if _is_registry_manifest(p):
                    continue  # a resolved version being re-published: its manifest is rewritten
                raise RetortError(f"{p}: {MANIFEST} is reserved for the registry's own manifest")
            if not p.is_file():
                raise RetortError(f"{p}: not a regular file")
            files.append(SourceFile(rel, p, p.stat().st_size))
    if not any(f.rel.endswith(".safetensors") for f in files):
        raise RetortError(f"{src}: no weights (*.safetensors) to publish")
    if not any(f.rel == "config.json" for f in files):
        raise RetortError(f"{src}: no config.json (a Hugging Face checkpoint directory is expected)")
    _check_index(src, {f.rel for f in files})
    return files


def _is_registry_manifest(path: Path) -> bool:
    try:
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(m, dict) and m.get("schema") == SCHEMA and isinstance(m.get("files"), dict)


def check_file_type(rel: str) -> None:
    name = rel.rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise RetortError(
            f"{rel}: {suffix} files may hold pickled code and are refused; save weights as safetensors"
        )
    if suffix not in ALLOWED_SUFFIXES and name not in ALLOWED_NAMES:
        raise RetortError(
            f"{rel}: unsupported file type; allowed: *.safetensors, *.json, *.txt, *.md, *.yaml, *.jinja, tokenizer.model"
        )


def _check_index(src: Path, rels: set[str]) -> None:
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        raise RetortError(f"{index}: not a safetensors index (no weight_map)") from None
    missing = sorted(s for s in shards if s not in rels)
    if missing:
        raise RetortError(f"{index}: names shards that are not in the directory: {', '.join(missing)}")


# --- safetensors headers ---------------------------------------------------------------------


def safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), checked."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RetortError(f"{p}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise RetortError(f"{p}: not a safetensors file (header length {n} does not fit in {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetortError(f"{p}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise RetortError(f"{p}: not a safetensors file (header is not an object)")
    data_len = size - 8 - n
    for key, t in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            shape, dtype = t["shape"], t["dtype"]
        except (KeyError, TypeError, ValueError):
            raise RetortError(f"{p}: malformed safetensors entry for tensor {key!r}") from None
        if not 0 <= begin <= end <= data_len:
            raise RetortError(
                f"{p}: tensor {key!r} lies outside the file (offsets {begin}..{end} > {data_len})"
            )
        bits = DTYPE_BITS.get(dtype)
        if bits is not None and math.prod(shape) * bits != (end - begin) * 8:
            raise RetortError(f"{p}: tensor {key!r} {dtype}{shape} does not match its {end - begin} bytes")
    return header


def tensor_summary(paths: list[Path]) -> dict[str, Any]:
    """Parameter count and elements per dtype over safetensors files, from headers only."""
    total, tensors = 0, 0
    by_dtype: dict[str, int] = {}
    for p in paths:
        for key, t in safetensors_header(p).items():
            if key == "__metadata__":
                continue
            n = math.prod(t["shape"])
            total += n
            tensors += 1
            by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + n
    return {
        "num_parameters": total,
        "num_tensors": tensors,
        "elements_by_dtype": dict(sorted(by_dtype.items())),
    }


# --- the manifest ----------------------------------------------------------------------------


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RetortError(f"{path}: invalid {what} JSON ({e})") from None
    if not isinstance(data, dict):
        raise RetortError(f"{path}: {what} must be a JSON object")
    return data


def describe_checkpoint(src: Path, files: list[SourceFile]) -> dict[str, Any]:
    """Architecture, parameter count, quantization and pruning of a checkpoint directory."""
    cfg = read_json_file(src / "config.json", "config.json")
    archs = cfg.get("architectures") or []
    summary = tensor_summary([f.path for f in files if f.rel.endswith(".safetensors")])
    q = cfg.get("quantization_config")
    quant = None
    if isinstance(q, dict):
        quant = {
            "scheme": q.get("scheme") or q.get("quant_type") or q.get("quant_method"),
            "method": q.get("quant_method"),
            "group_size": q.get("group_size"),
            "bits": q.get("bits"),
        }
    pr = cfg.get("pruning_config", cfg.get("pruning"))
    pruning = None
    if isinstance(pr, dict):
        pruning = {"sparsity": pr.get("sparsity"), **{k: v for k, v in pr.items() if k != "sparsity"}}
    return {
        "format": "hf",
        "architecture": archs[0] if archs else None,
        "model_type": cfg.get("model_type"),
        **summary,
        "quantization": quant,
        "pruning": pruning,
        "config": cfg,
    }


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def git_commit() -> str | None:
    """The commit of the code that runs (best effort; RETORT_GIT_COMMIT wins, e.g. in a Ray job)."""
    if os.environ.get("RETORT_GIT_COMMIT"):
        return os.environ["RETORT_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) >= 40 else None


def ray_job_id() -> str | None:
    """RAY_JOB_ID, else the job of an initialised Ray driver/worker; never imports Ray itself."""
    if os.environ.get("RAY_JOB_ID"):
        return os.environ["RAY_JOB_ID"]
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return ray.get_runtime_context().get_job_id()
        except Exception:  # noqa: BLE001 - lineage is best effort
            return None
    return None


def jsonable(value: Any, what: str) -> Any:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RetortError(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise RetortError(f"{what} is not JSON-serialisable: {e}") from None


def base_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    """The caller's lineage plus the fields Retort fills itself when they are not given."""
    parents = lineage.get("parents", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RetortError(f"lineage.parents must be a list of model references, got {parents!r}")
    out = {
        "parents": parents,
        "dataset_fingerprint": lineage.get("dataset_fingerprint"),
        "tokenizer_sha256": lineage.get("tokenizer_sha256"),
        "config": lineage.get("config"),
        "git_commit": lineage.get("git_commit") or git_commit(),
        "ray_job_id": lineage.get("ray_job_id") or ray_job_id(),
    }
    out.update({k: v for k, v in lineage.items() if k not in out})
    return out


def file_entries(hashed: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
    return {rel: {"sha256": sha, "size": size} for rel, (sha, size) in sorted(hashed.items())}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IntegrityError(f"{where}: manifest is not valid JSON") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or m.get("schema") != SCHEMA:
        raise IntegrityError(f"{where}: not a registry manifest (schema {SCHEMA})")
    return m


# --- hashing ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], progress=None) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return h.hexdigest(), size


def copy_hashed(src: Path, dst: Path, progress=None) -> tuple[str, int]:
    """Copy ``src`` to a new file ``dst`` (fsynced), hashing the bytes written."""
    h = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while chunk := fi.read(CHUNK):
            fo.write(chunk)
            h.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), size


def check_files(expected: dict[str, dict[str, Any]], actual: dict[str, tuple[str, int]], where: str) -> None:
    """Fail closed: name the first file that is missing, extra, resized or has another sha256."""
    for rel in sorted(expected):
        if rel not in actual:
            raise IntegrityError(f"{where}: file {rel} is missing")
        sha, size = actual[rel]
        want = expected[rel]
        if size != want["size"]:
            raise IntegrityError(f"{where}: file {rel} has {size} bytes, manifest says {want['size']}")
        if sha != want["sha256"]:
            raise IntegrityError(
                f"{where}: file {rel} sha256 {sha[:12]}... differs from manifest {want['sha256'][:12]}..."
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise IntegrityError(f"{where}: file {extra[0]} is not in the manifest")
