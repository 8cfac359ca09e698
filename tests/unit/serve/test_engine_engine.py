"""Engine end to end on a tiny random model (fp32, CPU): greedy parity under every batch mix."""

import json

import pytest
import torch
from engine_helpers import random_prompts, reference_greedy, tiny_model

from cluster.config.engine import EngineConfig
from serve.engine import EngineInputError, LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def ref():
    return tiny_model()


def engine(**kw) -> LLMEngine:
    cfg = EngineConfig(**{"device": "cpu", "dtype": "float32", "num_blocks": 64, **kw})
    return LLMEngine(tiny_model(), cfg)


def expected(ref, prompts, n=12):
    return [reference_greedy(ref, p, n) for p in prompts]


def test_mixed_lengths_chunked_prefill(ref):
    prompts = random_prompts(6, 1, 70, seed=1)
    eng = engine(max_num_batched_tokens=20, max_num_seqs=4)  # prompts span several chunks
    out = eng.generate(prompts, GREEDY)
    assert [c.token_ids for c in out] == expected(ref, prompts)
    assert all(c.finish_reason == "length" for c in out)
    st = eng.stats()
    assert st.num_running == st.num_waiting == 0 and st.kv_usage == 0.0
    assert st.generation_tokens == 72 and st.prompt_tokens == sum(map(len, prompts))


def test_preemption_with_tiny_pool(ref):
    prompts = random_prompts(5, 20, 40, seed=2)
    eng = engine(num_blocks=9, block_size=8, max_num_batched_tokens=64)
    out = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    assert eng.stats().num_preemptions > 0
    assert [c.token_ids for c in out] == expected(ref, prompts, 24)


def test_prefix_hits_and_counters(ref):
    shared = random_prompts(1, 50, 50, seed=3)[0]
    prompts = [shared + s for s in random_prompts(4, 1, 9, seed=4)]
    eng = engine()
    first = eng.generate(prompts[:1], GREEDY)
    rest = eng.generate(prompts[1:], GREEDY)
    assert [c.token_ids for c in first + rest] == expected(ref, prompts)
    assert first[0].num_cached_tokens == 0
    assert all(c.num_cached_tokens == 48 for c in rest)  # 3 full 16-token blocks of the prefix
    st = eng.stats()
    assert st.prefix_hits == 3 * 48 and st.prefix_queries == sum(map(len, prompts))
    again = eng.generate(prompts[:1], GREEDY, salt="tenant")  # another tenant: no hit
    assert again[0].num_cached_tokens == 0 and again[0].token_ids == first[0].token_ids


def test_aborts_midway_free_blocks(ref):
    prompts = random_prompts(4, 10, 30, seed=5)
    eng = engine(max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    reasons = {}
    eng.abort("unknown-id")  # no-op
    steps = 0
    while eng.has_unfinished():
        if steps == 3:
            eng.abort("r1")
            eng.abort("r3")
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        steps += 1
    assert reasons == {"r0": "length", "r1": "abort", "r2": "length", "r3": "abort"}
    exp = expected(ref, prompts, 10)
    assert got["r0"] == exp[0] and got["r2"] == exp[2]
    assert got["r1"] == exp[1][: len(got["r1"])]
    st = eng.stats()
    assert st.num_blocks_free == st.num_blocks_total
    eng.add_request("r1", prompts[0], params)  # ids are reusable once finished
    assert eng.generate([prompts[0]], params)[0].token_ids == exp[0]


def test_stop_tokens_eos_and_logprobs(ref):
    prompt = random_prompts(1, 12, 12, seed=6)[0]
    full = reference_greedy(ref, prompt, 8)
    eng = LLMEngine(tiny_model(), EngineConfig(device="cpu", num_blocks=32), eos_token_id=full[3])
    out = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))[0]
    assert out.token_ids == full[:4] and out.finish_reason == "stop"
    assert len(out.logprobs) == 4
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([prompt]))[0, -1], -1)
    top = torch.topk(logp, 3)
    lp0 = out.logprobs[0]
    assert set(lp0) == set(top.indices.tolist())
    for tok, val in lp0.items():
        assert val == pytest.approx(logp[tok].item(), abs=1e-4)
    ign = eng.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[full[5]])
    )
    assert ign[0].token_ids == full[:6] and ign[0].finish_reason == "stop"


