"""The quantized formats' arithmetic and the kernels that run them (``cluster.quant``'s engine room).

* primitives: quantize / dequantize / pack int8 and int4 (the canonical on-disk layouts that
  ``cluster.quant`` documents), per-token activation quantization;
* kernels: every way a ``QuantLinear`` can compute ``x @ W.T`` here (dequantize + matmul,
  ``_weight_int8pack_mm``, fbgemm, ``torch._int_mm``, the aten int4 kernels, Retort's own C++
  kernels), each deriving its packed weight form from the canonical buffers at first use;
* selection: which kernel a layer runs, measured per device, dtype, shape and batch bucket among
  those that exist and agree with the dequantize reference (``RETORT_QUANT_KERNEL`` forces one).

The modules and whole-model conversion live in ``cluster.quant``, which re-exports these names.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cluster import kernels as _ext

if TYPE_CHECKING:
    from cluster.quant import QuantLinear

SCHEMES = ("int8", "int4", "w8a8", "w4a8")
GROUPED = ("int4", "w4a8")  # schemes stored as packed int4 groups
ACT_QUANT = ("w8a8", "w4a8")  # schemes that quantize activations to int8 on the fly
GROUP_SIZES = (32, 64, 128)

# ----------------------------------------------------------------------------- primitives


def quantize_int8(
    w: torch.Tensor, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (N, K) float -> q int8 (N, K), scale fp32 (N,), zero fp32 (N,) | None; W ≈ q*scale + zero."""
    w = w.detach().float()
    if symmetric:
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # (N,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale, None
    lo, hi = w.amin(dim=1), w.amax(dim=1)  # (N,)
    scale = ((hi - lo) / 255.0).clamp(min=1e-10)
    zero = lo + 128.0 * scale  # q = -128 maps to lo
    q = torch.round((w - zero[:, None]) / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale, zero


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    w = q.float() * scale.float()[:, None]  # (N, K)
    return w + zero.float()[:, None] if zero is not None else w


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8-valued (N, K) in [0, 15], K even -> uint8 (N, K/2); low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K) in [0, 15]."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (N, K) -> packed uint8 (N, K/2), scale (N, K/g), zero (N, K/g) | None; W ≈ (q-8)*scale + zero."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    if symmetric:
        scale = (wg.abs().amax(dim=-1) / 7.0).clamp(min=1e-10)  # (N, G); q-8 in [-8, 7]
        q = torch.round(wg / scale[..., None]).clamp(-8, 7) + 8
        zero = None
    else:
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-10)
        zero = lo + 8.0 * scale  # q = 0 maps to lo
        q = torch.round((wg - zero[..., None]) / scale[..., None]).clamp(-8, 7) + 8
    return pack_int4(q.reshape(N, K).to(torch.uint8)), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    N, G = scale.shape
    q = unpack_int4(packed).float().reshape(N, G, -1) - 8.0  # (N, G, g)
    w = q * scale.float()[..., None]
    if zero is not None:
        w = w + zero.float()[..., None]
    return w.reshape(N, -1)


def quantize_act_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> q int8 (M, K), scale fp32 (M, 1): dynamic symmetric per-token."""
    s = (x.float().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-10)
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s


# ----------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Kernel:
    """One way to compute ``x (M, K) @ W.T`` for a scheme; ``run(module, x) -> (M, N)`` float."""

    name: str
    devices: tuple[str, ...]
    run: Callable[[QuantLinear, torch.Tensor], torch.Tensor]
    exact: bool = True  # False: quantizes activations differently from the reference
    rtol: float = 2e-3  # agreement with the reference required for selection (x max |ref|)
    bind: Callable[[QuantLinear], Callable[[torch.Tensor], torch.Tensor]] | None = None  # run, minus lookups


def _offset(m: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8: x @ (q*s + z).T = x @ (q*s).T + sum_k(x) * z."""
    z = m._zero()
    return y if z is None else y + x.float().sum(-1, keepdim=True) * z.float()


def _dequant_run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if m.scheme in ACT_QUANT:
        xq, xs = quantize_act_per_token(x)
        x = xq.float() * xs
    w = m.dequantize().to(x.device)
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda else torch.float32
    return F.linear(x.to(dt), w.to(dt))


