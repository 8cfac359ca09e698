"""The serving forward of ``cluster.model.Transformer``: same math, fewer and larger ops.

Built once when the engine loads (no checkpoint format change): per layer, q/k/v and gate/up
weights are concatenated so each step runs one ``(N, d) x (d, (H + 2 Hkv) D)`` and one
``(N, d) x (d, 2 F)`` matmul instead of five; RoPE is applied to q and k together; cos/sin come
from a table built for every position (no per-step trig); the batch stays flat ``(N, d)`` and
no ``nn.Module`` is called on the hot path. Projections that are not plain ``nn.Linear`` (the
int8/int4 modules of ``cluster.quant``) are called as modules, unfused.

The fused weights are copies (the model's own parameters stay untouched, so it can still be
saved or trained): the engine holds q/k/v/gate/up twice. ``decode_layer`` is a pure function
of tensors, so one ``torch.compile`` of it serves every layer (see ``serve.engine.cuda_graphs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model import Transformer, rope_cos_sin
from serve.engine.paged_attention import paged_decode_attention, rope_and_cache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``cluster.model.RMSNorm`` (fp32 statistics, HF's order of casts) as a function."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (N, heads, D); cos/sin (N, 1, D)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _fuse(mods: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Concatenated weight (and bias) of plain ``nn.Linear`` modules; None if any is not one."""
    if not all(type(m) is nn.Linear for m in mods):
        return None
    w = torch.cat([m.weight.detach() for m in mods]).contiguous()
    if all(m.bias is None for m in mods):
        return w, None
    b = torch.cat([m.bias.detach() if m.bias is not None else w.new_zeros(m.out_features) for m in mods])
    return w, b


