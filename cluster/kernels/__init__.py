"""Retort's own CPU kernels, compiled lazily with ``torch.utils.cpp_extension.load`` on first use.

``int4_ops()`` returns the ``torch.ops.retort_int4`` namespace (``int4_f32``, ``int4_a8``, ``isa``; see
``int4_cpu.cpp``) or None when the extension cannot be used here: not x86 with AVX2, no compiler, a build
error, or ``RETORT_DISABLE_EXT=1``. It is compiled once per source/flags under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/retort/torch_extensions``) with a one-line log; a failure is logged once and callers
fall back to other kernels — loading a model never fails because of it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("retort.kernels")

SOURCE = Path(__file__).with_name("int4_cpu.cpp")
EXT_DIR = "~/.cache/retort/torch_extensions"
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops" -> namespace or None once tried, "error" -> why not


def disabled() -> bool:
    return os.environ.get("RETORT_DISABLE_EXT", "") not in ("", "0")


def int4_ops() -> Any | None:
    """The compiled int4 ops, or None (the reason is in ``unavailable_reason()``)."""
    if disabled():
        return None
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build()
    return _state["ops"]


def unavailable_reason() -> str | None:
    if disabled():
        return "RETORT_DISABLE_EXT is set"
    return _state.get("error")


def _build() -> Any | None:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        _state["error"] = f"int4 CPU kernel needs x86-64 (this is {platform.machine()})"
        log.info("retort int4 CPU kernel unavailable: %s", _state["error"])
        return None
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(EXT_DIR))
    build_dir = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "retort_int4"
    before = _built(build_dir)
    t = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        load(
            name="retort_int4",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = torch.ops.retort_int4
        isa = ops.isa()
    except Exception as e:  # noqa: BLE001 - any build/load failure means "use another kernel"
        lines = str(e).strip().splitlines() or [""]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[-1])  # the compiler's first error
        _state["error"] = f"{type(e).__name__}: {first.strip()}"[:300]
        log.warning("retort int4 CPU kernel unavailable, falling back to other kernels: %s", _state["error"])
        return None
    if isa == "none":
        _state["error"] = "this CPU has neither AVX2+FMA nor AVX-512"
        log.warning("retort int4 CPU kernel unavailable: %s", _state["error"])
        return None
    if _built(build_dir) != before:
        log.warning(
            "retort int4 CPU kernel compiled in %.0fs (%s), cached under %s",
            time.perf_counter() - t,
            isa,
            build_dir,
        )
    else:
        log.info("retort int4 CPU kernel loaded (%s) from %s", isa, build_dir)
    return ops


def _built(build_dir: Path) -> tuple[str, float] | None:
    """The newest built library (name, mtime), to tell a compile from a cache hit."""
    libs = sorted(build_dir.glob("retort_int4*.so"), key=lambda f: f.stat().st_mtime)
    return (libs[-1].name, libs[-1].stat().st_mtime) if libs else None


def repack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (N, K) in [0, 15], K % 32 == 0 -> uint8 (N, K/2): per 32-column block, byte i holds
    column i (low nibble) and column i + 16 (high nibble) — the kernel's layout."""
    N, K = codes.shape
    blocks = codes.to(torch.uint8).reshape(N, K // 32, 2, 16)  # (N, blocks, lo/hi half, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2).contiguous()