def _int8pack_run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    scale = m.prepared(f"int8pack:{dt}", lambda: m.weight_scale.to(dt))
    return _offset(m, x, torch._weight_int8pack_mm(x.to(dt).contiguous(), m.weight, scale).float())


def _int8_codes(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8 codes (N, K) and scales (N,): stored ones, or int4 re-rounded."""
    if m.scheme == "w8a8":
        return m.weight, m.weight_scale.float()
    q, s, _ = quantize_int8(m.dequantize(), symmetric=True)
    return q, s


def _fbgemm_params(m: QuantLinear) -> Any:
    q, s = _int8_codes(m)
    with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's prepack takes one
        warnings.simplefilter("ignore", UserWarning)
        qw = torch.quantize_per_channel(  # exactly the int8 codes: (q * s) / s
            q.float() * s[:, None], s.double(), torch.zeros(m.out_features, dtype=torch.long), 0, torch.qint8
        )
    return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fbgemm dynamic linear: activations quantized per tensor (asymmetric uint8) on the fly."""
    packed = m.prepared("fbgemm", lambda: _fbgemm_params(m))
    return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, False)


def _int_mm_run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    wt, ws = m.prepared(
        "int_mm", lambda: (lambda q, s: (q.t().contiguous(), s))(*_int8_codes(m))
    )  # (K, N) int8
    xq, xs = quantize_act_per_token(x)  # (M, K), (M, 1)
    pad = 17 - xq.shape[0] if xq.is_cuda and xq.shape[0] <= 16 else 0  # cuBLASLt int8 needs M > 16
    if pad > 0:
        xq = F.pad(xq, (0, 0, 0, pad))
    acc = torch._int_mm(xq, wt)[: xs.shape[0]]  # (M, N) int32
    return acc.float() * xs * ws


def _int4_cpu_state(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    q = unpack_int4(m.weight).to(torch.int32)  # (N, K) in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zero = m._zero() if m._zero() is not None else torch.zeros_like(m.weight_scale)
    sz = torch.stack([m.weight_scale.t(), zero.t()], dim=-1).contiguous()  # (G, N, 2)
    return packed, sz


def _int4_cpu_run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    dt = x.dtype if x.dtype == torch.bfloat16 else torch.float32
    packed, sz = m.prepared("int4pack_cpu", lambda: _int4_cpu_state(m))
    sz = m.prepared(f"int4pack_cpu:{dt}", lambda: sz.to(dt))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dt).contiguous(), packed, m.group_size, sz).float()


