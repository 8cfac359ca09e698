import pytest
import torch
from engine_helpers import random_prompts, tiny_model

from cluster.config.engine import EngineConfig
from serve.engine import LLMEngine, SamplingParams
from serve.engine.request import Sequence
from serve.engine.sampler import Sampler, apply_top_k_top_p


def test_top_k_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    kept = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0])).isfinite()
    assert kept.tolist() == [[True, True, False, False, False], [True] * 5]
    p = logits.softmax(-1)[0]  # ~[.64, .24, .09, .03, .01]
    kept = apply_top_k_top_p(logits[:1], torch.tensor([0]), torch.tensor([0.8])).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]  # .64 < .8 so the second is needed
    kept = apply_top_k_top_p(logits[:1], torch.tensor([0]), torch.tensor([float(p[0]) - 1e-3])).isfinite()
    assert kept.tolist() == [[True, False, False, False, False]]
    kept = apply_top_k_top_p(logits[:1], torch.tensor([3]), torch.tensor([0.99])).isfinite()
    assert kept.sum() == 3


def test_sampled_tokens_stay_inside_top_k():
    s = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(5).indices.tolist())
    seqs = [Sequence("a", [1], SamplingParams(temperature=2.0, top_k=5, seed=3))]
    drawn = {s.sample(logits, seqs).token_ids[0] for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1


def test_seed_reproducible_whatever_the_batch():
    prompts = random_prompts(4, 5, 20, seed=11)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = LLMEngine(tiny_model(), EngineConfig(device="cpu", num_blocks=64)).generate(prompts[:1], params)
    others = [SamplingParams(max_tokens=10, temperature=0.8) for _ in prompts[1:]]
    mixed = LLMEngine(tiny_model(), EngineConfig(device="cpu", num_blocks=64, seed=5)).generate(
        prompts, [params] + others
    )
    assert alone[0].token_ids == mixed[0].token_ids
    other_seed = LLMEngine(tiny_model(), EngineConfig(device="cpu", num_blocks=64)).generate(
        prompts[:1], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99)
    )
    assert other_seed[0].token_ids != alone[0].token_ids


def test_logprobs_match_log_softmax_and_include_sampled():
    s = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(2, 50)
    seqs = [
        Sequence("a", [1], SamplingParams(temperature=1.0, logprobs=2)),
        Sequence("b", [1], SamplingParams(temperature=0)),
    ]
    res = s.sample(logits, seqs)
    ref = logits.log_softmax(-1)
    lp = res.logprobs[0]
    top2 = ref[0].topk(2).indices.tolist()
    assert set(lp) == set(top2) | {res.token_ids[0]}
    for t, v in lp.items():
        assert v == pytest.approx(ref[0, t].item(), abs=1e-6)
    assert res.logprobs[1] is None and res.token_ids[1] == int(logits[1].argmax())
