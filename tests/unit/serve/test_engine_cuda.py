"""The engine on CUDA: eager and CUDA-graph decode agree with the CPU reference."""

import pytest
import torch
from engine_helpers import random_prompts, reference_greedy, tiny_model

from cluster.config.engine import EngineConfig
from serve.engine import LLMEngine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run(dtype: str, eager: bool, prompts, **kw):
    cfg = EngineConfig(
        device="cuda", dtype=dtype, enforce_eager=eager, num_blocks=kw.pop("num_blocks", 128), **kw
    )
    eng = LLMEngine(tiny_model(), cfg)
    out = eng.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    return [c.token_ids for c in out], eng


@pytest.mark.parametrize(
    "eager,variant,triton",
    [
        (True, "eager", True),
        (False, "eager", True),
        (False, "compiled", True),
        (False, "triton", True),
        (False, "eager", False),
    ],
)
def test_fp32_matches_cpu_reference(eager, variant, triton, monkeypatch):
    """Mixed batches, chunked prefill, preemption and prefix hits, with each decode-graph variant;
    with Triton whole prefill/mixed steps are graphs (``StepGraphs``), without it piecewise graphs
    around eager SDPA."""
    monkeypatch.setenv("RETORT_ENGINE_COMPILE", "1" if variant == "compiled" else "0")
    monkeypatch.setenv("RETORT_GRAPH_VARIANT", variant)
    if not triton:
        import serve.engine.model_runner as mr

        monkeypatch.setattr(mr, "paged_available", lambda device, head_dim: False)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model()
    prompts = random_prompts(6, 1, 60, seed=21)
    shared = random_prompts(1, 40, 40, seed=22)[0]
    prompts += [shared + [1, 2], shared + [3]]
    got, eng = run("float32", eager, prompts, max_num_batched_tokens=48, num_blocks=24, block_size=8)
    assert got == [reference_greedy(ref, p, 20) for p in prompts]
    assert eng.stats().num_preemptions > 0 or eng.stats().prefix_hits > 0
    if not eager:
        assert eng.runner.graphs is not None and eng.runner.graphs.graphs
        assert (eng.runner.graphs.layer_fn is not None) == (variant == "compiled")
        graphs = eng.runner.steps if triton else eng.runner.pieces  # prefill / mixed steps
        assert graphs is not None and graphs.buckets == [16, 32, 48]
        if triton:
            assert graphs.variants(16) == [variant]
        assert (eng.runner.steps is None) == (not triton) and (eng.runner.pieces is None) == triton


def test_bf16_graphs_agree_with_eager():
    """Compiled graphs fuse the norms and RoPE (fp32 inside, fewer bf16 roundings than eager), so
    bf16 tokens may differ after a near-tie: compare the model's log-probabilities instead."""
    prompts = random_prompts(5, 3, 50, seed=23)
    p = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1)
    outs = [
        LLMEngine(
            tiny_model(), EngineConfig(device="cuda", dtype="bfloat16", enforce_eager=e, num_blocks=128)
        ).generate(prompts, p)
        for e in (True, False)
    ]
    first_equal = 0
    for a, b in zip(*outs, strict=True):
        first_equal += a.token_ids[0] == b.token_ids[0]
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if ta != tb:
                break
            assert abs(a.logprobs[i][ta] - b.logprobs[i][tb]) < 0.1, (i, a.logprobs[i], b.logprobs[i])
    assert first_equal >= 4


def test_sampling_on_cuda_seeded():
    prompts = random_prompts(2, 5, 10, seed=24)
    p = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.9, seed=7, logprobs=2)
    a = LLMEngine(tiny_model(), EngineConfig(device="cuda", num_blocks=32)).generate(prompts, p)
    b = LLMEngine(tiny_model(), EngineConfig(device="cuda", num_blocks=32)).generate(prompts, p)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.logprobs) == 8 for c in a)


