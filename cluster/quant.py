"""Quantized linear layers the evaluator and the serving engine load: int8, int4 and W8A8.

Serialized layout (``config.json["quantization_config"]["quant_method"] == "retort"``), per layer
with weight ``W (N=out, K=in)``; ``zero`` is an additive float offset, absent when symmetric:

- ``int8``  ``weight`` int8 (N, K), ``weight_scale`` fp32 (N,) [, ``weight_zero`` fp32 (N,)];
  ``W ≈ q * scale + zero`` (per output channel).
- ``int4``  ``weight`` uint8 (N, K/2), two values per byte (low nibble = even column),
  ``weight_scale`` fp32 (N, K/g) [, ``weight_zero`` fp32 (N, K/g)]; ``W ≈ (q - 8) * scale + zero``
  per group of g columns (gpt-fast / tinygemm convention, so the aten int4 kernels take it as is).
- ``w8a8``  as symmetric ``int8``; activations are quantized to int8 on the fly.
- ``w4a8``  stored as ``int4``; activations are quantized to int8 on the fly. Computed by Retort's
  int4 x int8 kernel (``cluster/kernels``), or with int8 kernels after re-rounding the int4 weights
  to per-channel int8 once, at first use.

Embeddings (``quantization_config["embeddings"]``, absent when the table stays in floating point):
the ``(vocab, d)`` table is stored like a linear with ``out = vocab, in = d`` under
``model.embed_tokens.{weight, weight_scale[, weight_zero]}`` in the layout of its own scheme (per row
for int8, groups along ``d`` for int4). A lookup dequantizes the gathered rows; when the model ties
its LM head, the head runs that same quantized matrix through the linear kernels (nothing is stored
under ``lm_head``).

The on-disk layout is canonical; each kernel derives its own packed form at first use. Which
kernel runs is chosen by measurement (:func:`select_kernel`) per device, dtype, shape and batch
bucket among those that exist here and agree with the dequantize-then-matmul reference, which is
always available as the fallback. ``RETORT_QUANT_KERNEL=name`` forces one kernel (if it applies).
The primitives, kernels and selection live in ``cluster.quant_kernels`` (re-exported here); this
module holds the layers and the whole-model conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from cluster.errors import RetortError
from cluster.quant_kernels import (  # noqa: F401 - re-exported: callers use cluster.quant for all of it
    ACT_QUANT,
    DEQUANT,
    GROUP_SIZES,
    GROUPED,
    KERNELS,
    MEASUREMENTS,
    SCHEMES,
    Kernel,
    _bucket,
    _retort_state,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_act_per_token,
    quantize_int4,
    quantize_int8,
    select_kernel,
    unpack_int4,
)

QUANT_METHOD = "retort"


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """Base: buffers hold the canonical layout; ``forward`` runs the selected kernel."""

    scheme = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        symmetric: bool,
        group_size: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.symmetric, self.group_size, self.name = symmetric, group_size, name
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernels: dict[str, Any] = {}  # kernel name -> prepared state (not serialized)
        self._choice: dict[tuple, str] = {}  # (device, dtype, bucket) -> kernel name
        self._bound: dict[
            tuple, Callable[[torch.Tensor], torch.Tensor]
        ] = {}  # same key -> x (M, K) -> (M, N)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, symmetric={self.symmetric}{g}"

    def dequantize(self) -> torch.Tensor:  # (N, K) fp32
        raise NotImplementedError

    def _fill(self, lin: nn.Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
        """Take the quantized weight, its scales (+ zeros) and ``lin``'s bias; shared by every ``from_float``."""
        self.weight, self.weight_scale = q, scale
        if zero is not None:
            self.weight_zero = zero
        if getattr(lin, "bias", None) is not None:
            self.bias = nn.Parameter(lin.bias.detach().float().clone())
        return self

    def _zero(self) -> torch.Tensor | None:
        return None if self.symmetric else self.weight_zero

    def _apply(self, fn, recurse=True):  # moving / casting invalidates prepared kernel state
        self._kernels.clear()
        self._choice.clear()
        self._bound.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        key = (x2.device.type, x2.dtype, _bucket(x2.shape[0]))
        run = self._bound.get(
            key
        )  # the hot path: one dict lookup, then the kernel (decode is overhead-bound)
        if run is None:
            kernel = self.kernel_for(x2)
            run = self._bound[key] = kernel.bind(self) if kernel.bind else partial(kernel.run, self)
        y = run(x2)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def kernel_for(self, x2: torch.Tensor) -> Kernel:
        key = (x2.device.type, x2.dtype, _bucket(x2.shape[0]))
        name = self._choice.get(key)
        if name is None:
            name = select_kernel(self, x2.device, x2.dtype, key[2])
            self._choice[key] = name
        return KERNELS[self.scheme][name]

    def prepared(self, kernel: str, build: Callable[[], Any]) -> Any:
        if kernel not in self._kernels:
            self._kernels[kernel] = build()
        return self._kernels[kernel]


