"""``ModelServer`` in-process (no Ray): the non-streamed ``complete`` path gives what the streamed
path gives (text, stop strings, logprobs, usage), aborts the engine request when it ends early
(stop string, cancellation), rejects bad input with a 400 dict; ``LocalServer`` admission (503)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config.serve import ServeConfig
from serve.generation import Generation, LocalServer, TextDecoder
from serve.protocol import APIError
from serve.server import EngineDriver, ModelServer

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_server(tmp_path_factory) -> ModelServer:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
    from serve_support import publish_tiny

    tmp = tmp_path_factory.mktemp("complete")
    publish_tiny(tmp / "registry", tmp)
    cfg = ServeConfig.model_validate(
        {
            "model": {"ref": "student@production"},
            "engine": {
                "num_blocks": 128,
                "max_num_seqs": 8,
                "max_num_batched_tokens": 128,
                "dtype": "float32",
                "device": "cpu",
            },
            "registry": {"root": str(tmp / "registry"), "cache_dir": str(tmp / "registry" / ".cache")},
            "replica": {"torch_threads": 1},
        }
    )
    return ModelServer(cfg.model_dump(mode="json"))


@pytest.fixture
def server(model_server) -> ModelServer:
    """The module's model server with a fresh driver: a driver's loop task lives in one event loop
    (one per Serve replica; one per ``asyncio.run`` here)."""
    model_server.driver = EngineDriver(model_server.driver.engine, model_server.metrics)
    return model_server


def _decode(stops=None, logprobs=None) -> dict:
    return {"stops": stops, "skip_ids": [], "logprobs": logprobs}


async def _streamed_text(
    server: ModelServer, rid: str, ids: list[int], params: dict, stops=None
) -> tuple[str, int]:
    dec = TextDecoder(server.tokenizer, ids, stops, set(), None)
    text = ""
    async for out in server.generate(rid, ids, params):
        d = dec.consume(out)
        text += d.text if d else ""
        if out["finished"] or dec.stopped:
            break
    return text, dec.completion_tokens


def test_complete_matches_the_stream_and_counts_usage(server):
    ids = server.tokenizer.encode("The quick brown")

    async def main():
        res = await server.complete("c1", ids, GREEDY, None, _decode())
        streamed, n = await _streamed_text(server, "s1", ids, GREEDY)
        return res, streamed, n

    res, streamed, n = asyncio.run(main())
    assert res["text"] == streamed and res["finish_reason"] == "length"
    assert res["completion_tokens"] == n == 12 and res["version"] == 1


def test_complete_cuts_at_a_stop_string_and_aborts(server):
    ids = server.tokenizer.encode("The quick brown")
    long = {**GREEDY, "max_tokens": 200}

    async def main():
        full = (await server.complete("f", ids, GREEDY, None, _decode()))["text"]
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        before = server.driver.num_aborted
        res = await server.complete("stop", ids, long, None, _decode([stop]))
        for _ in range(100):  # the abort is applied at the next step boundary
            if not server.driver.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return full, stop, res, server.driver.num_aborted - before

    full, stop, res, aborted = asyncio.run(main())
    assert len(full) >= 6, full
    assert res["text"] == full[: full.find(stop)] and res["finish_reason"] == "stop"
    assert res["completion_tokens"] < 200 and aborted == 1
    assert not server.driver.engine.has_unfinished()


def test_complete_logprobs(server):
    ids = server.tokenizer.encode("abc")
    res = asyncio.run(
        server.complete("lp", ids, {**GREEDY, "max_tokens": 4, "logprobs": 2}, None, _decode(logprobs=2))
    )
    assert len(res["tokens"]) == len(res["logprobs"]) == len(res["top_logprobs"]) == 4
    assert all(1 <= len(top) <= 2 for top in res["top_logprobs"])
    assert all(
        lp >= max(v for _, v in top) - 1e-4
        for lp, top in zip(res["logprobs"], res["top_logprobs"], strict=True)
    )


def test_complete_bad_input_is_a_400_dict(server):
    assert asyncio.run(server.complete("e", [], GREEDY, None, _decode()))["status"] == 400
    assert (
        asyncio.run(server.complete("e2", [1], {**GREEDY, "temperature": -1}, None, _decode()))["status"]
        == 400
    )
    assert not server.driver.engine.has_unfinished()


def test_timeout_and_cancellation_abort_the_engine_request(server):
    ids = server.tokenizer.encode("a long one")
    import time

    async def main():
        before = server.driver.num_aborted
        local = LocalServer(server, max_inflight=None, retry_after_s=1)
        gen = Generation(
            local,
            server.tokenizer,
            ids,
            {**GREEDY, "max_tokens": 200},
            None,
            None,
            deadline=time.monotonic() + 0.05,
            timeout_s=0.05,
            retry_after_s=1,
            skip_ids=set(),
        )
        with pytest.raises(APIError) as e:
            await gen.complete("t1")
        for _ in range(100):
            if not server.driver.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return e.value.status, server.driver.num_aborted - before, local.inflight

    status, aborted, inflight = asyncio.run(main())
    assert status == 408 and aborted == 1 and inflight == 0
    assert not server.driver.engine.has_unfinished()


def test_local_server_admits_up_to_its_limit(server):
    import time

    ids = server.tokenizer.encode("x")

    async def main():
        local = LocalServer(server, max_inflight=1, retry_after_s=3)

        def gen() -> Generation:
            return Generation(
                local,
                server.tokenizer,
                ids,
                {**GREEDY, "max_tokens": 200},
                None,
                None,
                deadline=time.monotonic() + 30,
                timeout_s=30,
                retry_after_s=3,
                skip_ids=set(),
            )

        first = gen()
        await first.start("a1")
        with pytest.raises(APIError) as e:
            await gen().complete("a2")
        before = server.driver.num_aborted
        first.cancel()  # the stream's owner lets go: the slot is free again, the engine request aborted
        third = gen()
        delta = await third.complete("a3")
        return e.value, third, delta, local.inflight, server.driver.num_aborted - before

    err, third, delta, inflight, aborted = asyncio.run(main())
    assert err.status == 503 and err.headers["Retry-After"] == "3"
    assert third.completion_tokens == 200 and delta.finish_reason == "length" and delta.text
    assert inflight == 0 and aborted == 1
