"""KD losses against hand computations and ``torch.distributions.kl_divergence``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from cluster.config.losses import KDLossConfig
from cluster.errors import RetortError
from train.distill.losses import DenseTeacher, HiddenProjector, TopKTeacher, kd_loss

B, T, V = 2, 5, 11


def cfg(**kw) -> KDLossConfig:
    return KDLossConfig(**{"alpha": 1.0, "temperature": 1.0, **kw})


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    return s, t, labels


def mean_kept(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != -100
    return x[keep].mean()


def dense_topk(t: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    lp = F.log_softmax(t, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return TopKTeacher(ids.to(torch.int32), vals)


def coarsen(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Full distribution (..., V) -> (..., k+1): the probs at ids, then the rest."""
    top = probs.gather(-1, ids.long())
    return torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)


def test_hand_computed_forward_kl_and_ce_mix():
    # one position, V=2: student q = (1/2, 1/2), teacher p = (3/4, 1/4), label 0
    s = torch.zeros(1, 1, 2)
    t = torch.tensor([[[math.log(3.0), 0.0]]])
    out = kd_loss(
        s, DenseTeacher(t), torch.tensor([[0]]), KDLossConfig(kind="fkl", alpha=0.5, temperature=1.0)
    )
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out["kd"].item() == pytest.approx(kl, rel=1e-6)
    assert out["ce"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * kl + 0.5 * math.log(2.0), rel=1e-6)
    rkl = kd_loss(s, DenseTeacher(t), torch.tensor([[0]]), cfg(kind="rkl"))["kd"].item()
    assert rkl == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-6)