class Int8Linear(QuantLinear):
    """Weight-only int8 (per output channel; symmetric, or asymmetric with a float offset)."""

    scheme = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        symmetric: bool = True,
        group_size: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__(in_features, out_features, bias, symmetric, None, name)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        if not symmetric:
            self.register_buffer("weight_zero", torch.zeros(out_features))

    @classmethod
    def from_float(cls, lin: nn.Linear, symmetric: bool = True, name: str = "", **_: Any) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, symmetric, name=name)
        return m._fill(lin, *quantize_int8(lin.weight, symmetric))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, self._zero())


class W8A8Linear(Int8Linear):
    """Symmetric per-channel int8 weights x dynamically quantized int8 activations."""

    scheme = "w8a8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        symmetric: bool = True,
        group_size: int | None = None,
        name: str = "",
    ) -> None:
        if not symmetric:
            raise RetortError(f"{name or 'w8a8'}: w8a8 needs symmetric weights (set symmetric: true)")
        super().__init__(in_features, out_features, bias, True, None, name)


class Int4Linear(QuantLinear):
    """Weight-only int4, group-wise along the input dimension, two values packed per byte."""

    scheme = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        symmetric: bool = False,
        group_size: int | None = 128,
        name: str = "",
    ) -> None:
        group_size = check_group_size(group_size, in_features, name)
        super().__init__(in_features, out_features, bias, symmetric, group_size, name)
        G = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, G))
        if not symmetric:
            self.register_buffer("weight_zero", torch.zeros(out_features, G))

    @classmethod
    def from_float(
        cls, lin: nn.Linear, symmetric: bool = False, group_size: int | None = 128, name: str = "", **_: Any
    ) -> Int4Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, symmetric, group_size, name)
        return m._fill(lin, *quantize_int4(lin.weight, m.group_size, symmetric))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self._zero())


class W4A8Linear(Int4Linear):
    """int4 group-wise storage, dynamic int8 activations (int8 kernels at run time)."""

    scheme = "w4a8"


MODULES: dict[str, type[QuantLinear]] = {
    "int8": Int8Linear,
    "int4": Int4Linear,
    "w8a8": W8A8Linear,
    "w4a8": W4A8Linear,
}


class _EmbeddingMixin:
    """A quantized ``(vocab, d)`` embedding table held as a QuantLinear with ``out = vocab, in = d``:
    ``forward(tokens)`` gathers and dequantizes rows; ``linear(h)`` runs the matrix as a linear layer
    (the tied LM head) through the selected kernel."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, symmetric: bool, group_size: int | None, name: str = ""):
        m = cls(emb.embedding_dim, emb.num_embeddings, False, symmetric, group_size, name)
        w = emb.weight.detach()
        qsz = (
            quantize_int4(w, m.group_size, symmetric) if m.scheme in GROUPED else quantize_int8(w, symmetric)
        )
        return m._fill(emb, *qsz)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) int64 -> (..., d) fp32."""
        idx = tokens.reshape(-1)
        zero = self._zero()
        zero = None if zero is None else zero[idx]
        dq = dequantize_int4 if self.scheme in GROUPED else dequantize_int8
        rows = dq(self.weight[idx], self.weight_scale[idx], zero)  # (n, d)
        return rows.reshape(*tokens.shape, self.in_features)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self, x)


class Int8Embedding(_EmbeddingMixin, Int8Linear):
    pass


class W8A8Embedding(_EmbeddingMixin, W8A8Linear):
    pass


class Int4Embedding(_EmbeddingMixin, Int4Linear):
    pass


class W4A8Embedding(_EmbeddingMixin, W4A8Linear):
    pass


EMBEDDINGS: dict[str, type[QuantLinear]] = {
    "int8": Int8Embedding,
    "int4": Int4Embedding,
    "w8a8": W8A8Embedding,
    "w4a8": W4A8Embedding,
}


class TiedQuantHead(nn.Module):
    """The LM head of a tied model whose embedding table is quantized: runs that table as a linear.
    Holds no tensors of its own (the embedding is not registered as a child, so it is saved once)."""

    def __init__(self, embed: _EmbeddingMixin) -> None:
        super().__init__()
        object.__setattr__(self, "embed", embed)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.embed.linear(h)

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({type(self.embed).__name__})"