def _plain(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain ``nn.Linear`` (called with ``F.linear``, no module overhead), else None."""
    if type(m) is not nn.Linear:
        return None
    return m.weight.detach(), None if m.bias is None else m.bias.detach()


def _linear(
    x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None] | None, mod: nn.Module
) -> torch.Tensor:
    return F.linear(x, *wb) if wb is not None else mod(x)


@dataclass
class LayerWeights:
    """One decoder block's tensors; ``qkv``/``gate_up`` are None when the projection is quantized."""

    block: nn.Module
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: tuple[torch.Tensor, torch.Tensor | None] | None
    o: tuple[torch.Tensor, torch.Tensor | None] | None
    gate_up: tuple[torch.Tensor, torch.Tensor | None] | None
    down: tuple[torch.Tensor, torch.Tensor | None] | None


class FusedModel:
    """``forward(tokens (N,), positions (N,), attn) -> hidden (N, d)`` and the LM head, for the engine."""

    def __init__(self, model: Transformer, max_positions: int) -> None:
        cfg = model.cfg
        self.model = model
        self.eps = cfg.norm_eps
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim_head
        self.layers: list[LayerWeights] = []
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            self.layers.append(
                LayerWeights(
                    block,
                    block.input_layernorm.weight.detach(),
                    block.post_attention_layernorm.weight.detach(),
                    _fuse([a.q_proj, a.k_proj, a.v_proj]),
                    _plain(a.o_proj),
                    _fuse([m.gate_proj, m.up_proj]),
                    _plain(m.down_proj),
                )
            )
        w = model.lm_head.weight
        pos = torch.arange(max_positions, device=w.device)[None]
        cos, sin = rope_cos_sin(
            pos, cfg.dim_head, cfg.rope_theta, model.model.norm.weight.dtype
        )  # activation dtype
        self.cos, self.sin = cos[0], sin[0]  # (P, 1, D)
        self.pre, self.post = layer_pieces(cfg.n_heads, cfg.n_kv_heads, cfg.dim_head, cfg.norm_eps)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) -> cos, sin (N, 1, D)."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(tokens)

    def qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Input norm, q/k/v projections and RoPE of layer ``i``: x (N, d) -> q (N, H, D), k, v (N, Hkv, D)."""
        lw, N = self.layers[i], x.shape[0]
        if lw.qkv is not None:
            return self.pre(x, cos, sin, lw.ln1, *lw.qkv)
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        h = rms_norm(x, lw.ln1, self.eps)
        a = lw.block.self_attn
        q = rope(a.q_proj(h).view(N, H, D), cos, sin)
        k = rope(a.k_proj(h).view(N, Hkv, D), cos, sin)
        return q, k, a.v_proj(h).view(N, Hkv, D)

    def finish(self, i: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-attention norm and MLP of layer ``i``."""
        lw = self.layers[i]
        w = self.decode_weights(i)
        if w is not None:
            return self.post(x, attn_out, w[3], lw.ln2, w[5], w[6])
        blk = lw.block
        x = x + _linear(attn_out.reshape(x.shape[0], -1), lw.o, blk.self_attn.o_proj)
        h = rms_norm(x, lw.ln2, self.eps)
        if lw.gate_up is not None:
            g, u = F.linear(h, *lw.gate_up).chunk(2, dim=-1)
        else:
            g, u = blk.mlp.gate_proj(h), blk.mlp.up_proj(h)
        return x + _linear(F.silu(g) * u, lw.down, blk.mlp.down_proj)

    def decode_weights(self, i: int) -> tuple | None:
        """Layer ``i``'s tensors for ``decode_layer``; None if any projection is not a plain linear
        (quantized), or o/down carry a bias."""
        lw = self.layers[i]
        if (
            lw.qkv is None
            or lw.o is None
            or lw.gate_up is None
            or lw.down is None
            or lw.o[1] is not None
            or lw.gate_up[1] is not None
            or lw.down[1] is not None
        ):
            return None
        return (lw.ln1, lw.qkv[0], lw.qkv[1], lw.o[0], lw.ln2, lw.gate_up[0], lw.down[0])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over the selected rows -> fp32 logits."""
        m = self.model
        return m.lm_head(rms_norm(h, m.model.norm.weight, m.model.norm.eps)).float()


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    mask: torch.Tensor,
    n_rep: int,
) -> torch.Tensor:
    """One query per sequence over its paged KV: q (B, H, D); caches (NB, BS, Hkv, D); tables (B, nb)
    block ids; mask (B, 1, 1, nb * BS) additive; n_rep = H // Hkv (a Python int) -> (B, H, D).
    The blocks are gathered into a padded (B, Hkv, L, D) and one masked SDPA runs over the batch."""
    B, nb = tables.shape
    _, bs, hkv, d = k_cache.shape
    idx = tables.reshape(-1)
    k = k_cache.index_select(0, idx).view(B, nb * bs, hkv, d).transpose(1, 2)
    v = v_cache.index_select(0, idx).view(B, nb * bs, hkv, d).transpose(1, 2)
    if n_rep > 1 and not (q.is_cuda or torch.compiler.is_compiling()):  # eager CPU's flash kernel does GQA
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, enable_gqa=True).squeeze(
            2
        )
    if n_rep > 1:
        # CUDA's masked SDPA kernel has no GQA, and compiled, the expansion fuses into the gather
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask).squeeze(2)


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` (the same bits: a 16-bit add is an fp32 add rounded once), written so that Inductor
    does not fold it into the matmul that made ``y`` as a cuBLAS ``addmm`` (beta = 1): on an H200
    that GEMM was no faster than the plain one and each needed a copy of C first (24 × 0.9 µs a
    step); unfolded, the add after o_proj fuses into the next norm kernel and the one after down_proj
    is one 0.9 µs kernel (batch-1 decode step 491 → 478 µs)."""
    return (x.float() + y.float()).to(x.dtype)