def _int4_cuda_state(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    q = unpack_int4(m.weight)  # (N, K) in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack(pack_int4_hi_first(q).contiguous(), 8)
    zero = m._zero() if m._zero() is not None else torch.zeros_like(m.weight_scale)
    sz = torch.stack([m.weight_scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    return packed, sz


def pack_int4_hi_first(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) -> uint8 (N, K/2) with the even column in the HIGH nibble (tinygemm's input)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def _int4_cuda_run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    packed, sz = m.prepared("int4pack", lambda: _int4_cuda_state(m))
    return torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, m.group_size, sz).float()


def _retort_state(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The extension's layout: repacked codes, scale (N, G), offset = zero - 8 * scale (N, G)."""
    zero = m._zero()
    offset = (zero.float() if zero is not None else 0.0) - 8.0 * m.weight_scale.float()
    return _ext.repack_int4(unpack_int4(m.weight)), m.weight_scale.float().contiguous(), offset.contiguous()


def _retort_ops() -> Any:
    ops = _ext.int4_ops()
    if ops is None:
        raise RuntimeError(f"retort int4 CPU kernel unavailable: {_ext.unavailable_reason()}")
    return ops


def _retort_bind(op: str, key: str) -> Callable[[QuantLinear], Callable[[torch.Tensor], torch.Tensor]]:
    """``int4_f32``: weight-only, fp32 activations, weights dequantized in registers. ``int4_a8``: per-token
    int8 activations (as the reference quantizes them), integer dots per group (VNNI)."""

    def bind(m: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = getattr(_retort_ops(), op)
        w, s, o = m.prepared(key, lambda: _retort_state(m))
        g = m.group_size
        return lambda x: fn(x.float().contiguous(), w, s, o, g)

    return bind


_retort_f32_bind, _retort_a8_bind = (
    _retort_bind("int4_f32", "retort_int4"),
    _retort_bind("int4_a8", "retort_int4a8"),
)


DEQUANT = Kernel("dequant", ("cpu", "cuda"), _dequant_run)
KERNELS: dict[str, dict[str, Kernel]] = {
    "int8": {k.name: k for k in (DEQUANT, Kernel("int8pack", ("cpu", "cuda"), _int8pack_run))},
    "int4": {
        k.name: k
        for k in (
            DEQUANT,
            Kernel("int4pack_cpu", ("cpu",), _int4_cpu_run),
            Kernel("retort_int4", ("cpu",), lambda m, x: _retort_f32_bind(m)(x), bind=_retort_f32_bind),
            Kernel("int4pack", ("cuda",), _int4_cuda_run, rtol=2e-2),
        )
    },  # bf16 compute
    "w8a8": {
        k.name: k
        for k in (
            DEQUANT,
            Kernel("int_mm", ("cpu", "cuda"), _int_mm_run),
            Kernel("fbgemm", ("cpu",), _fbgemm_run, exact=False, rtol=5e-2),
        )
    },
    "w4a8": {
        k.name: k
        for k in (
            DEQUANT,
            Kernel("retort_int4a8", ("cpu",), lambda m, x: _retort_a8_bind(m)(x), bind=_retort_a8_bind),
            Kernel("int_mm", ("cpu", "cuda"), _int_mm_run, exact=False, rtol=3e-2),
            Kernel("fbgemm", ("cpu",), _fbgemm_run, exact=False, rtol=5e-2),
        )
    },
}


# ----------------------------------------------------------------------------- selection

_MEASURED: dict[tuple, str] = {}  # (scheme, device, dtype, N, K, group, symmetric, bucket) -> kernel
MEASUREMENTS: dict[tuple, dict[str, float]] = {}  # same key -> {kernel: µs/call} (inf = unusable)


def _bucket(m: int) -> int:
    """Batch buckets measured separately: decode-sized (<= 4 rows) vs larger."""
    return 1 if m <= 4 else 16


def _time_us(fn: Callable[[], Any], device: torch.device, budget_s: float = 0.05, reps: int = 7) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return min(times) * 1e6  # the least disturbed run: robust when other processes share the CPU


def _agrees(m: QuantLinear, kernel: Kernel, y: torch.Tensor, ref: torch.Tensor) -> bool:
    err = (y.float() - ref.float()).abs().max().item()
    rtol = kernel.rtol if ref.dtype == torch.float32 else max(kernel.rtol, 5e-2)
    tol = rtol * (ref.abs().max().item() + 1e-6)
    return bool(torch.isfinite(y).all()) and err <= tol


def select_kernel(m: QuantLinear, device: torch.device, dtype: torch.dtype, bucket: int) -> str:
    """The fastest kernel for this scheme/device/dtype/shape/bucket that agrees with the reference."""
    forced = os.environ.get("RETORT_QUANT_KERNEL", "")
    table = KERNELS[m.scheme]
    if forced and forced in table and device.type in table[forced].devices:
        return forced
    key = (m.scheme, device.type, dtype, m.out_features, m.in_features, m.group_size, m.symmetric, bucket)
    if key in _MEASURED:
        return _MEASURED[key]
    x = torch.randn(bucket, m.in_features, device=device).to(dtype)
    ref = DEQUANT.run(m, x)
    timings: dict[str, float] = {}
    for name, kernel in table.items():
        if device.type not in kernel.devices:
            continue
        try:
            y = kernel.run(m, x)
            ok = _agrees(m, kernel, y, ref)
            timings[name] = _time_us(lambda k=kernel: k.run(m, x), device) if ok else float("inf")
        except (RuntimeError, NotImplementedError, TypeError):
            timings[name] = float("inf")
            m._kernels = {k: v for k, v in m._kernels.items() if not k.startswith(name)}
    best = min(timings, key=lambda k: timings[k])
    for name in table:  # drop prepared state of the losers (it holds weight copies)
        if name != best:
            m._kernels = {k: v for k, v in m._kernels.items() if not k.startswith(name)}
    _MEASURED[key], MEASUREMENTS[key] = best, timings
    return best
