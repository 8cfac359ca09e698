"""EngineDriver: the asyncio loop around a real tiny engine (no Ray): concurrent streams,
input errors, cancellation frees the engine request, and a failing engine turns unhealthy."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.config.engine import EngineConfig
from cluster.config.model import preset
from cluster.model import Transformer
from serve.engine import EngineInputError, LLMEngine, SamplingParams
from serve.server import EngineDriver


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).init_weights(0)
    # one token per step: these tests count steps (multi-step bursts are tested with the engine)
    return LLMEngine(
        model,
        EngineConfig(
            num_blocks=128,
            max_num_seqs=8,
            max_num_batched_tokens=128,
            device="cpu",
            dtype="float32",
            num_scheduler_steps=1,
        ),
        eos_token_id=None,
    )


async def _collect(driver: EngineDriver, rid: str, prompt: list[int], n: int) -> list[int]:
    toks: list[int] = []
    async for out in driver.generate(
        rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    ):
        toks += out.new_token_ids
    return toks


def test_concurrent_streams_match_sequential(engine):
    async def main():
        driver = EngineDriver(engine)
        alone = await _collect(driver, "solo", [1, 2, 3], 6)
        together = await asyncio.gather(*[_collect(driver, f"r{i}", [1, 2, 3], 6) for i in range(4)])
        await driver.close()
        return alone, together

    alone, together = asyncio.run(main())
    assert len(alone) == 6 and all(t == alone for t in together)


def test_input_errors_propagate_and_leave_nothing_behind(engine):
    async def main():
        driver = EngineDriver(engine)
        with pytest.raises(EngineInputError):
            await _collect(driver, "bad", [], 4)
        with pytest.raises(EngineInputError):
            await _collect(driver, "oov", [10**6], 4)
        ok = await _collect(driver, "fine", [5], 2)
        await driver.close()
        return driver, ok

    driver, ok = asyncio.run(main())
    assert len(ok) == 2 and driver.num_aborted == 0 and not engine.has_unfinished()


def test_cancelling_the_consumer_aborts_the_request(engine):
    async def main():
        driver = EngineDriver(engine)
        got = asyncio.Event()

        async def consume():
            async for _ in driver.generate("long", [1, 2], SamplingParams(max_tokens=200, ignore_eos=True)):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the loop applies the abort at the next step boundary
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        stats = driver.stats()
        await driver.close()
        return driver, stats

    driver, stats = asyncio.run(main())
    assert driver.num_aborted == 1 and driver.num_finished == 0
    assert not engine.has_unfinished() and stats["num_running"] == 0 and stats["healthy"]


def test_engine_failure_fails_requests_and_health(engine, monkeypatch):
    async def main():
        driver = EngineDriver(engine)
        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            await _collect(driver, "x", [1], 3)
        return driver

    driver = asyncio.run(main())
    assert not driver.healthy


# --- inline steps -------------------------------------------------------------------------------


def test_short_steps_run_inline_and_give_the_same_tokens(engine):
    async def main():
        threaded = EngineDriver(engine, inline_step_s=0.0)
        a = await _collect(threaded, "t", [1, 2, 3], 6)
        await threaded.close()
        inline = EngineDriver(engine, inline_step_s=10.0)
        b = await _collect(inline, "i", [1, 2, 3], 6)
        long_before = inline.num_inline_steps
        await _collect(
            inline, "long", list(range(1, 101)), 1
        )  # a 100-token prompt: its prefill goes to the thread
        long_after = inline.num_inline_steps
        await inline.close()
        return a, b, threaded, inline, long_before, long_after

    a, b, threaded, inline, long_before, long_after = asyncio.run(main())
    assert a == b and len(a) == 6
    assert threaded.num_inline_steps == 0
    assert inline.num_inline_steps >= 4  # all but the first (unmeasured) steps
    assert long_after == long_before and inline.step_time is not None


def test_engine_failure_in_an_inline_step(engine, monkeypatch):
    async def main():
        driver = EngineDriver(engine, inline_step_s=10.0)
        await _collect(driver, "warm", [1, 2], 2)
        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("inline boom")))
        with pytest.raises(RuntimeError, match="inline boom"):
            await _collect(driver, "x", [1], 3)
        return driver

    driver = asyncio.run(main())
    assert not driver.healthy and driver.num_inline_steps >= 1
