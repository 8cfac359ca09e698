"""Distillation losses: forward KL, reverse KL, generalized JSD, with CE and an optional hidden MSE.

Notation (every tensor in float32, whatever the model's dtype):

- ``s`` student logits ``(B, T, Vs)``, teacher logits ``t`` ``(B, T, Vt)``, ``labels`` ``(B, T)``
  with ``-100`` = ignored. Only positions whose label is not ignored count, for every term, and
  each term is a mean over those positions.
- ``V`` the real (tokenizer) vocabulary. Models may pad their embedding rows past it; both
  sides are sliced to ``[..., :V]`` before any softmax, so padded rows never carry mass.
  ``V`` comes from the ``vocab_size`` argument (required when ``Vs != Vt``).
- Temperature ``T``: ``p = softmax(t / T)`` (teacher), ``q = softmax(s / T)`` (student).

Divergences (per position, summed over the support):

- ``fkl``: ``KL(p || q) = sum p (log p - log q)`` (Hinton KD; mode-covering).
- ``rkl``: ``KL(q || p)`` (MiniLLM; mode-seeking).
- ``jsd``: TRL GKD's generalized JSD, ``beta * KL(p || M) + (1 - beta) * KL(q || M)`` with
  ``M = beta * p + (1 - beta) * q``; as in TRL, ``beta = 0`` is *defined* as ``KL(p || q)`` and
  ``beta = 1`` as ``KL(q || p)`` (the mixture formula itself tends to 0 at both ends,
  like ``beta * KL(p || q)`` near 0). ``beta = 0.5`` is the symmetric JSD, bounded by ``log 2``.

Total: ``loss = alpha * T^2 * KD + (1 - alpha) * CE [+ hidden_weight * MSE]`` for every kind,
where CE is the student's cross-entropy on the labels at temperature 1. The ``T^2`` factor
(Hinton et al.) keeps the soft-target gradient scale independent of ``T``; it is applied to
``rkl`` and ``jsd`` too so that changing ``kind`` does not silently rescale the mix.

Top-k teacher (``TopKTeacher(ids, logprobs)`` from the cache: the teacher's ``k`` largest
log-probabilities at temperature 1, normalised over the full real vocab):

- ``topk_rest="bucket"`` (default): both distributions are coarsened to ``k + 1`` buckets: the
  ``k`` teacher ids and one "rest" bucket for everything else. The teacher's rest mass is
  ``r = 1 - sum exp(logprobs)`` (clamped to >= 1e-6 when any token lies outside the top-k; 0
  when ``k`` covers the vocab); the student's is its exact softmax mass outside the same ids
  (a log-sum-exp over the other logits). At ``T = 1`` this is exactly the divergence between
  the two coarsened distributions — a lower bound of the full-vocabulary divergence (data
  processing inequality), equal to it when ``k = V``. At ``T != 1`` the teacher's tempered
  probabilities need its tail, which the cache does not hold: the tail is assumed uniform over
  the ``n = V - k`` other ids, so its tempered mass is ``n * (r / n)^(1/T)``, and the ``k + 1``
  buckets are renormalised. For ``T > 1`` this overstates the tail mass (a uniform tail
  maximises ``sum x^(1/T)``); the top-k part is exact up to that normaliser. The student side
  is always exact.
- ``topk_rest="ignore"``: both sides are renormalised over the teacher's top-k ids only
  (DistillKit); the tail carries no signal at all.

Top-k ids outside ``[0, V)`` (a teacher with a padded vocab) are dropped: their mass joins the
rest bucket. fp16 logprobs (the cache's format) are accurate to ~5e-4 relative per entry, so
the rest mass of a very confident teacher is only known to about that precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cluster.config.losses import KDLossConfig
from cluster.errors import RetortError

IGNORE_INDEX = -100
NEG = -1e30  # finite "log 0": keeps 0 * (log a - log b) = 0 and gradients NaN-free
MIN_REST = 1e-6  # floor of the teacher's rest mass when some ids lie outside its top-k


@dataclass
class DenseTeacher:
    """Online teacher output: ``logits (B, T, Vt)`` [+ final hidden ``(B, T, d_teacher)``]."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass
