"""Turns one step's logits into tokens: greedy, temperature, top-k, top-p, per-request seeds.

Filters run batched over the rows that sample; only the final draw is per row, because each
seeded request owns a ``torch.Generator`` (so its samples do not depend on what else is in the
batch). Log-probabilities are those of the unmodified model distribution (``log_softmax`` of
the raw logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.engine.request import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p drop. logits (B, V); top_k (B,) long, 0 = off; top_p (B,)."""
    B, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep a token if the mass strictly before it is < top_p (the first token is always kept)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits (B, V) fp32, one row per sequence -> one token per sequence."""
        B = logits.shape[0]
        tokens = logits.argmax(dim=-1)  # greedy rows keep this
        rand_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rand_rows:
            rows = torch.tensor(rand_rows, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in rand_rows], device=logits.device)
            scaled = logits[rows] / temps[:, None]
            top_k = torch.tensor([seqs[i].params.top_k for i in rand_rows], device=logits.device)
            top_p = torch.tensor([seqs[i].params.top_p for i in rand_rows], device=logits.device)
            if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
                scaled = apply_top_k_top_p(scaled, top_k, top_p)
            probs = scaled.softmax(dim=-1)  # (R, V)
            drawn = [
                torch.multinomial(probs[j], 1, generator=self.generator_for(seqs[i]))
                for j, i in enumerate(rand_rows)
            ]
            tokens[rows] = torch.cat(drawn)
        token_list = tokens.tolist()
        n_lp = max((s.params.logprobs for s in seqs), default=0)
        lps: list[dict[int, float] | None] = [None] * B
        if n_lp > 0:
            logp = logits.log_softmax(dim=-1)  # (B, V)
            top_v, top_i = logp.topk(n_lp, dim=-1)
            chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for b, s in enumerate(seqs):
                n = s.params.logprobs
                if n:
                    d = dict(zip(top_i[b][:n], top_v[b][:n], strict=True))
                    d[token_list[b]] = chosen[b]
                    lps[b] = d
        return SampleResult(token_list, lps)