def layer_pieces(n_heads: int, n_kv_heads: int, head_dim: int, eps: float):
    """The two attention-free parts of a plain-weight decoder block, as pure functions of tensors
    (sizes are closure constants, so one compiled graph of each serves every layer):

    * ``pre(x, cos, sin, ln1, qkv_w, qkv_b) -> q (N, H, D), k, v (N, Hkv, D)``: norm, fused q/k/v, RoPE;
    * ``post(x, attn (N, H, D), o_w, ln2, gate_up_w, down_w) -> x``: o_proj, residual, norm, SwiGLU, residual.
    """
    H, Hkv, D = n_heads, n_kv_heads, head_dim

    def pre(x, cos, sin, ln1, qkv_w, qkv_b):
        N = x.shape[0]
        qkv = F.linear(rms_norm(x, ln1, eps), qkv_w, qkv_b)
        qk = rope(qkv[:, : (H + Hkv) * D].view(N, H + Hkv, D), cos, sin)
        return qk[:, :H], qk[:, H:], qkv[:, (H + Hkv) * D :].view(N, Hkv, D)

    def post(x, attn, o_w, ln2, gu_w, down_w):
        x = residual_add(x, F.linear(attn.reshape(x.shape[0], H * D), o_w))
        g, u = F.linear(rms_norm(x, ln2, eps), gu_w).chunk(2, dim=-1)
        return residual_add(x, F.linear(F.silu(g) * u, down_w))

    return pre, post


def make_decode_layer(
    n_heads: int, n_kv_heads: int, head_dim: int, eps: float, compile: bool = False, paged: bool = False
):
    """``layer(x, cos, sin, w, k_cache, v_cache, slots, tables, mask, ctx) -> x``: one whole decoder
    block for a decode batch as a function of tensors (the sizes are closure constants, so one
    compiled graph serves every layer). x (B, d); w = (ln1, qkv_w, qkv_b, o_w, ln2, gate_up_w,
    down_w); the new k/v are written to ``slots`` of the (NB, BS, Hkv, D) caches; ``mask`` (additive)
    is for the gather + SDPA attention, ``ctx`` (B,) context lengths for the Triton one (``paged``).

    ``compile=True`` compiles the pure parts (norm + q/k/v + RoPE; [attention +] the rest of the
    block) with ``torch.compile(dynamic=True)``. The KV write stays between them, eager: inside a
    compiled function Inductor turned the in-place write into a view of a graph input into a copy of
    the whole cache layer (4 × 33 µs per layer on an H200, 80% of a batch-1 step).

    ``paged`` (CUDA with Triton) runs RoPE, the KV write and attention as Triton kernels between the
    compiled parts: ``rope_and_cache`` (one kernel: RoPE'd q out, RoPE'd k and v into their slots)
    replaced Inductor's RoPE and two ``index_copy_`` (3 kernels; at batch 64 on an H200, 6.5 µs of
    RoPE and 5 µs of copies a layer), then ``paged_decode_attention`` over the pool."""
    H, Hkv, D, n_rep = n_heads, n_kv_heads, head_dim, n_heads // n_kv_heads
    pre, post = layer_pieces(n_heads, n_kv_heads, head_dim, eps)

    def norm_qkv(x, ln1, qkv_w, qkv_b):
        return F.linear(rms_norm(x, ln1, eps), qkv_w, qkv_b)

    def attn_post(x, q, k_cache, v_cache, tables, mask, o_w, ln2, gu_w, down_w):
        return post(x, decode_attention(q, k_cache, v_cache, tables, mask, n_rep), o_w, ln2, gu_w, down_w)

    if compile:
        pre = torch.compile(pre, dynamic=True, fullgraph=True)
        norm_qkv = torch.compile(norm_qkv, dynamic=True, fullgraph=True)
        post = torch.compile(post, dynamic=True, fullgraph=True)
        attn_post = torch.compile(attn_post, dynamic=True, fullgraph=True)

    def layer(x, cos, sin, w, k_cache, v_cache, slots, tables, mask, ctx):
        ln1, qkv_w, qkv_b, o_w, ln2, gu_w, down_w = w
        if paged:
            q = rope_and_cache(
                norm_qkv(x, ln1, qkv_w, qkv_b),
                cos,
                sin,
                k_cache,
                v_cache,
                slots,
                x.new_empty(x.shape[0], H, D),
            )
            return post(x, paged_decode_attention(q, k_cache, v_cache, tables, ctx), o_w, ln2, gu_w, down_w)
        q, k, v = pre(x, cos, sin, ln1, qkv_w, qkv_b)
        k_cache.view(-1, Hkv, D).index_copy_(0, slots, k)
        v_cache.view(-1, Hkv, D).index_copy_(0, slots, v)
        return attn_post(x, q, k_cache, v_cache, tables, mask, o_w, ln2, gu_w, down_w)

    return layer