class TopKTeacher:
    """Cached teacher output: ``ids (B, T, k)`` int, ``logprobs (B, T, k)`` float (log-softmax at T=1)."""

    ids: torch.Tensor
    logprobs: torch.Tensor


Teacher = DenseTeacher | TopKTeacher


class HiddenProjector(nn.Module):
    """Learned map from the student's hidden size to the teacher's: ``(..., d_s) -> (..., d_t)``.

    Its parameters are trained with the student: the job must add them to the optimizer.
    """

    def __init__(self, d_student: int, d_teacher: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        nn.init.normal_(self.proj.weight, std=d_student**-0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` over the last dim for normalised log-distributions ``(N, S) -> (N,)``."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Teacher ``log_p``, student ``log_q`` ``(N, S)`` on the same support -> ``(N,)``."""
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if kind != "jsd":
        raise RetortError(f"unknown KD loss kind {kind!r}; expected fkl, rkl or jsd")
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # (N, S)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _real_vocab(student_v: int, teacher_v: int | None, vocab_size: int | None) -> int:
    if vocab_size is None:
        if teacher_v is not None and teacher_v != student_v:
            raise RetortError(
                f"student vocab ({student_v}) != teacher vocab ({teacher_v}): pass vocab_size "
                "(the tokenizer's real size) to slice padded rows"
            )
        return student_v
    limit = student_v if teacher_v is None else min(student_v, teacher_v)
    if not 0 < vocab_size <= limit:
        raise RetortError(f"vocab_size {vocab_size} exceeds the logits' vocab ({limit})")
    return vocab_size


def _dense_logprobs(
    t: torch.Tensor, s: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher / student logits ``(N, V)`` -> tempered log-probs ``(N, V)`` each."""
    return F.log_softmax(t / temperature, dim=-1), F.log_softmax(s / temperature, dim=-1)


def _topk_logprobs(
    ids: torch.Tensor, lp: torch.Tensor, s: torch.Tensor, temperature: float, rest: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached top-k ``ids, lp (N, k)`` and student logits ``s (N, V)`` -> bucket log-probs.

    Returns teacher and student log-distributions over ``k + 1`` buckets (``rest="bucket"``) or
    over the ``k`` ids (``rest="ignore"``); see the module docstring for the definitions.
    """
    N, V = s.shape
    valid = (ids >= 0) & (ids < V)  # (N, k)
    idx = ids.clamp(0, V - 1).long()  # (N, k)
    lp = lp.float().clamp(min=NEG).masked_fill(~valid, NEG)  # (N, k); fp16 -inf -> finite
    s_t = s / temperature  # (N, V)
    s_top = s_t.gather(-1, idx).masked_fill(~valid, NEG)  # (N, k)
    if rest == "ignore":
        return F.log_softmax(lp / temperature, dim=-1), F.log_softmax(s_top, dim=-1)
    if rest != "bucket":
        raise RetortError(f"unknown topk_rest {rest!r}; expected bucket or ignore")
    n_tail = V - valid.sum(-1)  # (N,) ids outside the teacher's (valid) top-k
    has_tail = n_tail > 0
    # teacher: tail mass r, tempered as n * (r / n)^(1/T) (exact at T = 1)
    r = (1.0 - lp.exp().sum(-1)).clamp(min=MIN_REST)  # (N,)
    n = n_tail.clamp(min=1).float()
    log_tail_t = n.log() + (r.log() - n.log()) / temperature  # (N,)
    log_tail_t = torch.where(has_tail, log_tail_t, torch.full_like(log_tail_t, NEG))
    t_buckets = torch.cat([lp / temperature, log_tail_t[:, None]], dim=-1)  # (N, k+1)
    # student: exact softmax mass outside the teacher's ids
    spill = torch.where(valid, idx, V)  # invalid ids -> an extra column, dropped below
    in_top = torch.zeros(N, V + 1, dtype=torch.bool, device=s.device)  # (N, V+1)
    in_top = in_top.scatter_(-1, spill, True)[:, :V]  # (N, V)
    lse_all = torch.logsumexp(s_t, dim=-1, keepdim=True)  # (N, 1)
    lse_tail = torch.logsumexp(s_t.masked_fill(in_top, NEG), dim=-1)  # (N,)
    lse_tail = torch.where(has_tail, lse_tail, torch.full_like(lse_tail, NEG))
    s_buckets = torch.cat([s_top, lse_tail[:, None]], dim=-1) - lse_all  # (N, k+1)
    return F.log_softmax(t_buckets, dim=-1), s_buckets


def _check_shapes(
    student_logits: torch.Tensor, teacher: Teacher, labels: torch.Tensor, vocab_size: int | None
) -> int:
    """Validate shapes; return the real vocab size ``V`` both sides are sliced to."""
    B, T, Vs = student_logits.shape
    if labels.shape != (B, T):
        raise RetortError(f"labels shape {tuple(labels.shape)} != student logits' (B, T) = {(B, T)}")
    if isinstance(teacher, DenseTeacher):
        if teacher.logits.shape[:2] != (B, T):
            raise RetortError(
                f"teacher logits {tuple(teacher.logits.shape)} do not match student (B, T) = {(B, T)}"
            )
        return _real_vocab(Vs, teacher.logits.shape[-1], vocab_size)
    if not isinstance(teacher, TopKTeacher):
        raise RetortError(f"teacher must be a DenseTeacher or a TopKTeacher, got {type(teacher).__name__}")
    if teacher.ids.shape != teacher.logprobs.shape or teacher.ids.shape[:2] != (B, T):
        raise RetortError(
            f"top-k ids {tuple(teacher.ids.shape)} / logprobs {tuple(teacher.logprobs.shape)} must both be (B, T, k) "
            f"with (B, T) = {(B, T)}"
        )
    return _real_vocab(Vs, None, vocab_size)


def kd_loss(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    cfg: KDLossConfig,
    *,
    vocab_size: int | None = None,
    student_hidden: torch.Tensor | None = None,
    projector: HiddenProjector | None = None,
) -> dict[str, torch.Tensor]:
    """The distillation loss of one batch.

    Args:
        student_logits: ``(B, T, Vs)``, any float dtype.
        teacher: ``DenseTeacher(logits (B, T, Vt)[, hidden (B, T, d_t)])`` or
            ``TopKTeacher(ids (B, T, k), logprobs (B, T, k))``; never differentiated.
        labels: ``(B, T)`` next-token ids, ``-100`` = ignored.
        cfg: which divergence, temperature, alpha, beta, hidden weight, top-k rest handling.
        vocab_size: the real vocab ``V`` both sides are sliced to (required if ``Vs != Vt``).
        student_hidden: ``(B, T, d_s)`` final hidden state; with ``projector``, needed when
            ``cfg.hidden_weight > 0`` (and then the teacher must be dense with ``hidden``).

    Returns:
        ``{"loss", "kd", "ce"[, "hidden"]}`` scalar tensors; ``kd`` is the raw mean divergence
        (before ``alpha * T^2``), ``loss`` the differentiable total.
    """
    B, T, Vs = student_logits.shape
    V = _check_shapes(student_logits, teacher, labels, vocab_size)
    mask = labels.reshape(-1) != IGNORE_INDEX  # (B*T,)
    n_tok = mask.sum().clamp(min=1)
    s = student_logits.reshape(B * T, Vs)[mask, :V].float()  # (N, V)
    ce = F.cross_entropy(s, labels.reshape(-1)[mask], reduction="sum") / n_tok
    if isinstance(teacher, DenseTeacher):
        t = teacher.logits.detach().to(s.device).reshape(B * T, -1)[mask, :V].float()  # (N, V)
        log_p, log_q = _dense_logprobs(t, s, cfg.temperature)
    else:
        k = teacher.ids.shape[-1]
        t_ids = teacher.ids.detach().to(s.device).reshape(B * T, k)[mask]  # (N, k)
        t_lp = teacher.logprobs.detach().to(s.device).reshape(B * T, k)[mask]  # (N, k)
        log_p, log_q = _topk_logprobs(t_ids, t_lp, s, cfg.temperature, cfg.topk_rest)
    kd = divergence(log_p.detach(), log_q, cfg.kind, cfg.beta).sum() / n_tok
    loss = cfg.alpha * cfg.temperature**2 * kd + (1.0 - cfg.alpha) * ce
    out = {"loss": loss, "kd": kd, "ce": ce}
    if cfg.hidden_weight > 0:
        hidden = hidden_mse(student_hidden, teacher, projector, mask)
        out["hidden"] = hidden
        out["loss"] = loss + cfg.hidden_weight * hidden
    return out


def hidden_mse(
    student_hidden: torch.Tensor | None,
    teacher: Teacher,
    projector: HiddenProjector | None,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error between ``projector(student_hidden)`` and the teacher's hidden state.

    ``student_hidden (B, T, d_s)``, ``teacher.hidden (B, T, d_t)``, ``mask (B*T,)``; the mean is
    over kept positions and the teacher's hidden dimension.
    """
    if not isinstance(teacher, DenseTeacher) or teacher.hidden is None:
        raise RetortError(
            "hidden_weight > 0 needs an online teacher with hidden states (not the top-k cache)"
        )
    if student_hidden is None or projector is None:
        raise RetortError("hidden_weight > 0 needs student_hidden and a HiddenProjector")
    return hidden_mse_tensors(student_hidden, teacher.hidden, projector, mask)


def hidden_mse_tensors(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projector: HiddenProjector, mask: torch.Tensor
) -> torch.Tensor:
    """``hidden_mse`` on plain tensors: ``(B, T, d_s)``, ``(B, T, d_t)``, ``mask (B*T,)``."""
    d_t = teacher_hidden.shape[-1]
    h_s = projector(student_hidden.reshape(-1, student_hidden.shape[-1])[mask].float())  # (N, d_t)
    h_t = teacher_hidden.detach().to(h_s.device).reshape(-1, d_t)[mask].float()  # (N, d_t)
    if h_s.shape[-1] != d_t:
        raise RetortError(
            f"HiddenProjector outputs {h_s.shape[-1]} features, the teacher's hidden size is {d_t}"
        )
    return F.mse_loss(h_s, h_t, reduction="sum") / (mask.sum().clamp(min=1) * d_t)


def check_same_tokenizer(teacher_dir: str | Path, student_tokenizer_sha: str) -> str:
    """Refuse a teacher whose tokenizer differs from the student's data; returns the sha256.

    The teacher directory must hold its tokenizer files (``retort teacher`` copies them in).
    """
    from cluster.tokenizer import load_tokenizer  # noqa: PLC0415 - tokenizers only when checking

    teacher_dir = Path(teacher_dir)
    try:
        sha = load_tokenizer(teacher_dir).sha256
    except RetortError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable tokenizer is bad input
        raise RetortError(f"{teacher_dir}: cannot load the teacher's tokenizer ({e})") from None
    if sha != student_tokenizer_sha:
        raise RetortError(
            f"teacher tokenizer {sha[:12]} ({teacher_dir}) differs from the student data's tokenizer "
            f"{student_tokenizer_sha[:12]}: distillation needs the same tokenizer on both sides"
        )
    return sha