@pytest.mark.parametrize(
    "variant,async_scheduling", [("eager", None), ("compiled", None), ("triton", None), ("eager", False)]
)
def test_multi_step_graph_bursts_match_reference(variant, async_scheduling, monkeypatch):
    """Bursts of up to 8 graph replays that feed their own greedy tokens forward (positions crossing
    block boundaries, stops inside a burst, batch sizes shrinking as requests finish) give the
    reference tokens; with async scheduling (CUDA's default) bursts are queued from the tokens the
    previous burst left on the GPU, before the host has read them."""
    monkeypatch.setenv("RETORT_ENGINE_COMPILE", "1" if variant == "compiled" else "0")
    monkeypatch.setenv("RETORT_GRAPH_VARIANT", variant)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model()
    prompts = random_prompts(9, 1, 70, seed=31)
    full = [reference_greedy(ref, p, 40) for p in prompts]
    stop = full[0][12]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, stop_token_ids=[stop] if i == 0 else [])
        for i, m in enumerate((40, 1, 2, 7, 9, 17, 25, 33, 40))
    ]
    eng = LLMEngine(
        tiny_model(),
        EngineConfig(
            device="cuda",
            dtype="float32",
            num_blocks=160,
            block_size=8,
            num_scheduler_steps=8,
            async_scheduling=async_scheduling,
        ),
    )
    assert eng.async_scheduling is (async_scheduling is None)
    seen: list[int] = []
    on_gpu: list[bool] = []
    run = eng.runner.graphs.run

    def spy(tokens, positions, slots, tables, steps=1):
        seen.append(steps)
        on_gpu.append(tokens is None)
        return run(tokens, positions, slots, tables, steps)

    eng.runner.graphs.run = spy
    got = eng.generate(prompts, params)
    want = [f[: p.max_tokens] for f, p in zip(full, params, strict=True)]
    want[0] = full[0][: full[0].index(stop) + 1]
    assert [c.token_ids for c in got] == want
    assert max(seen) == 8 and seen.count(1) < len(seen)
    # equal lengths: no request ends inside a burst, so async bursts chain on the GPU
    on_gpu.clear()
    same = [SamplingParams(max_tokens=40, temperature=0.0)] * 4
    assert [c.token_ids for c in eng.generate(prompts[1:5], same)] == full[1:5]
    assert any(on_gpu) == eng.async_scheduling
    assert eng.stats().num_blocks_free == eng.stats().num_blocks_total


@pytest.mark.parametrize("block_q,splits", [(16, 1), (64, 1), (16, 8), (64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D,BS", [(12, 12, 64, 16), (8, 2, 32, 16), (4, 1, 64, 8)])
def test_paged_varlen_kernel_matches_masked_sdpa(dtype, H, Hkv, D, BS, block_q, splits):
    """Query blocks of a fresh prompt, a chunk after a cached prefix, decode rows and padding rows;
    with the keys split over programs (partials combined), whose scratch starts as NaN."""
    import torch.nn.functional as F

    from serve.engine.paged_attention import paged_varlen_attention, query_blocks

    g = torch.Generator(device="cuda").manual_seed(H * D + BS)
    spec = [(150, 0), (37, 100), (1, 300), (1, 5), (16, 16)]  # (new rows, position of the first)
    spans, row = [], 0
    for n, p in spec:
        spans.append((row, n, p))
        row += n
    NB = 300
    tables = torch.randperm(NB, device="cuda", generator=g)[: len(spec) * 40].view(len(spec), 40)
    q = torch.randn(row + 5, H + 2 * Hkv, D, device="cuda", dtype=dtype, generator=g)[
        :, :H
    ]  # strided, as in the engine
    kc = torch.randn(NB, BS, Hkv, D, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn(NB, BS, Hkv, D, device="cuda", dtype=dtype, generator=g)
    qb = torch.tensor(query_blocks(spans, block_q) + [(0, 0, 0, 0)] * 3, device="cuda")
    out = torch.full((row + 5, H, D), 7.0, device="cuda", dtype=dtype)
    scratch = (
        torch.full((splits * (row + 5), H, D), float("nan"), device="cuda"),
        torch.full((splits * (row + 5), H, 2), float("nan"), device="cuda"),
    )
    paged_varlen_attention(q, kc, vc, qb, tables, out, block_q, splits, scratch)
    for i, (r, n, p) in enumerate(spans):
        ctx = p + n
        k = kc[tables[i]].reshape(-1, Hkv, D)[:ctx].transpose(0, 1).float()
        v = vc[tables[i]].reshape(-1, Hkv, D)[:ctx].transpose(0, 1).float()
        mask = torch.arange(ctx, device="cuda")[None] <= torch.arange(p, ctx, device="cuda")[:, None]
        want = F.scaled_dot_product_attention(
            q[r : r + n].transpose(0, 1).float()[None], k[None], v[None], attn_mask=mask, enable_gqa=Hkv < H
        )[0].transpose(0, 1)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[r : r + n].float(), want, rtol=tol, atol=tol)
    assert (out[row:] == 7).all()  # rows outside every query block are left alone