def check_group_size(group_size: int | None, in_features: int, name: str) -> int:
    if group_size not in GROUP_SIZES:
        raise RetortError(f"{name or 'int4'}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise RetortError(
            f"layer {name or '?'}: in_features {in_features} is not divisible by group_size {group_size}"
        )
    return group_size


def kernel_choices(model: nn.Module) -> dict[str, list[str]]:
    """module name -> the kernels chosen so far (one per batch bucket seen), for reports."""
    return {
        n: sorted(set(m._choice.values()))
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m._choice
    }


# ----------------------------------------------------------------------------- whole models


def quant_config(
    scheme: str,
    group_size: int | None,
    symmetric: bool,
    modules_not_converted: list[str] | None,
    embeddings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` written into config.json (validated)."""
    return validate_qcfg(
        {
            "quant_method": QUANT_METHOD,
            "scheme": scheme,
            "group_size": group_size,
            "symmetric": symmetric,
            "modules_not_converted": list(modules_not_converted or []),
            "embeddings": embeddings,
        }
    )


def _check_scheme(where: str, scheme: Any, group_size: Any, symmetric: bool) -> None:
    if scheme not in SCHEMES:
        raise RetortError(f"{where}.scheme: unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if scheme in GROUPED and group_size not in GROUP_SIZES:
        raise RetortError(f"{where}.group_size must be one of {GROUP_SIZES} for {scheme}, got {group_size!r}")
    if scheme == "w8a8" and not symmetric:
        raise RetortError(f"{where}.symmetric must be true for w8a8")


def validate_qcfg(qcfg: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(qcfg, dict):
        raise RetortError(f"quantization_config must be a mapping, got {type(qcfg).__name__}")
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise RetortError(
            f"quantization_config.quant_method {qcfg.get('quant_method')!r} is not supported "
            f"(only {QUANT_METHOD!r} checkpoints)"
        )
    scheme = qcfg.get("scheme")
    out = dict(qcfg)
    out["symmetric"] = bool(qcfg.get("symmetric", scheme not in GROUPED))
    out["group_size"] = qcfg.get("group_size") if scheme in GROUPED else None
    _check_scheme("quantization_config", scheme, out["group_size"], out["symmetric"])
    out["modules_not_converted"] = list(qcfg.get("modules_not_converted") or [])
    emb = qcfg.get("embeddings")
    if emb is not None:
        if not isinstance(emb, dict):
            raise RetortError(
                f"quantization_config.embeddings must be a mapping or null, got {type(emb).__name__}"
            )
        e_scheme = emb.get("scheme")
        emb = {
            "scheme": e_scheme,
            "symmetric": bool(emb.get("symmetric", e_scheme not in GROUPED)),
            "group_size": emb.get("group_size") if e_scheme in GROUPED else None,
            "tied_lm_head": bool(emb.get("tied_lm_head", False)),
        }
        _check_scheme("quantization_config.embeddings", e_scheme, emb["group_size"], emb["symmetric"])
    out["embeddings"] = emb
    return out


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(f".{p}." in f".{name}." for p in patterns)


def _targets(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Linear]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if found:
        raise RetortError(f"model is already quantized ({found[0][0]} is {type(found[0][1]).__name__})")
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Linear and not _excluded(n, patterns) and not (n == "lm_head" and _is_tied(model))
    ]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if n.split(".")[-1] == "embed_tokens"), None)


def embedding_scheme(scheme: str, group_size: int | None, symmetric: bool) -> dict[str, Any]:
    """How the embedding table of a ``scheme`` model is quantized by default: as its linears (per-row int8
    for int8 / w8a8; the same int4 groups for int4 / w4a8), so that a tied head runs the model's own fast
    kernel. Measured on the distilled ``small-student`` (tied, vocab 4096), held-out ppl vs fp32: int4 g32
    linears with an fp32 / int8 / int4-g32 table +0.00% / -0.02% / +0.56%; the int4 table makes the whole
    file 1/5.3 of fp32 instead of 1/4.6, and its head runs the int4 kernel instead of int8 weight-only
    ones that are slower than fp32 on CPU. ``quantize_model(embeddings="int8")`` picks int8 rows instead."""
    return {"scheme": scheme, "symmetric": symmetric, "group_size": group_size if scheme in GROUPED else None}


def _embedding_target(model: nn.Module, q: dict[str, Any]) -> tuple[str, nn.Embedding] | None:
    """The embedding to quantize, unless excluded; a tied table is excluded by ``embed_tokens`` or ``lm_head``."""
    found = _embedding(model)
    if found is None or type(found[1]) is not nn.Embedding:
        return None
    patterns = q["modules_not_converted"]
    if _excluded(found[0], patterns) or (_is_tied(model) and _excluded("lm_head", patterns)):
        return None
    return found[0], found[1]


def _is_tied(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and getattr(cfg, "tie_embeddings", False))


def _set_embedding(model: nn.Module, name: str, emb: nn.Module) -> None:
    _set(model, name, emb)
    if _is_tied(model) and hasattr(model, "lm_head"):
        model.lm_head = TiedQuantHead(emb)


def prepare_for_load(model: nn.Module, qcfg: dict[str, Any]) -> nn.Module:
    """Swap the nn.Linear layers (and the embedding, if quantized) of a (meta-device) model for quantized
    modules with buffers shaped as the checkpoint stores them, so ``load_state_dict(assign=True)`` fills them."""
    q = validate_qcfg(qcfg)
    cls = MODULES[q["scheme"]]
    for name, lin in _targets(model, q["modules_not_converted"]):
        with torch.device("meta"):
            mod = cls(
                lin.in_features, lin.out_features, lin.bias is not None, q["symmetric"], q["group_size"], name
            )
        _set(model, name, mod)
    e = q["embeddings"]
    if e is not None:
        found = _embedding(model)
        if found is None or type(found[1]) is not nn.Embedding:
            raise RetortError("quantization_config.embeddings is set but the model has no embed_tokens table")
        name, emb = found
        if e["tied_lm_head"] != _is_tied(model):
            raise RetortError(
                f"quantization_config.embeddings.tied_lm_head={e['tied_lm_head']} but the config's "
                f"tie_word_embeddings={_is_tied(model)}"
            )
        with torch.device("meta"):
            mod = EMBEDDINGS[e["scheme"]](
                emb.embedding_dim, emb.num_embeddings, False, e["symmetric"], e["group_size"], name
            )
        _set_embedding(model, name, mod)
    model.quantization_config = q
    return model


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    scheme: str,
    group_size: int | None = 128,
    symmetric: bool | None = None,
    modules_not_converted: list[str] | None = None,
    embeddings: str | None = "auto",
) -> nn.Module:
    """Round-to-nearest quantize every nn.Linear in place (except excluded / tied ones), and the
    embedding table unless excluded (``embed_tokens`` in ``modules_not_converted``, or ``lm_head`` when
    tied) or ``embeddings=None``. ``embeddings``: "auto" (:func:`embedding_scheme`) or a scheme name.

    Sets ``model.quantization_config`` (what ``save_pretrained`` must write into config.json).
    """
    if symmetric is None:
        symmetric = scheme not in GROUPED
    q = quant_config(scheme, group_size, symmetric, modules_not_converted)
    cls = MODULES[q["scheme"]]
    targets = _targets(model, q["modules_not_converted"])
    emb_target = _embedding_target(model, q) if embeddings is not None else None
    e = None
    if emb_target is not None:
        if embeddings == "auto":
            e = embedding_scheme(q["scheme"], q["group_size"], q["symmetric"])
        else:
            e = {
                "scheme": embeddings,
                "symmetric": embeddings not in GROUPED,
                "group_size": (q["group_size"] or 128) if embeddings in GROUPED else None,
            }
        e = validate_qcfg({**q, "embeddings": {**e, "tied_lm_head": _is_tied(model)}})["embeddings"]
    for name, lin in targets:  # validate every layer before touching any
        if q["scheme"] in GROUPED:
            check_group_size(q["group_size"], lin.in_features, name)
    if e is not None and e["scheme"] in GROUPED:
        check_group_size(e["group_size"], emb_target[1].embedding_dim, emb_target[0])
    for name, lin in targets:
        new = cls.from_float(lin, symmetric=q["symmetric"], group_size=q["group_size"], name=name)
        _set(model, name, new.to(lin.weight.device))
    if e is not None:
        name, emb = emb_target
        new = EMBEDDINGS[e["scheme"]].from_embedding(emb, e["symmetric"], e["group_size"], name)
        _set_embedding(model, name, new.to(emb.weight.device))
    model.quantization_config = {**q, "embeddings": e}
    return model


def from_quantized_weights(
    lin: nn.Linear,
    scheme: str,
    name: str,
    symmetric: bool,
    group_size: int | None,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
) -> QuantLinear:
    """Build a module from already-quantized tensors (offline transforms such as AWQ/GPTQ)."""
    cls = MODULES[scheme]
    m = cls(lin.in_features, lin.out_features, lin.bias is not None, symmetric, group_size, name)
    m.weight, m.weight_scale = weight, scale.float()
    if zero is not None:
        m.weight_zero = zero.float()
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().float().clone())
    return m


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())
