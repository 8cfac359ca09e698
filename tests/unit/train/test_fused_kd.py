"""The fused, chunked KD loss gives the reference ``kd_loss``'s values and gradients (CPU fp32; GPU bf16)."""

from __future__ import annotations

import pytest
import torch

from cluster.config.losses import KDLossConfig
from cluster.config.model import ModelConfig
from cluster.errors import RetortError
from cluster.model import Transformer
from train.distill.fused_kd import decoder_hidden, fused_kd_loss
from train.distill.losses import DenseTeacher, HiddenProjector, kd_loss

KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]
RTOL = 1e-5


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def heads(seed: int, B=3, T=7, d=16, d_t=24, Vs=70, Vt=72, dtype=torch.float32, device="cpu"):
    """Random hidden states and LM heads; the teacher's head is a little sharper than the student's."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(Vs, d, generator=g) * 0.5).to(device, dtype).requires_grad_()
    h_t = torch.randn(B, T, d_t, generator=g).to(device, dtype)
    w_t = (torch.randn(Vt, d_t, generator=g) * 0.7).to(device, dtype)
    return h, w, h_t, w_t


def reference(h, w, h_t, w_t, y, cfg, V, scale=1.0):
    out = kd_loss(h @ w.T, DenseTeacher(h_t @ w_t.T), y, cfg, vocab_size=V)
    gh, gw = torch.autograd.grad(out["loss"] * scale, [h, w])
    return out, gh, gw


def fused(h, w, h_t, w_t, y, cfg, V, scale=1.0, **kw):
    out = fused_kd_loss(h, w, h_t, w_t, y, cfg, vocab_size=V, **kw)
    gh, gw = torch.autograd.grad(out["loss"] * scale, [h, w])
    return out, gh, gw


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_matches_reference_values_and_gradients(kind, beta, temperature):
    cfg = KDLossConfig(kind=kind, temperature=temperature, alpha=0.3, beta=beta)
    h, w, h_t, w_t = heads(0)
    V = 64  # both heads carry padded rows past the real vocab
    y = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    y[0, 1] = y[2, 6] = -100
    ref, gh_ref, gw_ref = reference(h, w, h_t, w_t, y, cfg, V, scale=1.7)
    out, gh, gw = fused(h, w, h_t, w_t, y, cfg, V, scale=1.7, chunk_size=4)  # 21 rows: 5 full chunks + 1
    for k in ("loss", "kd", "ce"):
        assert val(out[k]) == pytest.approx(val(ref[k]), rel=RTOL), k
    assert rel(gh, gh_ref) < RTOL and rel(gw, gw_ref) < RTOL
    assert torch.all(gw[V:] == 0), "padded head rows get no gradient"
    assert torch.all(gh.reshape(21, -1)[[1, 20]] == 0), "ignored positions get no gradient"


def test_alpha_endpoints_and_all_ignored():
    h, w, h_t, w_t = heads(2)
    y = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(3))
    for alpha in (0.0, 1.0):
        cfg = KDLossConfig(kind="fkl", temperature=2.0, alpha=alpha)
        ref, gh_ref, gw_ref = reference(h, w, h_t, w_t, y, cfg, 64)
        out, gh, gw = fused(h, w, h_t, w_t, y, cfg, 64)
        assert val(out["loss"]) == pytest.approx(val(ref["loss"]), rel=RTOL)
        assert rel(gh, gh_ref) < RTOL and rel(gw, gw_ref) < RTOL
    out, gh, gw = fused(h, w, h_t, w_t, torch.full((3, 7), -100), KDLossConfig(), 64)
    assert val(out["loss"]) == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)


def test_tied_student_model_gradients_match():
    """A whole tied-embedding student: every parameter's gradient, the embedding's (head + lookup) included."""
    mcfg = ModelConfig(
        vocab_size=80,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=64,
        tie_embeddings=True,
    )
    tcfg = ModelConfig(
        vocab_size=84, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96, max_seq_len=64
    )
    student, teacher = Transformer(mcfg).init_weights(0), Transformer(tcfg).init_weights(1)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    x = torch.randint(0, 78, (2, 16), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 78, (2, 16), generator=torch.Generator().manual_seed(5))
    cfg = KDLossConfig(kind="fkl", temperature=2.0, alpha=0.5)
    with torch.no_grad():
        t_logits, t_hidden = teacher(x, return_hidden=True)
        assert torch.equal(decoder_hidden(teacher, x), t_hidden)
    ref = kd_loss(student(x), DenseTeacher(t_logits), y, cfg, vocab_size=78)
    ref["loss"].backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    out = fused_kd_loss(
        decoder_hidden(student, x),
        student.lm_head.weight,
        t_hidden,
        teacher.lm_head.weight,
        y,
        cfg,
        vocab_size=78,
        chunk_size=5,
    )
    out["loss"].backward()
    assert val(out["loss"]) == pytest.approx(val(ref["loss"]), rel=RTOL)
    for n, p in student.named_parameters():
        assert rel(p.grad, ref_grads[n]) < RTOL, n


def test_hidden_mse_term_matches():
    cfg = KDLossConfig(kind="rkl", temperature=1.0, alpha=0.5, hidden_weight=0.3)
    h, w, h_t, w_t = heads(6)
    y = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(7))
    y[1, 3] = -100
    torch.manual_seed(0)
    proj = HiddenProjector(16, 24)
    ref = kd_loss(
        h @ w.T,
        DenseTeacher(h_t @ w_t.T, hidden=h_t),
        y,
        cfg,
        vocab_size=64,
        student_hidden=h,
        projector=proj,
    )
    ref_g = torch.autograd.grad(ref["loss"], [h, w, proj.proj.weight])
    out = fused_kd_loss(h, w, h_t, w_t, y, cfg, vocab_size=64, projector=proj)
    out_g = torch.autograd.grad(out["loss"], [h, w, proj.proj.weight])
    for k in ("loss", "kd", "ce", "hidden"):
        assert val(out[k]) == pytest.approx(val(ref[k]), rel=RTOL), k
    for a, b in zip(out_g, ref_g, strict=True):
        assert rel(a, b) < RTOL


def test_frozen_head_gets_no_gradient():
    h, w, h_t, w_t = heads(8)
    w.requires_grad_(False)
    y = torch.randint(0, 64, (3, 7))
    out = fused_kd_loss(h, w, h_t, w_t, y, KDLossConfig(), vocab_size=64)
    (gh,) = torch.autograd.grad(out["loss"], [h])
    ref = kd_loss(h @ w.T, DenseTeacher(h_t @ w_t.T), y, KDLossConfig(), vocab_size=64)
    assert rel(gh, torch.autograd.grad(ref["loss"], [h])[0]) < RTOL


def test_bad_shapes_are_clear_errors():
    h, w, h_t, w_t = heads(9)
    y = torch.zeros(3, 7, dtype=torch.long)
    with pytest.raises(RetortError, match="labels shape"):
        fused_kd_loss(h, w, h_t, w_t, y[:, :5], KDLossConfig(), vocab_size=64)
    with pytest.raises(RetortError, match="teacher hidden"):
        fused_kd_loss(h, w, h_t[:2], w_t, y, KDLossConfig(), vocab_size=64)
    with pytest.raises(RetortError, match="LM-head weights"):
        fused_kd_loss(h, w_t, h_t, w_t, y, KDLossConfig(), vocab_size=64)
    with pytest.raises(RetortError, match="pass vocab_size"):
        fused_kd_loss(h, w, h_t, w_t, y, KDLossConfig())
    with pytest.raises(RetortError, match="exceeds"):
        fused_kd_loss(h, w, h_t, w_t, y, KDLossConfig(), vocab_size=71)
    with pytest.raises(RetortError, match="hidden_weight"):
        fused_kd_loss(h, w, h_t, w_t, y, KDLossConfig(hidden_weight=1.0), vocab_size=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_bf16_matches_reference(kind, beta, compile):
    """bf16 heads on the GPU (the training dtype), compiled chunks too: within bf16 rounding of the reference."""
    cfg = KDLossConfig(kind=kind, temperature=2.0, alpha=0.5, beta=beta)
    h, w, h_t, w_t = heads(
        10, B=4, T=512, d=256, d_t=384, Vs=8064, Vt=8000, dtype=torch.bfloat16, device="cuda"
    )
    y = torch.randint(0, 8000, (4, 512), device="cuda")
    y[:, :7] = -100
    ref, gh_ref, gw_ref = reference(h, w, h_t, w_t, y, cfg, 8000)
    out, gh, gw = fused(h, w, h_t, w_t, y, cfg, 8000, chunk_size=768, compile=compile)
    for k in ("loss", "kd", "ce"):
        assert val(out[k]) == pytest.approx(val(ref[k]), rel=2e-3), k
    assert rel(gh, gh_ref) < 2e-2 and rel(gw, gw_ref) < 2e-2
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
