"""The teacher's top-k logit cache: run the teacher over the training windows once, read it back by window.

Alignment: window ``w`` of ``train.data.loader.packed_batches`` is ``tokens[w*L : w*L + L + 1]``
(``L = seq_len``); the student is trained on its first ``L`` tokens predicting the next ones.
The cache stores, for every position ``t < L`` of every window, the teacher's ``k`` most
likely next tokens given ``tokens[w*L : w*L + t + 1]`` — exactly what an online teacher would
compute on the same batch — as int32 ids and fp16 log-probabilities (log-softmax at T=1 over
the tokenizer's real vocabulary, padded rows sliced off). ``6 * k`` bytes per token (k=32:
192 B/token; DistillKit reports ~300).

Layout of a cache directory::

    manifest.json            format, fingerprint, teacher ref + weights sha256, data fingerprint,
                             seq_len, k, vocab_size, n_windows, shard_windows, every shard's sha256
    shard-00000.safetensors  "ids" int32 (n, L, k), "logprobs" float16 (n, L, k); n = shard_windows
    ...                      (the last shard may hold fewer windows)

Shards are standard safetensors files (no pickle) that are read through ``np.memmap`` at the
tensor offsets in their header, so a lookup touches only the windows it asks for. Opening a
cache checks the manifest, every shard's size and header, and (by default) its sha256: a
missing or corrupt shard is a clear ``RetortError`` before training starts. The fingerprint
covers the teacher weights, the data, ``seq_len``, ``k`` and the window count; a cache is
written to a temporary sibling and renamed into place when complete, so a directory that
exists is whole.

Entry point (the config kind is ``teacher``; its ``topk`` section and ``data``/``registry``)::

    python -m train.topk -c configs/teacher/small.yaml [topk.k=16 topk.max_windows=4096 ...]

Last stdout line: the cache directory (``distill`` configs take it as ``topk.dir``). When
``topk.max_windows`` caps the cache, a distill job must read only ``tokens[:cache.token_limit]``
so that every window it draws is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cluster.checkpoint import file_sha256, weights_sha256
from cluster.errors import RetortError

FORMAT = "retort-topk-v1"
MANIFEST = "manifest.json"
BYTES_PER_ENTRY = 4 + 2  # int32 id + fp16 logprob
_ST_DTYPES = {"I32": np.int32, "F16": np.float16}


@dataclass(frozen=True)
class TopKCacheInfo:
    dir: str
    fingerprint: str
    n_windows: int
    seq_len: int
    k: int
    tokens: int
    bytes: int
    bytes_per_token: float
    seconds: float
    tokens_per_s: float
    reused: bool = False
    cpu_seconds: float = 0.0  # process CPU time: seconds x cores on an idle machine, more on a shared one


def cache_fingerprint(
    teacher_sha: str,
    data_fingerprint: str,
    seq_len: int,
    k: int,
    vocab_size: int,
    n_windows: int,
    bf16: bool = False,
) -> str:
    key = dict(format=FORMAT, teacher=teacher_sha, data=data_fingerprint, seq_len=seq_len, k=k,
               vocab_size=vocab_size, n_windows=n_windows)  # fmt: skip
    if bf16:  # only then: fp32 caches keep the fingerprints they always had
        key["compute"] = "bf16"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --- reading -------------------------------------------------------------------------------------


def _memmap_safetensors(path: Path) -> dict[str, np.memmap]:
    """The tensors of a safetensors file as read-only memmaps (no copy, no pickle)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise RetortError(f"{path}: truncated top-k shard (no safetensors header)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetortError(f"{path}: corrupt top-k shard (unreadable safetensors header)") from None
    out = {}
    for name in ("ids", "logprobs"):
        meta = header.get(name)
        if not meta or meta.get("dtype") not in _ST_DTYPES:
            raise RetortError(f"{path}: corrupt top-k shard (tensor {name!r} missing or of the wrong type)")
        start, end = meta["data_offsets"]
        dtype = _ST_DTYPES[meta["dtype"]]
        shape = tuple(meta["shape"])
        if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise RetortError(f"{path}: corrupt top-k shard (tensor {name!r} size does not match its shape)")
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
    return out


class TopKCache:
    """A verified top-k cache directory; ``lookup(window_idx)`` returns the cached teacher for a batch."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = True) -> None:
        self.dir = Path(path).expanduser()
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise RetortError(
                f"{self.dir}: not a top-k cache (no {MANIFEST}); build one with python -m train.topk"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise RetortError(f"{mpath}: corrupt manifest ({e.msg})") from None
        if self.manifest.get("format") != FORMAT:
            raise RetortError(
                f"{mpath}: unknown cache format {self.manifest.get('format')!r} (expected {FORMAT})"
            )
        m = self.manifest
        self.seq_len, self.k, self.n_windows = int(m["seq_len"]), int(m["k"]), int(m["n_windows"])
        self.shard_windows, self.fingerprint = int(m["shard_windows"]), str(m["fingerprint"])
        self._shards = [self._open_shard(i, s, verify) for i, s in enumerate(m["shards"])]

    def _open_shard(self, i: int, entry: dict[str, Any], verify: bool) -> dict[str, np.memmap]:
        path = self.dir / entry["file"]
        if not path.is_file():
            raise RetortError(f"{path}: top-k shard {i} is missing; rebuild the cache (python -m train.topk)")
        if path.stat().st_size != entry["bytes"]:
            raise RetortError(
                f"{path}: top-k shard {i} is corrupt (size {path.stat().st_size} != {entry['bytes']})"
            )
        if verify and file_sha256(path) != entry["sha256"]:
            raise RetortError(f"{path}: top-k shard {i} is corrupt (sha256 mismatch); rebuild the cache")
        arrays = _memmap_safetensors(path)
        want = (entry["windows"], self.seq_len, self.k)
        if arrays["ids"].shape != want or arrays["logprobs"].shape != want:
            raise RetortError(
                f"{path}: top-k shard {i} has shape {arrays['ids'].shape}, manifest says {want}"
            )
        return arrays

    @property
    def token_limit(self) -> int:
        """Tokens a consumer may read so that every window it draws is cached: ``n_windows * L + 1``."""
        return self.n_windows * self.seq_len + 1

    @property
    def bytes_per_token(self) -> float:
        return float(self.k * BYTES_PER_ENTRY)

    def check(self, *, data_fingerprint: str | None = None, seq_len: int | None = None,
              teacher_sha256: str | None = None) -> None:  # fmt: skip
        """Refuse a cache built for other data, another window length or another teacher."""
        m = self.manifest
        if data_fingerprint is not None and m["data_fingerprint"] != data_fingerprint:
            raise RetortError(f"{self.dir}: top-k cache was built for data {m['data_fingerprint'][:12]}, "
                              f"this job's data is {data_fingerprint[:12]}; rebuild it (python -m train.topk)")  # fmt: skip
        if seq_len is not None and self.seq_len != seq_len:
            raise RetortError(f"{self.dir}: top-k cache has seq_len {self.seq_len}, the job uses {seq_len}")
        if teacher_sha256 is not None and m["teacher_sha256"] != teacher_sha256:
            raise RetortError(f"{self.dir}: top-k cache was built by teacher {m['teacher']} "
                              f"(weights {m['teacher_sha256'][:12]}), not by this job's teacher ({teacher_sha256[:12]})")  # fmt: skip

    def lookup(self, window_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``window_idx (B,)`` -> ``ids int32 (B, L, k)``, ``logprobs float16 (B, L, k)`` (CPU tensors)."""
        idx = window_idx.detach().cpu().numpy().astype(np.int64).reshape(-1)  # (B,)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_windows):
            bad = int(idx.max() if idx.max() >= self.n_windows else idx.min())
            raise RetortError(f"window {bad} is not in the top-k cache {self.dir} (it holds windows 0..{self.n_windows - 1}); "
                              f"read at most cache.token_limit={self.token_limit} tokens")  # fmt: skip
        ids = np.empty((idx.size, self.seq_len, self.k), dtype=np.int32)
        lps = np.empty((idx.size, self.seq_len, self.k), dtype=np.float16)
        shard, local = np.divmod(idx, self.shard_windows)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            ids[rows] = self._shards[s]["ids"][local[rows]]
            lps[rows] = self._shards[s]["logprobs"][local[rows]]
        return torch.from_numpy(ids), torch.from_numpy(lps)


# --- writing -------------------------------------------------------------------------------------


@torch.inference_mode()
def _topk_batch(
    model: torch.nn.Module, x: np.ndarray, k: int, vocab_size: int, device: torch.device, bf16: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``x (B, L)`` -> top-k ids int32 ``(B, L, k)`` and fp16 log-probs ``(B, L, k)``.

    ``bf16``: the model's matmuls run under bf16 autocast; the log-softmax and top-k are fp32.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(torch.from_numpy(x.astype(np.int64)).to(device))  # (B, L, V)
    logits = logits[0] if isinstance(logits, tuple) else logits
    logp = F.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # (B, L, V)
    vals, ids = logp.topk(k, dim=-1)  # (B, L, k)
    return ids.to(torch.int32).cpu().numpy(), vals.to(torch.float16).cpu().numpy()


def _write_shard(path: Path, ids: np.ndarray, lps: np.ndarray) -> dict[str, Any]:
    from safetensors.numpy import save_file

    save_file(
        {"ids": np.ascontiguousarray(ids), "logprobs": np.ascontiguousarray(lps)},
        str(path),
        metadata={"format": FORMAT},
    )
    return {
        "file": path.name,
        "windows": int(ids.shape[0]),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def build_topk_cache(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    k: int,
    out_dir: str | os.PathLike[str],
    batch_size: int,
    *,
    vocab_size: int,
    teacher: str,
    teacher_sha256: str,
    data_fingerprint: str,
    shard_windows: int = 4096,
    max_windows: int | None = None,
    bf16: bool = False,
    progress: bool = True,
) -> TopKCacheInfo:
    """Run ``model`` over every training window of ``tokens`` once and write the cache to ``out_dir``.

    ``tokens`` is the 1-D train split (``train.data.load_split``). An existing complete cache
    with the same fingerprint is reused; one with another fingerprint is refused.
    """
    from train.data.loader import num_windows

    if not 1 <= k <= vocab_size:
        raise RetortError(f"top-k k={k} must be in 1..vocab_size ({vocab_size})")
    n_windows = num_windows(len(tokens), seq_len)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise RetortError(f"{len(tokens)} tokens hold no window of seq_len {seq_len}")
    fp = cache_fingerprint(teacher_sha256, data_fingerprint, seq_len, k, vocab_size, n_windows, bf16)
    out = Path(out_dir).expanduser()
    if (out / MANIFEST).is_file():
        cache = TopKCache(out)
        if cache.fingerprint != fp:
            raise RetortError(f"{out} holds a top-k cache with another fingerprint ({cache.fingerprint[:12]} != {fp[:12]}); "
                              "remove it or choose another topk.dir")  # fmt: skip
        n_tok = n_windows * seq_len
        return TopKCacheInfo(
            str(out), fp, n_windows, seq_len, k, n_tok, _size(out), _size(out) / n_tok, 0.0, 0.0, True
        )
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0, c0 = time.perf_counter(), time.process_time()  # CPU time too: for runs on a shared machine
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=n_windows * seq_len, desc=f"top-{k} cache", unit="tok", unit_scale=True, file=sys.stderr
        )
    shards: list[dict[str, Any]] = []
    offsets = np.arange(seq_len)  # (L,)
    try:
        for s0 in range(0, n_windows, shard_windows):
            n = min(shard_windows, n_windows - s0)
            ids = np.empty((n, seq_len, k), dtype=np.int32)
            lps = np.empty((n, seq_len, k), dtype=np.float16)
            for b0 in range(0, n, batch_size):
                w = np.arange(s0 + b0, s0 + min(b0 + batch_size, n))  # (B,) window ids
                x = np.asarray(tokens[w[:, None] * seq_len + offsets])  # (B, L)
                ids[b0 : b0 + len(w)], lps[b0 : b0 + len(w)] = _topk_batch(
                    model, x, k, vocab_size, device, bf16
                )
                if bar is not None:
                    bar.update(len(w) * seq_len)
            shards.append(_write_shard(tmp / f"shard-{len(shards):05d}.safetensors", ids, lps))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    manifest = dict(format=FORMAT, fingerprint=fp, teacher=teacher, teacher_sha256=teacher_sha256,
                    data_fingerprint=data_fingerprint, seq_len=seq_len, k=k, vocab_size=vocab_size,
                    n_windows=n_windows, shard_windows=shard_windows, bytes_per_token=k * BYTES_PER_ENTRY,
                    compute="bf16" if bf16 else "fp32", seconds=round(seconds, 3),
                    cpu_seconds=round(cpu_seconds, 3), shards=shards)  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    n_tok = n_windows * seq_len
    size = _size(out)
    return TopKCacheInfo(
        str(out),
        fp,
        n_windows,
        seq_len,
        k,
        n_tok,
        size,
        size / n_tok,
        seconds,
        n_tok / seconds,
        cpu_seconds=cpu_seconds,
    )


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


# --- the job -------------------------------------------------------------------------------------


def run(cfg) -> TopKCacheInfo:
    """``python -m train.topk -c configs/teacher/<preset>.yaml``: cache the configured teacher's top-k."""
    from cluster.checkpoint import load_model
    from cluster.registry import open_registry
    from train.data import load_split, prepare
    from train.distill.losses import check_same_tokenizer

    data = prepare(cfg.data)
    reg = open_registry(cfg.registry)
    ref = reg.ref(cfg.teacher_ref())
    teacher_dir = reg.resolve(ref)
    check_same_tokenizer(teacher_dir, data.tokenizer_sha256)
    device = torch.device("cuda" if cfg.training.device != "cpu" and torch.cuda.is_available() else "cpu")
    if cfg.training.device == "cuda" and device.type != "cuda":
        raise RetortError("training.device=cuda but CUDA is not available")
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    model = load_model(teacher_dir, device=device)
    t = cfg.topk
    out = (
        Path(t.dir).expanduser()
        if t.dir
        else Path(data.dir) / "topk" / f"{ref.name}-v{ref.version}-L{t.seq_len}-k{t.k}"
    )
    info = build_topk_cache(
        model, load_split(data.dir, "train"), t.seq_len, t.k, out, t.batch_size,
        vocab_size=data.vocab_size, teacher=str(ref), teacher_sha256=weights_sha256(teacher_dir),
        data_fingerprint=data.fingerprint, shard_windows=t.shard_windows, max_windows=t.max_windows,
        bf16=t.bf16,
    )  # fmt: skip
    print(json.dumps({"topk_cache": asdict(info)}), flush=True)
    print(f"top-{info.k} cache: {info.n_windows} windows, {info.tokens} tokens, {info.bytes / 2**20:.1f} MiB, "
          f"{info.bytes_per_token:.1f} B/token, {info.seconds:.1f} s ({info.cpu_seconds:.1f} CPU-s, "
          f"{torch.get_num_threads()} threads{', bf16' if t.bf16 else ''}){' (reused)' if info.reused else ''}",
          flush=True)  # fmt: skip
    print(info.dir, flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    from cluster.entry import job_main

    return job_main("teacher", run, "train.topk", argv)


if __name__ == "__main__":
    sys.exit(main())