def test_temperature_scaling_hand_computed():
    # T=2 halves the logits: teacher (log 9, 0)/2 -> p = (3/4, 1/4); T^2 = 4 multiplies the KD term
    s = torch.zeros(1, 1, 2)
    t = torch.tensor([[[math.log(9.0), 0.0]]])
    out = kd_loss(
        s, DenseTeacher(t), torch.tensor([[1]]), KDLossConfig(kind="fkl", alpha=0.25, temperature=2.0)
    )
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out["kd"].item() == pytest.approx(kl, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.25 * 4 * kl + 0.75 * math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_fkl_rkl_match_torch_distributions(batch, temperature):
    s, t, labels = batch
    p, q = Categorical(logits=t / temperature), Categorical(logits=s / temperature)
    fkl = kd_loss(s, DenseTeacher(t), labels, cfg(kind="fkl", temperature=temperature))
    rkl = kd_loss(s, DenseTeacher(t), labels, cfg(kind="rkl", temperature=temperature))
    torch.testing.assert_close(fkl["kd"], mean_kept(kl_divergence(p, q), labels))
    torch.testing.assert_close(rkl["kd"], mean_kept(kl_divergence(q, p), labels))
    assert fkl["loss"].item() == pytest.approx(temperature**2 * fkl["kd"].item(), rel=1e-6)
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(fkl["ce"], ce)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_mixture_definition(batch, beta):
    s, t, labels = batch
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    m = Categorical(probs=beta * p + (1 - beta) * q)
    want = beta * kl_divergence(Categorical(probs=p), m) + (1 - beta) * kl_divergence(Categorical(probs=q), m)
    got = kd_loss(s, DenseTeacher(t), labels, cfg(kind="jsd", beta=beta, temperature=2.0))["kd"]
    torch.testing.assert_close(got, mean_kept(want, labels))
    if beta == 0.5:
        assert 0 < got.item() <= math.log(2)


def test_jsd_endpoints_are_the_kls(batch):
    s, t, labels = batch
    fkl = kd_loss(s, DenseTeacher(t), labels, cfg(kind="fkl"))["kd"]
    rkl = kd_loss(s, DenseTeacher(t), labels, cfg(kind="rkl"))["kd"]
    torch.testing.assert_close(kd_loss(s, DenseTeacher(t), labels, cfg(kind="jsd", beta=0.0))["kd"], fkl)
    torch.testing.assert_close(kd_loss(s, DenseTeacher(t), labels, cfg(kind="jsd", beta=1.0))["kd"], rkl)


def test_zero_when_student_equals_teacher(batch):
    _, t, labels = batch
    for kind in ("fkl", "rkl", "jsd"):
        assert kd_loss(t.clone(), DenseTeacher(t), labels, cfg(kind=kind))["kd"].abs().item() < 1e-6


def test_gradient_of_fkl_is_q_minus_p(batch):
    s, t, labels = batch
    s = s.clone().requires_grad_(True)
    kd_loss(s, DenseTeacher(t), labels, cfg(kind="fkl"))["loss"].backward()
    keep = (labels != -100).float()[..., None]
    want = (F.softmax(s.detach(), -1) - F.softmax(t, -1)) * keep / keep.sum()
    torch.testing.assert_close(s.grad, want)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_vocab_equals_dense(batch, kind, beta, temperature):
    s, t, labels = batch
    c = cfg(kind=kind, beta=beta, temperature=temperature, alpha=0.7)
    dense = kd_loss(s, DenseTeacher(t), labels, c)
    s_req = s.clone().requires_grad_(True)
    top = kd_loss(s_req, dense_topk(t, V), labels, c)
    torch.testing.assert_close(top["kd"], dense["kd"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top["loss"], dense["loss"], atol=1e-5, rtol=1e-5)
    top["loss"].backward()
    assert torch.isfinite(s_req.grad).all()


def test_topk_fp16_logprobs_close_to_dense(batch):
    s, t, labels = batch
    top = dense_topk(t, V)
    top16 = TopKTeacher(top.ids, top.logprobs.half())
    dense = kd_loss(s, DenseTeacher(t), labels, cfg())["kd"]
    assert kd_loss(s, top16, labels, cfg())["kd"].item() == pytest.approx(dense.item(), abs=2e-3)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_topk_rest_bucket_exact_at_temperature_one(batch, kind):
    s, t, labels = batch
    k = 4
    top = dense_topk(t, k)
    got = kd_loss(s, top, labels, cfg(kind=kind))["kd"]
    p_b = coarsen(F.softmax(t, -1), top.ids)  # (B, T, k+1)
    q_b = coarsen(F.softmax(s, -1), top.ids)
    pc, qc = Categorical(probs=p_b), Categorical(probs=q_b)
    if kind == "fkl":
        want = kl_divergence(pc, qc)
    elif kind == "rkl":
        want = kl_divergence(qc, pc)
    else:
        m = Categorical(probs=0.5 * p_b + 0.5 * q_b)
        want = 0.5 * kl_divergence(pc, m) + 0.5 * kl_divergence(qc, m)
    torch.testing.assert_close(got, mean_kept(want, labels), atol=1e-5, rtol=1e-5)
    if kind == "fkl":  # coarsening never increases a divergence
        assert got.item() <= kd_loss(s, DenseTeacher(t), labels, cfg())["kd"].item() + 1e-6


def test_topk_temperature_exact_for_uniform_teacher_tail(batch):
    s, _, labels = batch
    k, temp = 3, 2.0
    t = torch.zeros(B, T, V)
    t[..., :k] = torch.tensor([4.0, 2.5, 1.0])  # the tail (V - k ids) is exactly uniform
    top = dense_topk(t, k)
    got = kd_loss(s, top, labels, cfg(temperature=temp))["kd"]
    p_b = coarsen(F.softmax(t / temp, -1), top.ids)
    q_b = coarsen(F.softmax(s / temp, -1), top.ids)
    torch.testing.assert_close(
        got, mean_kept(kl_divergence(Categorical(probs=p_b), Categorical(probs=q_b)), labels)
    )


def test_topk_ignore_renormalises_over_teacher_ids(batch):
    s, t, labels = batch
    k, temp = 4, 2.0
    top = dense_topk(t, k)
    got = kd_loss(s, top, labels, cfg(temperature=temp, topk_rest="ignore"))["kd"]
    p = Categorical(logits=top.logprobs / temp)
    q = Categorical(logits=s.gather(-1, top.ids.long()) / temp)
    torch.testing.assert_close(got, mean_kept(kl_divergence(p, q), labels))


def test_padded_vocabularies_are_sliced(batch):
    s, t, labels = batch
    want = kd_loss(s, DenseTeacher(t), labels, cfg())
    s_pad = torch.cat([s, torch.full((B, T, 5), 9.0)], -1)  # padded rows with large logits
    t_pad = torch.cat([t, torch.full((B, T, 1), 7.0)], -1)
    got = kd_loss(s_pad, DenseTeacher(t_pad), labels, cfg(), vocab_size=V)
    torch.testing.assert_close(got["kd"], want["kd"])
    torch.testing.assert_close(got["ce"], want["ce"])
    with pytest.raises(RetortError, match="pass vocab_size"):
        kd_loss(s_pad, DenseTeacher(t_pad), labels, cfg())
    with pytest.raises(RetortError, match="exceeds"):
        kd_loss(s_pad, DenseTeacher(t_pad), labels, cfg(), vocab_size=V + 3)


def test_topk_ids_past_the_real_vocab_join_the_rest(batch):
    s, t, labels = batch
    k = 4
    top = dense_topk(t, k)
    ids = top.ids.clone()
    ids[..., -1] = V + 2  # a padded-vocab id: its mass must count as "rest"
    got = kd_loss(s, TopKTeacher(ids, top.logprobs), labels, cfg())["kd"]
    ref = kd_loss(s, TopKTeacher(top.ids[..., :-1], top.logprobs[..., :-1]), labels, cfg())["kd"]
    torch.testing.assert_close(got, ref)


def test_ignored_positions_do_not_count(batch):
    s, t, labels = batch
    base = kd_loss(s, DenseTeacher(t), labels, cfg())
    s2 = s.clone()
    s2[0, 1] = 100.0  # an ignored position: any value
    torch.testing.assert_close(kd_loss(s2, DenseTeacher(t), labels, cfg())["loss"], base["loss"])
    none = kd_loss(s, DenseTeacher(t), torch.full((B, T), -100), cfg(alpha=0.5))
    assert none["loss"].item() == 0.0


def test_bf16_student_logits_are_computed_in_fp32(batch):
    s, t, labels = batch
    got = kd_loss(s.bfloat16(), DenseTeacher(t), labels, cfg())["kd"]
    want = kd_loss(s.bfloat16().float(), DenseTeacher(t), labels, cfg())["kd"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_hidden_mse_through_projector(batch):
    s, t, labels = batch
    h_s, h_t = torch.randn(B, T, 6), torch.randn(B, T, 8)
    proj = HiddenProjector(6, 8)
    out = kd_loss(
        s, DenseTeacher(t, hidden=h_t), labels, cfg(hidden_weight=0.3), student_hidden=h_s, projector=proj
    )
    keep = labels != -100
    want = ((proj(h_s) - h_t) ** 2)[keep].mean()
    torch.testing.assert_close(out["hidden"], want)
    torch.testing.assert_close(out["loss"], out["kd"] + 0.3 * want)
    out["loss"].backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0
    with pytest.raises(RetortError, match="online teacher"):
        kd_loss(s, dense_topk(t, 3), labels, cfg(hidden_weight=0.3), student_hidden=h_s, projector=proj)
    with pytest.raises(RetortError, match="HiddenProjector"):
        kd_loss(s, DenseTeacher(t, hidden=h_t), labels, cfg(hidden_weight=0.3))


def test_shape_mismatches_are_clear_errors(batch):
    s, t, labels = batch
    with pytest.raises(RetortError, match="labels shape"):
        kd_loss(s, DenseTeacher(t), labels[:, :-1], cfg())
    top = dense_topk(t, 3)
    with pytest.raises(RetortError, match="top-k ids"):
        kd_loss(s, TopKTeacher(top.ids, top.logprobs[..., :2]), labels, cfg())


def test_config_rejects_out_of_range_values():
    from pydantic import ValidationError

    for bad in ({"alpha": 1.5}, {"temperature": 0}, {"beta": -0.1}, {"kind": "mse"}, {"hidden_weight": -1}):
        with pytest.raises(ValidationError):
            KDLossConfig(**bad)


def test_topk_infinite_logprobs_stay_finite(batch):
    s, t, labels = batch
    top = dense_topk(t, 4)
    lp = top.logprobs.half()
    lp[..., -1] = float("-inf")  # an fp16 underflow in the cache
    s_req = s.clone().requires_grad_(True)
    for kind in ("fkl", "rkl", "jsd"):
        out = kd_loss(s_req, TopKTeacher(top.ids, lp), labels, cfg(kind=kind, temperature=2.0))
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(s_req.grad).all()
