"""Load-test pieces that need no server: SSE timing, shapes, workloads, summary and SLO verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config.base import load_config
from cluster.config.loadtest import LoadTestConfig
from cluster.errors import ConfigError
from serve.loadtest import report
from serve.loadtest.shapes import stages, users_at
from serve.loadtest.sse import consume
from serve.loadtest.workloads import Workload, shared_prefix_prompts

REPO = Path(__file__).resolve().parents[3]


def sse(*chunks: dict | str) -> list[bytes]:
    out = []
    for c in chunks:
        out += [f"data: {c if isinstance(c, str) else json.dumps(c)}\n".encode(), b"\n"]
    return out


def feed(lines: list[bytes], times: list[float]):
    """readline over ``lines``; the clock returns ``times`` in order (one per data line + the end)."""
    it, clock = iter(lines), iter(times)
    return (lambda: next(it, b"")), (lambda: next(clock))


def text(t: str) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": None}]}


def test_sse_timings_follow_vllm_definitions():
    lines = sse(
        {"choices": [{"delta": {"role": "assistant"}}]},
        text("a"),
        text(""),
        text("b"),
        text("c"),
        {"choices": [], "usage": {"completion_tokens": 4}},
        "[DONE]",
    )
    # one clock reading per data line (6, [DONE] excluded), then the end
    readline, clock = feed(lines, [0.5, 1.0, 1.1, 1.5, 2.0, 2.1, 2.2])
    r = consume(readline, 0.0, clock)
    assert r.ok and r.ttft_s == 1.0 and r.output_tokens == 4
    assert r.itl_s == pytest.approx([0.5, 0.5])
    assert r.e2e_s == 2.2 and r.tpot_s == pytest.approx((2.2 - 1.0) / 3)


def test_sse_failures():
    readline, clock = feed(sse(text("a")), [1.0, 2.0])
    assert consume(readline, 0.0, clock).error == "stream ended before data: [DONE]"
    readline, clock = feed(sse({"error": {"message": "boom"}}, "[DONE]"), [1.0, 2.0])
    assert "boom" in consume(readline, 0.0, clock).error
    readline, clock = feed(
        sse(text(""), {"choices": [], "usage": {"completion_tokens": 3}}, "[DONE]"), [1.0, 1.5, 2.0]
    )
    r = consume(readline, 0.0, clock)  # tokens that all decode to '': a success without a TTFT
    assert r.ok and r.ttft_s is None and r.tpot_s is None and r.output_tokens == 3 and r.e2e_s == 2.0


def test_shapes():
    spike = {
        "kind": "spike",
        "users": 8,
        "spawn_rate": 8,
        "duration_s": 60,
        "base_users": 1,
        "spike_start_s": 5,
        "spike_s": 25,
    }
    plan = stages(spike)
    assert [users_at(plan, t)[0] for t in (0, 4.9, 5, 29.9, 30, 59.9)] == [1, 1, 8, 8, 1, 1]
    assert users_at(plan, 60) is None
    ramp = stages({"kind": "ramp", "users": 4, "spawn_rate": 1, "duration_s": 40})
    assert [users_at(ramp, t)[0] for t in (0, 10, 20, 39)] == [1, 2, 3, 4]
    st = stages(
        {
            "kind": "stages",
            "users": 1,
            "spawn_rate": 1,
            "duration_s": 1,
            "stages": [
                {"duration_s": 3, "users": 2, "spawn_rate": 1},
                {"duration_s": 2, "users": 5, "spawn_rate": 5},
            ],
        }
    )
    assert st == [(3.0, 2, 1.0), (5.0, 5, 5.0)]


def test_workloads_are_reproducible_and_shaped():
    cfg = LoadTestConfig().workload.model_dump()
    prompts = shared_prefix_prompts(3, 4, 10, 2, seed=1)
    assert len(prompts) == 12 and len({p.split("\n")[0] for p in prompts}) == 3
    assert prompts == shared_prefix_prompts(3, 4, 10, 2, seed=1)
    w1 = Workload({**cfg, "kind": "corpus", "chat_fraction": 0.5}, "m", 3)
    w2 = Workload({**cfg, "kind": "corpus", "chat_fraction": 0.5}, "m", 3)
    a, b = [w1.next() for _ in range(20)], [w2.next() for _ in range(20)]
    assert a == b and {k for k, _ in a} == {"chat", "completions"}
    kind, body = a[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    assert ("messages" in body) == (kind == "chat")


def test_shipped_configs_validate_and_bad_input_is_one_line():
    for name in ("tiny", "small", "spike"):
        load_config(REPO / "configs/loadtest" / f"{name}.yaml", LoadTestConfig)
    with pytest.raises(ConfigError, match="spike ends at"):
        load_config(None, LoadTestConfig, ["shape.kind=spike", "shape.duration_s=10"])
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(None, LoadTestConfig, ["slo.p99=1"])


def write_samples(d: Path, samples: list[dict]) -> None:
    (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples) + '{"cut')


def test_summary_and_slo_gate_both_ways(tmp_path):
    ok = [
        {
            "t": 100.0 + i,
            "ok": True,
            "ttft_s": 0.1 * (i + 1),
            "e2e_s": 1.0,
            "tpot_s": 0.01,
            "itl_s": [0.01, 0.02],
            "output_tokens": 10,
            "error": "",
        }
        for i in range(10)
    ]
    write_samples(tmp_path, [*ok, {"t": 105.0, "ok": False, "error": "HTTP 503: busy", "output_tokens": 0}])
    facts = {"t_start": 99.0, "t_end": 111.0}
    cfg = LoadTestConfig(prometheus_url=None, slo={"p99_ttft_s": 2.0, "max_error_ratio": 0.1})
    s = report.summarize(tmp_path, cfg, facts)
    assert s["requests"] == 11 and s["failures"] == 1 and s["duration_s"] == pytest.approx(10.0)
    assert s["output_tokens_per_s"] == pytest.approx(10.0) and s["errors"] == {"HTTP 503: busy": 1}
    assert s["ttft_s"]["p50"] == pytest.approx(0.55) and s["ttft_s"]["p99"] == pytest.approx(0.991)
    assert s["slo"]["passed"] and [c["name"] for c in s["slo"]["checks"]] == ["p99_ttft_s", "max_error_ratio"]
    strict = cfg.model_copy(
        update={"slo": cfg.slo.model_copy(update={"p99_ttft_s": 0.5, "min_output_tok_s": 100})}
    )
    s2 = report.summarize(tmp_path, strict, facts)
    assert not s2["slo"]["passed"]
    assert {c["name"]: c["passed"] for c in s2["slo"]["checks"]} == {
        "p99_ttft_s": False,
        "max_error_ratio": True,
        "min_output_tok_s": False,
    }
    assert any("BROKEN" in line for line in report.table(s2))


def test_no_samples_fails_the_gate(tmp_path):
    s = report.summarize(
        tmp_path, LoadTestConfig(), {"t_start": 1.0, "t_end": 2.0, "error": "endpoint unreachable: x"}
    )
    assert s["requests"] == 0 and not s["slo"]["passed"] and "unreachable" in s["error"]