def test_input_errors():
    eng = engine(max_model_len=64)
    p = SamplingParams(max_tokens=4)
    cases = [
        ([], "at least one token"),
        ([1, 512], "out of range"),
        ([-1], "out of range"),
        (
            [1] * 61,
            "maximum context length is 64 tokens. However, you requested 65 tokens (61 in the messages, 4 in the completion).",
        ),
    ]
    for prompt, msg in cases:
        with pytest.raises(EngineInputError) as e:
            eng.add_request("x", prompt, p)
        assert msg in str(e.value)
    eng.add_request("dup", [1, 2], p)
    with pytest.raises(EngineInputError, match="already in use"):
        eng.add_request("dup", [1, 2], p)
    for kw, msg in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"logprobs": 6}, "logprobs"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ]:
        with pytest.raises(EngineInputError, match=msg):
            SamplingParams(**kw)
    assert issubclass(EngineInputError, ValueError)


def test_hf_transformers_parity(tmp_path, ref):
    from transformers import LlamaForCausalLM

    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = random_prompts(3, 5, 40, seed=7)
    eng = LLMEngine.from_pretrained(tmp_path, EngineConfig(device="cpu", num_blocks=64))
    ours = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
    for p, c in zip(prompts, ours, strict=False):
        with torch.no_grad():
            g = hf.generate(
                torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
            )
        assert c.token_ids == g[0, len(p) :].tolist()


def test_from_pretrained_reads_eos(tmp_path, ref):
    ref.save_pretrained(tmp_path, extra_config={"eos_token_id": 7})
    eng = LLMEngine.from_pretrained(tmp_path, EngineConfig(device="cpu", num_blocks=8))
    assert eng.eos_token_id == 7


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint(tmp_path, scheme):
    from cluster.quant import quantize_model

    model = quantize_model(tiny_model(), scheme, group_size=32)
    model.save_pretrained(tmp_path, extra_config={"quantization_config": model.quantization_config})
    loaded = LLMEngine.from_pretrained(tmp_path, EngineConfig(device="cpu", num_blocks=32))
    from cluster.quant import QuantLinear

    # kernels are chosen (and built) while the engine loads, for decode- and prefill-sized batches
    chosen = [
        len(m._choice)
        for m in loaded.model.modules()
        if isinstance(m, QuantLinear) and not type(m).__name__.endswith("Embedding")
    ]
    assert chosen and all(n == 2 for n in chosen), chosen
    prompts = random_prompts(3, 4, 30, seed=8)
    got = loaded.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    assert [c.token_ids for c in got] == [reference_greedy(model, p, 8) for p in prompts]


def test_add_and_abort_from_another_thread(ref):
    import threading

    prompts = random_prompts(6, 3, 20, seed=9)
    eng = engine(max_num_seqs=3)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    got: dict[str, list[int]] = {}
    done: dict[str, str] = {}

    def producer():
        for i, p in enumerate(prompts):
            eng.add_request(f"t{i}", p, params)
        eng.abort("t5")

    th = threading.Thread(target=producer)
    th.start()
    while th.is_alive() or eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                done[o.request_id] = o.finish_reason
    th.join()
    exp = expected(ref, prompts, 6)
    assert all(got[f"t{i}"] == exp[i] for i in range(5)) and done["t5"] in ("abort", "length")
    assert eng.stats().num_waiting == 0 and eng.stats().num_blocks_free == eng.stats().num_blocks_total


def test_engine_config_validation():
    from pydantic import ValidationError

    for bad in ({"block_size": 0}, {"dtype": "int8"}, {"device": "tpu"}, {"max_num_seqs": 0}, {"bogus": 1}):
        with pytest.raises(ValidationError):
            EngineConfig(**bad)
    with pytest.raises(Exception, match="exceeds the model's max_seq_len"):
        LLMEngine(tiny_model(), EngineConfig(device="cpu", num_blocks=8, max_model_len=10_000))
    sized = LLMEngine(tiny_model(), EngineConfig(device="cpu", kv_memory_bytes=1 << 20))
    per = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head dim, fp32
    assert sized.stats().num_blocks_total == (1 << 20) // per


