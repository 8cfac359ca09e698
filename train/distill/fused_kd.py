"""Fused, chunked distillation loss for an online (dense) teacher: the ``(N, V)`` logits never exist whole.

``kd_loss`` (losses.py) takes both sides' full logits; at ``N = B·T = 65536`` tokens and
``V = 32000`` every fp32 ``(N, V)`` tensor it builds (upcast logits, log-softmaxes, probabilities,
KL terms and their gradients) is 8.4 GB, and the loss spends more time moving them than the
models spend in their matmuls. ``fused_kd_loss`` computes the same ``{"loss", "kd", "ce"}``
from the two models' *final hidden states* and LM-head weights instead (Liger-Kernel's "fused
linear" loss): the tokens go through in chunks of ``chunk_size`` rows, and per chunk

1. ``s = h_s @ W_s[:V]^T``, ``t = h_t @ W_t[:V]^T`` (the LM heads, in the models' dtype);
2. one pass (``torch.compile``-d on request) gives the per-row divergence and CE and the
   loss's gradient w.r.t. ``s`` analytically;
3. ``dL/dh_s = ds @ W_s[:V]`` and ``dL/dW_s[:V] += ds^T @ h_s`` (fp32 accumulator).

The gradients are final when the forward returns; the autograd backward only scales them by
the incoming gradient (DeepSpeed's loss scale / accumulation factor). ``W_s`` is passed as a
real autograd input, so its gradient lands on the parameter itself: a tied LM head (the
embedding weight) gets the sum of both uses, and DeepSpeed ZeRO 0-2 (whose gradient hooks sit
on the parameters' accumulators) sees it as any other gradient. ZeRO-3 partitions the weight
outside its module's forward and is not supported (the config refuses the combination).

Gradients w.r.t. the student logits ``s`` (``q = softmax(s/T)``, ``p = softmax(t/T)``, rows
weighted by ``mask / n_tok``)::

    CE (T = 1):   softmax(s) - onehot(label)
    fkl:          (q - p) / T
    rkl:          q * (log q - log p - KL(q||p)) / T
    jsd(beta):    q * (g - sum(q * g)) / T,  g = (1 - beta) * (log q - log M),  M = beta p + (1 - beta) q

(the jsd form follows from d/dq_j JSD = (1 - beta) log(q_j / M_j); beta = 0 / 1 are fkl / rkl,
as in ``losses.divergence``). The total is ``alpha * T^2 * KD + (1 - alpha) * CE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cluster.config.losses import KDLossConfig
from cluster.errors import RetortError
from cluster.model import Transformer, rope_cos_sin
from train.distill.losses import IGNORE_INDEX, HiddenProjector, _real_vocab, hidden_mse_tensors

DEFAULT_CHUNK = 8192  # rows per chunk: 8192 x 32000 bf16 logits = 0.5 GB per side


def decoder_hidden(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """``Transformer.forward(tokens, return_hidden=True)[1]`` without the LM head: ``(B, T) -> (B, T, d)``.

    Runs the model's own modules (compiled blocks stay compiled); training-mode attention only
    (no KV cache). A test checks it against ``Transformer.forward``.
    """
    B, T = tokens.shape
    positions = torch.arange(T, device=tokens.device).expand(B, T)
    x = model.model.embed_tokens(tokens)  # (B, T, d)
    cos, sin = rope_cos_sin(positions, model.cfg.dim_head, model.cfg.rope_theta, x.dtype)
    for block in model.model.layers:
        x = block(x, cos, sin, None)
    return model.model.norm(x)


def kd_chunk(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    alpha: float,
    kind: str,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: logits ``s, t (c, V)``, ``labels (c,)``, row weights ``weight (c,)`` (mask / n_tok).

    Returns ``(dL/ds (c, V) in s's dtype, weighted KD sum, weighted CE sum)``; a row with
    weight 0 (an ignored label) contributes nothing. Pure tensor code, so ``torch.compile``
    fuses it into a few passes over the chunk.
    """
    dtype = s.dtype
    s, t = s.float(), t.float()
    # cross-entropy at temperature 1
    lse = torch.logsumexp(s, -1, keepdim=True)  # (c, 1)
    y = labels.clamp(min=0)[:, None]  # (c, 1); ignored rows have weight 0
    ce = (lse - s.gather(-1, y)).squeeze(-1)  # (c,)
    hit = torch.arange(s.shape[-1], device=s.device)[None, :] == y  # (c, V)
    d_ce = torch.exp(s - lse) - hit.float()  # (c, V)
    # the tempered distributions
    if temperature == 1.0:
        log_q = s - lse
    else:
        zs = s / temperature
        log_q = zs - torch.logsumexp(zs, -1, keepdim=True)
    zt = t / temperature
    log_p = zt - torch.logsumexp(zt, -1, keepdim=True)
    q = log_q.exp()
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        p = log_p.exp()
        kd = (p * (log_p - log_q)).sum(-1)
        g = q - p
    elif kind == "rkl" or (kind == "jsd" and beta == 1.0):
        kd = (q * (log_q - log_p)).sum(-1)
        g = q * (log_q - log_p - kd[:, None])
    elif kind == "jsd":
        p = log_p.exp()
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kd = beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
        gq = (1.0 - beta) * (log_q - log_m)
        g = q * (gq - (q * gq).sum(-1, keepdim=True))
    else:
        raise RetortError(f"unknown KD loss kind {kind!r}; expected fkl, rkl or jsd")
    w = weight[:, None]
    grad = w * (alpha * temperature * g + (1.0 - alpha) * d_ce)  # alpha*T^2 * (g / T)
    return grad.to(dtype), (weight * kd).sum(), (weight * ce).sum()


