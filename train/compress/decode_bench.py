"""Decode throughput with a contiguous KV cache: ``prefill`` once, then ``decode_one_token`` steps.

The cache implements the model's ``KVCache.attend`` protocol over preallocated
``(B, max_len, Hkv, D)`` tensors per layer, so decode never recomputes the prefix. Each
measurement can run in a fresh subprocess (``measure_in_subprocess``) so that peak RSS belongs to
that model alone and timings do not share a warm allocator with another variant:

    python -m train.compress.decode_bench DIR --batch 1 16 --prompt 16 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cluster.errors import JobFailed


class ContiguousKV:
    """Per layer k/v ``(B, max_len, Hkv, D)``; ``pos`` tokens are filled. ``advance(T)`` after a forward."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos, self.max_len = 0, max_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D), causal over cache + new tokens."""
        B, T, H, D = q.shape
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len}")
        self.k[layer][:, self.pos : end] = k
        self.v[layer][:, self.pos : end] = v
        kk = self.k[layer][:, :end].transpose(1, 2)  # (B, Hkv, end, D)
        vv = self.v[layer][:, :end].transpose(1, 2)
        mask = None
        if T > 1:  # query i (absolute pos + i) sees keys <= pos + i
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=self.pos)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kk, vv, attn_mask=mask, enable_gqa=kk.shape[1] != H
        )  # (B, H, T, D)
        return out.transpose(1, 2)

    def advance(self, n: int) -> None:
        self.pos += n


def _positions(cache: ContiguousKV, B: int, T: int, device: torch.device) -> torch.Tensor:
    return torch.arange(cache.pos, cache.pos + T, device=device).expand(B, T)


@torch.inference_mode()
def prefill(model, cache: ContiguousKV, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> next token (B, 1) (greedy)."""
    logits = model(tokens, _positions(cache, *tokens.shape, tokens.device), kv=cache)  # (B, T, V)
    cache.advance(tokens.shape[1])
    return logits[:, -1:].argmax(-1)


@torch.inference_mode()
def decode_one_token(model, cache: ContiguousKV, tok: torch.Tensor) -> torch.Tensor:
    """tok (B, 1) -> next token (B, 1) (greedy)."""
    logits = model(tok, _positions(cache, tok.shape[0], 1, tok.device), kv=cache)  # (B, 1, V)
    cache.advance(1)
    return logits[:, -1:].argmax(-1)


def generate(model, prompt: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy ``n_tokens`` after ``prompt`` (B, P) -> (tokens (B, n_tokens), decode seconds)."""
    cfg = model.cfg
    B, P = prompt.shape
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    cache = ContiguousKV(cfg.n_layers, B, P + n_tokens, cfg.n_kv_heads, cfg.dim_head, dtype, prompt.device)
    tok = prefill(model, cache, prompt)
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(n_tokens - 1):
        tok = decode_one_token(model, cache, tok)
        out.append(tok)
    return torch.cat(out, dim=1), time.perf_counter() - t0


def decode_tok_s(model, batch: int, prompt_len: int, n_tokens: int, seed: int = 0, repeats: int = 2) -> float:
    """Decode tokens/s (generated tokens across the batch / decode time; best of ``repeats``)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=gen)
    generate(model, prompt, 4)  # warm-up: kernel selection, allocator
    best = min(generate(model, prompt, n_tokens)[1] for _ in range(repeats))
    return batch * (n_tokens - 1) / best


def _rss_mb() -> float:
    """Peak resident set of this process in MB. Linux's VmHWM is reset by exec; ru_maxrss is not
    (a child starts with its parent's peak), so prefer VmHWM."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure(
    path: str | Path, batches: list[int], prompt_len: int, n_tokens: int, threads: int | None = None
) -> dict[str, Any]:
    """Load ``path`` and time decode; peak RSS is the process's (run in a fresh process)."""
    from cluster.model import Transformer
    from cluster.quant import kernel_choices

    if threads:
        torch.set_num_threads(threads)
    base = _rss_mb()
    t = time.perf_counter()
    model = Transformer.from_pretrained(path)
    load_s = time.perf_counter() - t
    out: dict[str, Any] = {"load_s": round(load_s, 3)}
    for b in batches:
        out[f"tok_s_b{b}"] = round(decode_tok_s(model, b, prompt_len, n_tokens), 2)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    out["model_rss_mb"] = round(_rss_mb() - base, 1)
    out["kernels"] = sorted({k for ks in kernel_choices(model).values() for k in ks})
    return out


def measure_in_subprocess(
    path: str | Path,
    batches: list[int],
    prompt_len: int,
    n_tokens: int,
    threads: int | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "train.compress.decode_bench",
        str(path),
        "--prompt",
        str(prompt_len),
        "--tokens",
        str(n_tokens),
        "--batch",
        *map(str, batches),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[2]
    )
    if proc.returncode != 0:
        raise JobFailed(f"decode benchmark of {path} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compress.decode_bench")
    p.add_argument("path")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.path, a.batch, a.prompt, a.tokens, a.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