def test_multi_step_decode_matches_reference():
    """Multi-step decode (bursts of greedy steps with no scheduling in between; the eager runner here,
    CUDA graphs on a GPU): each request keeps exactly its tokens up to its stop, max_tokens holds,
    what the bursts computed is registered for prefix reuse, and sampled / logprobs requests never
    run bursts."""
    ref = tiny_model()
    eng = LLMEngine(
        tiny_model(),
        EngineConfig(device="cpu", dtype="float32", num_blocks=64, block_size=8, num_scheduler_steps=6),
    )
    bursts: list[int] = []
    run = eng.runner.decode_steps_async

    def spy(seqs, steps, after=None):
        bursts.append(steps)
        for s in seqs:  # blocks for every position the burst computes were reserved
            assert len(eng.kv.block_tables[s.request_id]) * 8 >= s.num_computed_tokens + steps
        return run(seqs, steps, after)

    eng.runner.decode_steps_async = spy
    prompts = random_prompts(4, 5, 30, seed=41)
    full = [reference_greedy(ref, p, 20) for p in prompts]
    stop = full[1][9]  # request 1 stops at its 10th token, in the middle of a burst
    g = dict(temperature=0.0)
    params = [
        SamplingParams(max_tokens=20, **g),
        SamplingParams(max_tokens=20, stop_token_ids=[stop], **g),
        SamplingParams(max_tokens=3, **g),
        SamplingParams(max_tokens=13, **g),
    ]
    got = eng.generate(prompts, params)
    assert [c.token_ids for c in got] == [
        full[0],
        full[1][: full[1].index(stop) + 1],
        full[2][:3],
        full[3][:13],
    ]
    assert [c.finish_reason for c in got] == ["length", "stop", "length", "length"]
    assert bursts and max(bursts) == 6 and min(bursts) >= 2
    assert eng.stats().generation_tokens == sum(len(c.token_ids) for c in got)
    # the same prompt + output finds all its full blocks cached, including those the bursts computed
    again = eng.generate([prompts[0] + full[0]], SamplingParams(max_tokens=1, **g))[0]
    assert again.num_cached_tokens == (len(prompts[0]) + 20 - 1) // 8 * 8
    bursts.clear()
    eng.generate(
        prompts[:2],
        [
            SamplingParams(max_tokens=8, temperature=0.7, seed=1),
            SamplingParams(max_tokens=8, logprobs=1, **g),
        ],
    )
    assert bursts == []


def _async_engine(**kw) -> LLMEngine:
    """A CPU engine with async scheduling forced on (its default is on only where decode runs in CUDA
    graphs): bursts are computed when queued, but the engine logic is the GPU's."""
    cfg = dict(
        device="cpu",
        dtype="float32",
        num_blocks=64,
        block_size=8,
        num_scheduler_steps=4,
        async_scheduling=True,
    )
    return LLMEngine(tiny_model(), EngineConfig(**{**cfg, **kw}))


