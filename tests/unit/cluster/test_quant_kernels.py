"""Retort's int4 CPU kernels (cluster/kernels): agreement with the dequantized reference on both ISA
paths, their place in the measured selection, and the fallback when the extension is unavailable."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cluster import kernels, quant, quant_kernels

ROOT = Path(__file__).resolve().parents[3]


def _x86_with_avx2() -> bool:
    import platform

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and " avx2" in flags and " fma" in flags


# Only a CPU without AVX2 may skip: on x86 with AVX2 a build failure is a test failure.
needs_ext = pytest.mark.skipif(not _x86_with_avx2(), reason="the int4 kernels need x86-64 with AVX2+FMA")

# (N, K, group): odd N (tails of the 4-row tiles), K = 352 (11 blocks of 32), every group size
SHAPES = [(37, 352, 32), (64, 256, 64), (70, 384, 128), (8, 128, 32)]
BATCHES = [1, 2, 3, 5, 8, 13, 16]


def _weights(n: int, k: int, group: int, symmetric: bool, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quant.quantize_int4(w, group, symmetric)


def _ops():
    ops = kernels.int4_ops()
    assert ops is not None, f"the int4 extension did not build: {kernels.unavailable_reason()}"
    return ops


def _check_against_reference(ops, n: int, k: int, group: int, symmetric: bool) -> None:
    packed, scale, zero = _weights(n, k, group, symmetric)
    w = quant.dequantize_int4(packed, scale, zero)  # (N, K) the reference weights
    m = quant.Int4Linear(k, n, False, symmetric, group)
    m.weight, m.weight_scale = packed, scale
    if zero is not None:
        m.weight_zero = zero
    rp, s, off = quant._retort_state(m)
    for batch in BATCHES:
        x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch))
        ref = x @ w.t()
        y = ops.int4_f32(x, rp, s, off, group)
        assert y.shape == (batch, n)
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, ("int4_f32", n, k, group, batch)
        xq, xs = quant.quantize_act_per_token(x)  # the w4a8 reference quantizes activations per token
        ref8 = (xq.float() * xs) @ w.t()
        y8 = ops.int4_a8(x, rp, s, off, group)
        assert (y8 - ref8).abs().max() <= 1e-5 * ref8.abs().max() + 1e-6, ("int4_a8", n, k, group, batch)


@needs_ext
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_kernels_match_dequantized_reference(n: int, k: int, group: int, symmetric: bool) -> None:
    _check_against_reference(_ops(), n, k, group, symmetric)


@needs_ext
def test_avx2_path_matches_reference() -> None:
    """RETORT_INT4_ISA=avx2 forces the AVX2 path (read once per process: run in a fresh one)."""
    code = textwrap.dedent("""
        from cluster import kernels
        from tests.unit.cluster.test_quant_kernels import SHAPES, _check_against_reference
        ops = kernels.int4_ops()
        assert ops.isa() == "avx2", ops.isa()
        for n, k, g in SHAPES:
            for sym in (False, True):
                _check_against_reference(ops, n, k, g, sym)
        print("ok")
    """)
    env = {**os.environ, "RETORT_INT4_ISA": "avx2", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@needs_ext
def test_kernels_reject_bad_shapes() -> None:
    ops = _ops()
    packed, scale, zero = _weights(16, 128, 32, False)
    rp = kernels.repack_int4(quant.unpack_int4(packed))
    with pytest.raises(RuntimeError, match="columns"):
        ops.int4_f32(torch.randn(1, 96), rp, scale, zero, 32)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.int4_f32(torch.randn(1, 128), rp, scale, zero, 48)


def test_repack_layout() -> None:
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    rp = kernels.repack_int4(codes)
    assert rp.shape == (1, 32)
    assert int(rp[0, 0]) & 0xF == int(codes[0, 0]) and int(rp[0, 0]) >> 4 == int(codes[0, 16])
    assert int(rp[0, 16]) & 0xF == int(codes[0, 32]) and int(rp[0, 16]) >> 4 == int(codes[0, 48])


@needs_ext
@pytest.mark.parametrize("scheme,name", [("int4", "retort_int4"), ("w4a8", "retort_int4a8")])
def test_selection_measures_the_retort_kernel(scheme: str, name: str) -> None:
    lin = nn.Linear(256, 72, bias=True)
    m = quant.MODULES[scheme].from_float(lin, group_size=64, name="l")
    m(torch.randn(1, 256))
    key = next(k for k in quant.MEASUREMENTS if k[0] == scheme and k[3:6] == (72, 256, 64))
    assert quant.MEASUREMENTS[key][name] < float("inf")  # it ran and agreed with the reference


def test_disabled_extension_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETORT_DISABLE_EXT", "1")
    monkeypatch.setattr(quant_kernels, "_MEASURED", {})  # selection lives there
    assert kernels.int4_ops() is None and "RETORT_DISABLE_EXT" in kernels.unavailable_reason()
    lin = nn.Linear(128, 40, bias=False)
    for scheme in ("int4", "w4a8"):
        m = quant.MODULES[scheme].from_float(lin, group_size=32, name="l")
        y = m(torch.randn(3, 128))
        assert y.shape == (3, 40)
        assert not any(c.startswith("retort") for c in m._choice.values()), m._choice
        ref = quant.DEQUANT.run(m, torch.zeros(1, 128))
        assert torch.isfinite(ref).all()


def test_build_failure_is_logged_once_and_falls_back(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A source that does not compile (a CI box without a working compiler looks the same to us)."""
    bad = tmp_path / "int4_cpu.cpp"
    bad.write_text("this is not C++;\n")
    monkeypatch.setattr(kernels, "SOURCE", bad)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with caplog.at_level(logging.WARNING, logger="retort.kernels"):
        assert kernels.int4_ops() is None
        assert kernels.int4_ops() is None  # not retried
    assert "error" in kernels.unavailable_reason().lower()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