_COMPILED: dict[str, Callable] = {}


def _chunk_fn(compile: bool) -> Callable:
    if not compile:
        return kd_chunk
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(kd_chunk, dynamic=False)
    return _COMPILED["fn"]


class _FusedDenseKD(torch.autograd.Function):
    """``(h (N, d), w (Vs, d), h_t (N, d_t), w_t (Vt, d_t), labels (N,)) -> (loss, kd, ce)``; grads in forward."""

    @staticmethod
    def forward(ctx, h, w, h_t, w_t, labels, V, temperature, alpha, kind, beta, chunk, fn):  # noqa: PLR0913
        N, d = h.shape
        mask = labels != IGNORE_INDEX
        weight = mask.float() / mask.sum().clamp(min=1)  # (N,); no host sync
        w_v, wt_v = w[:V].to(h.dtype), w_t[:V].to(h_t.dtype)  # (V, d), (V, d_t): padded rows carry nothing
        grad_h = torch.empty_like(h)
        want_w = ctx.needs_input_grad[1]  # a frozen head needs no weight gradient
        grad_w = torch.zeros(V if want_w else 0, d, dtype=torch.float32, device=h.device)
        kd = torch.zeros((), dtype=torch.float32, device=h.device)
        ce = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, chunk):
            hc = h[i : i + chunk]
            s = hc @ w_v.T  # (c, V)
            t = h_t[i : i + chunk] @ wt_v.T  # (c, V)
            g, kd_c, ce_c = fn(
                s, t, labels[i : i + chunk], weight[i : i + chunk], temperature, alpha, kind, beta
            )
            grad_h[i : i + chunk] = g @ w_v
            if want_w:
                grad_w += (g.T @ hc).float()
            kd += kd_c
            ce += ce_c
        if want_w and w.shape[0] > V:
            grad_w = torch.cat([grad_w, grad_w.new_zeros(w.shape[0] - V, d)])
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        ctx.mark_non_differentiable(kd, ce)
        loss = alpha * temperature**2 * kd + (1.0 - alpha) * ce
        return loss, kd, ce

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_ce):
        grad_h, grad_w = ctx.saved_tensors
        grad_w = grad_w * g_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return (
            grad_h * g_loss.to(grad_h.dtype),
            grad_w,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_kd_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: KDLossConfig,
    *,
    vocab_size: int | None = None,
    projector: HiddenProjector | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    compile: bool = False,
) -> dict[str, torch.Tensor]:
    """``kd_loss`` for an online teacher, from final hidden states and LM-head weights.

    Args:
        student_hidden: ``(B, T, d_s)`` the student's final (normed) hidden state, differentiable.
        lm_head_weight: ``(Vs, d_s)`` the student's LM-head weight (the embedding if tied).
        teacher_hidden: ``(B, T, d_t)`` the teacher's final hidden state (never differentiated).
        teacher_head_weight: ``(Vt, d_t)`` the teacher's LM-head weight.
        labels: ``(B, T)``, ``-100`` = ignored.
        cfg, vocab_size: as for ``kd_loss`` (``V`` slices padded head rows on both sides).
        projector: the ``HiddenProjector`` when ``cfg.hidden_weight > 0``.
        chunk_size: token rows per chunk (memory: a few ``chunk_size x V`` tensors).
        compile: ``torch.compile`` the per-chunk pass (GPU: one fused kernel chain per chunk).

    Returns the same ``{"loss", "kd", "ce"[, "hidden"]}`` scalars as ``kd_loss``.
    """
    B, T, d = student_hidden.shape
    if labels.shape != (B, T):
        raise RetortError(f"labels shape {tuple(labels.shape)} != student hidden's (B, T) = {(B, T)}")
    if teacher_hidden.shape[:2] != (B, T):
        raise RetortError(
            f"teacher hidden {tuple(teacher_hidden.shape)} does not match student (B, T) = {(B, T)}"
        )
    if lm_head_weight.shape[1] != d or teacher_head_weight.shape[1] != teacher_hidden.shape[-1]:
        raise RetortError(
            f"LM-head weights {tuple(lm_head_weight.shape)} / {tuple(teacher_head_weight.shape)} do not match the hidden "
            f"sizes {d} / {teacher_hidden.shape[-1]}"
        )
    if chunk_size < 1:
        raise RetortError(f"chunk_size must be >= 1, got {chunk_size}")
    V = _real_vocab(lm_head_weight.shape[0], teacher_head_weight.shape[0], vocab_size)
    flat_labels = labels.reshape(-1)
    loss, kd, ce = _FusedDenseKD.apply(
        student_hidden.reshape(B * T, d),
        lm_head_weight,
        teacher_hidden.detach().reshape(B * T, -1),
        teacher_head_weight.detach(),
        flat_labels,
        V,
        float(cfg.temperature),
        float(cfg.alpha),
        cfg.kind,
        float(cfg.beta),
        chunk_size,
        _chunk_fn(compile),
    )
    out = {"loss": loss, "kd": kd, "ce": ce}
    if cfg.hidden_weight > 0:
        if projector is None:
            raise RetortError("hidden_weight > 0 needs student_hidden and a HiddenProjector")
        hidden = hidden_mse_tensors(student_hidden, teacher_hidden, projector, flat_labels != IGNORE_INDEX)
        out["hidden"] = hidden
        out["loss"] = loss + cfg.hidden_weight * hidden
    return out