def test_async_scheduling_queues_the_next_burst_before_applying_the_last():
    """Each burst after the first is queued with the one before it still unapplied (``after``), with KV
    for both reserved; tokens, stops mid-burst, max_tokens and counters equal the reference."""
    ref = tiny_model()
    eng = _async_engine()
    assert _async_engine(async_scheduling=None).async_scheduling is False  # CPU default
    calls: list[tuple[int, int]] = []
    run = eng.runner.decode_steps_async

    def spy(seqs, steps, after=None):
        ahead = after.steps if after is not None else 0
        calls.append((steps, ahead))
        for s in seqs:  # blocks for the unapplied burst and this one
            assert len(eng.kv.block_tables[s.request_id]) * 8 >= s.num_computed_tokens + ahead + steps
        return run(seqs, steps, after)

    eng.runner.decode_steps_async = spy
    prompts = random_prompts(3, 5, 30, seed=43)
    full = [reference_greedy(ref, p, 24) for p in prompts]
    stop = full[1][9]  # request 1 stops at its 10th token, while a later burst is already queued
    g = dict(temperature=0.0)
    params = [
        SamplingParams(max_tokens=24, **g),
        SamplingParams(max_tokens=24, stop_token_ids=[stop], **g),
        SamplingParams(max_tokens=17, **g),
    ]
    got = eng.generate(prompts, params)
    assert [c.token_ids for c in got] == [full[0], full[1][: full[1].index(stop) + 1], full[2][:17]]
    assert [c.finish_reason for c in got] == ["length", "stop", "length"]
    assert any(ahead for _, ahead in calls), calls  # continuations happened
    assert eng.stats().generation_tokens == sum(len(c.token_ids) for c in got)
    assert eng._inflight is None and not eng.has_unfinished() and eng.stats().num_running == 0
    assert eng.stats().num_blocks_free == eng.stats().num_blocks_total  # nothing leaked


def test_async_scheduling_chains_bursts_past_requests_reaching_max_tokens():
    """Mixed max_tokens: the burst after one sized to the nearest finish is queued with the
    finishing request riding along (what it computes past max_tokens is dropped), so bursts keep
    chaining; tokens exact."""
    ref = tiny_model()
    eng = _async_engine(num_blocks=96)
    chained = []
    run = eng.runner.decode_steps_async

    def spy(seqs, steps, after=None):
        if after is not None:
            chained.append(len(seqs))
        return run(seqs, steps, after)

    eng.runner.decode_steps_async = spy
    prompts = random_prompts(4, 5, 25, seed=53)
    lengths = (6, 11, 18, 30)
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths]
    got = eng.generate(prompts, params)
    assert [c.token_ids for c in got] == [
        reference_greedy(ref, p, n) for p, n in zip(prompts, lengths, strict=True)
    ]
    assert {4, 2} <= set(chained), chained  # chained from the start (past the 6-token request) and later
    assert eng.stats().num_blocks_free == eng.stats().num_blocks_total


def test_async_scheduling_stops_for_aborts_and_newcomers():
    """An abort or a new request queued while a burst is in flight ends the pipeline: the burst's
    tokens are still reported, then the abort / admission happens; everything stays exact."""
    ref = tiny_model()
    eng = _async_engine()
    prompts = random_prompts(3, 6, 20, seed=47)
    for i, p in enumerate(prompts[:2]):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.0))
    got: dict[str, list[int]] = {"r0": [], "r1": [], "r2": []}
    reasons: dict[str, str] = {}

    def step():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason

    while eng._inflight is None:
        step()
    eng.abort("r1")
    eng.add_request("r2", prompts[2], SamplingParams(max_tokens=12, temperature=0.0))
    step()  # applies the in-flight burst, queues nothing
    assert eng._inflight is None and "r1" not in reasons
    while eng.has_unfinished():
        step()
    assert reasons == {"r0": "length", "r1": "abort", "r2": "length"}
    assert got["r0"] == reference_greedy(ref, prompts[0], 30)
    assert got["r1"] == reference_greedy(ref, prompts[1], 30)[: len(got["r1"])] and got["r1"]
    assert got["r2"] == reference_greedy(ref, prompts[2], 12)
    assert eng.stats().num_blocks_free == eng.stats().num_blocks_total


def test_multi_step_yields_to_waiting_requests():
    eng = LLMEngine(
        tiny_model(), EngineConfig(device="cpu", dtype="float32", num_blocks=64, num_scheduler_steps=8)
    )
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=30, temperature=0.0))
    eng.step()
    batch = eng.scheduler.schedule()
    assert eng._decode_steps(batch) == 8
    eng.add_request("b", [4, 5, 6], SamplingParams(max_tokens=30, temperature=0.0))  # pending: admit it first
    assert eng._decode_steps(batch) == 1


def test_fresh_prefills_are_attended_in_padded_batches():
    """Uncached prefill chunks of similar length share one right-padded causal SDPA per layer (a
    step of many new prompts is then a few attention calls, not one per prompt); tokens unchanged."""
    from serve.engine.model_runner import fresh_groups

    assert fresh_groups([(0, 40), (40, 33), (73, 25), (98, 21), (119, 9), (128, 3)]) == [
        [(0, 40), (40, 33), (73, 25), (98, 21)],
        [(119, 9)],
        [(128, 3)],
    ]
    ref = tiny_model()
    prompts = random_prompts(8, 10, 40, seed=51) + [[7] * 3, [9] * 4]
    eng = LLMEngine(
        tiny_model(), EngineConfig(device="cpu", dtype="float32", num_blocks=128, max_num_batched_tokens=512)
    )
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, GREEDY)
    eng._drain()
    batch = eng.scheduler.schedule()
    _, _, meta, _ = eng.runner.build(batch.seqs, batch.num_new_tokens)
    batched = sum(f.num for f in meta.fresh)
    assert batched >= 6 and batched + len(meta.prefills) == len(prompts)
    eng = LLMEngine(
        tiny_model(), EngineConfig(device="cpu", dtype="float32", num_blocks=128, max_num_batched_tokens=512)
    )
    assert [c.token_ids for c in eng.generate(prompts, GREEDY)] == [
        reference_greedy(ref, p, 12) for p in prompts
    ]


def test_decode_rows_beside_a_fresh_batch():
    """A step holding decode rows and a batched group of new prompts (and nothing else) attends both."""
    ref = tiny_model()
    eng = LLMEngine(
        tiny_model(), EngineConfig(device="cpu", dtype="float32", num_blocks=128, num_scheduler_steps=1)
    )
    first = random_prompts(1, 20, 20, seed=61)[0]
    eng.add_request("a", first, GREEDY)
    eng.step()
    eng.step()  # "a" is decoding
    later = random_prompts(2, 30, 30, seed=62)
    for i, p in enumerate(later):
        eng.add_request(f"n{i}", p, GREEDY)
    eng._drain()
    batch = eng.scheduler.schedule()
    _, _, meta, _ = eng.runner.build(batch.seqs, batch.num_new_tokens)
    assert meta.decode_idx is not None and not meta.prefills and [f.num for f in meta.fresh] == [2]
    logits = eng.runner.execute(batch.seqs, batch.num_new_tokens)  # the step itself
    want = {
        "a": reference_greedy(ref, eng._seqs["a"].all_token_ids, 1)[0],
        "n0": reference_greedy(ref, later[0], 1)[0],
        "n1": reference_greedy(ref, later[1], 1)[0],
    }
    assert [int(t) for t in logits.argmax(-1)] == [want[s.request_id] for s in batch.seqs]


def test_burst_acceptance_equals_the_per_token_finish_rule():
    """``_accept`` (a whole multi-step burst at once) keeps exactly what appending token by token with
    ``_finish_reason`` keeps, for stops, EOS (ignored or not), max_tokens and the context limit."""
    import random

    from serve.engine.request import Sequence

    eng = LLMEngine(
        tiny_model(),
        EngineConfig(device="cpu", dtype="float32", num_blocks=16, max_model_len=40),
        eos_token_id=3,
    )
    rng = random.Random(5)
    for trial in range(400):
        params = SamplingParams(
            max_tokens=rng.randint(2, 12),
            stop_token_ids=rng.sample(range(8), rng.randint(0, 2)),
            ignore_eos=rng.random() < 0.3,
            temperature=0.0,
        )
        seq = Sequence(f"r{trial}", [9] * rng.randint(20, 30), params)
        seq.output_token_ids = [9] * rng.randint(1, params.max_tokens - 1)
        toks = [rng.randrange(12) for _ in range(rng.randint(1, 8))]
        want, reason = [], None
        ref = Sequence("ref", list(seq.prompt_token_ids), params, output_token_ids=list(seq.output_token_ids))
        for t in toks:
            want.append(t)
            ref.output_token_ids.append(t)
            reason = eng._finish_reason(ref, t)
            if reason is not None:
                break
        assert eng._accept(seq, toks) == (want, reason), (params, seq.num_tokens, toks)
