"""The model-server deployment: one ``LLMEngine`` per replica, driven by an asyncio loop.

``EngineDriver`` owns the engine. A long ``step()`` runs in one worker thread so the replica's
event loop keeps accepting and streaming while the model computes; a short one (its measured
moving average under ``inline_step_s``, no long prompt just added) runs on the loop itself, since
handing it to a thread and back costs more than the step (~2 ms on a busy 2-core box against a
sub-millisecond tiny-model step). ``add_request`` / ``abort`` are queued and applied between
steps by the loop, so the engine is only ever touched by one thread at a time. Each request gets an ``asyncio.Queue`` of its outputs; when the caller goes
away (client disconnect, stop string found, timeout) the generator's ``finally`` aborts the
request, which frees its KV blocks at the next step boundary.

``ModelServer.generate`` streams plain dicts (the wire format between ingress and server):
first ``{"accepted": True, ...first output}`` or ``{"error": msg, "status": 400}``, then one
dict per step. ``ModelServer.complete`` runs a non-streamed request to its end in the replica
(detokenization and stop strings included, like vLLM's output processor) and answers once, so a
non-streamed request costs one message instead of one per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import metrics as M
from cluster.config.serve import ServeConfig
from serve.generation import Delta, TextDecoder

log = logging.getLogger("retort.serve")

GAUGE_REFRESH_S = 2.0  # idle replicas re-set their gauges this often
INLINE_STEP_S = (
    0.002  # steps expected to be shorter than this run on the event loop (0: always in the thread)
)
INLINE_MAX_NEW_TOKENS = 64  # ... unless prompts with more tokens than this were just added (a long prefill)
STEP_EMA = 0.2  # weight of the newest step in the moving average of step times


@dataclass
class ResolvedModel:
    dir: Path
    ref: str  # what the config asked for, e.g. student@production
    name: str
    version: int | None


def resolve_model(cfg: ServeConfig) -> ResolvedModel:
    """Pin ``cfg.model.ref`` to one version now, then fetch that version's verified directory."""
    from cluster.registry import open_registry

    reg = open_registry(cfg.registry)
    ref = reg.ref(cfg.model.ref)  # alias -> exact version, once (it may move later)
    return ResolvedModel(Path(reg.resolve(ref)), cfg.model.ref, ref.name, ref.version)


class ServingMetrics:
    """The serving metrics of ``cluster.metrics``, tagged with this replica's model and id."""

    def __init__(self, model: str, replica: str) -> None:
        tags = {"model": model, "replica": replica}
        self.ttft, self.tpot, self.itl = M.make(M.TTFT, tags), M.make(M.TPOT, tags), M.make(M.ITL, tags)
        self.e2e, self.queue_time = M.make(M.E2E, tags), M.make(M.QUEUE_TIME, tags)
        self.prompt_tokens, self.generation_tokens = (
            M.make(M.PROMPT_TOKENS, tags),
            M.make(M.GENERATION_TOKENS, tags),
        )
        self.running, self.waiting, self.kv_usage = (
            M.make(M.RUNNING, tags),
            M.make(M.WAITING, tags),
            M.make(M.KV_USAGE, tags),
        )
        self.prefix_queries, self.prefix_hits = M.make(M.PREFIX_QUERIES, tags), M.make(M.PREFIX_HITS, tags)
        self.preemptions = M.make(M.PREEMPTIONS, tags)
        self.deployed: tuple[Any, float] | None = (
            None  # (DEPLOYED_VERSION gauge, value), re-set with the others
        )
        self._last: dict[str, float] = {"prefix_queries": 0, "prefix_hits": 0, "num_preemptions": 0}

    def engine_stats(self, stats: Any) -> None:
        if self.deployed is not None:
            self.deployed[0].set(self.deployed[1])
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(float(stats.kv_usage))
        for attr, metric in (
            ("prefix_queries", self.prefix_queries),
            ("prefix_hits", self.prefix_hits),
            ("num_preemptions", self.preemptions),
        ):
            value = float(getattr(stats, attr))
            if value > self._last[attr]:
                metric.inc(value - self._last[attr])
            self._last[attr] = value


@dataclass
class _Stream:
    queue: asyncio.Queue
    arrival: float
    num_prompt: int
    first_output: float | None = None
    last_token: float | None = None
    num_tokens: int = 0
    finished: bool = False
    accepted: asyncio.Future | None = None
    itl: list[float] = field(default_factory=list)


class EngineDriver:
    """Runs ``engine.step()`` in a loop; per-request queues; abort on cancellation."""

    def __init__(
        self, engine: Any, metrics: ServingMetrics | None = None, inline_step_s: float = INLINE_STEP_S
    ) -> None:
        self.engine = engine
        self.inline_step_s = inline_step_s
        self.step_time: float | None = None  # moving average of step() wall time (s); None until measured
        self.num_inline_steps = 0
        self._new_tokens = 0  # prompt tokens added since the last step
        self.metrics = metrics
        self.error: BaseException | None = None
        self.num_aborted = 0
        self.num_finished = 0
        self._streams: dict[str, _Stream] = {}
        self._adds: list[tuple[str, list[int], Any, str | None]] = []
        self._aborts: list[str] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _ensure_loop(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    @property
    def healthy(self) -> bool:
        return self.error is None and (self._task is None or not self._task.done())

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: Any, salt: str | None = None
    ) -> AsyncIterator[Any]:
        """Yield ``RequestOutput``s until finished; the engine's EngineInputError propagates."""
        if self.error is not None:
            raise RuntimeError(f"engine failed earlier: {self.error}")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        self._ensure_loop()
        loop = asyncio.get_running_loop()
        stream = _Stream(
            asyncio.Queue(), time.monotonic(), len(prompt_token_ids), accepted=loop.create_future()
        )
        self._streams[request_id] = stream
        self._adds.append((request_id, prompt_token_ids, params, salt))
        self._wake.set()
        try:
            await stream.accepted  # raises the engine's input error, if any
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished and stream.accepted.done() and stream.accepted.exception() is None:
                self._aborts.append(request_id)
                self.num_aborted += 1
                self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    if not self._adds and not self._aborts:
                        await self._idle()
                    continue
                if self._inline():
                    outputs, took = self._timed_step()
                    self.num_inline_steps += 1
                else:
                    outputs, took = await loop.run_in_executor(self._executor, self._timed_step)
                self._new_tokens = 0
                self.step_time = (
                    took if self.step_time is None else STEP_EMA * took + (1 - STEP_EMA) * self.step_time
                )
                self._dispatch(outputs)
                if self.metrics is not None:
                    self.metrics.engine_stats(self.engine.stats())
                await asyncio.sleep(0)  # after an inline step: let consumers and new requests run
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine is in an unknown state: fail every request, go unhealthy
            log.exception("engine loop failed")
            self.error = e
            for s in list(self._streams.values()):
                if s.accepted is not None and not s.accepted.done():
                    s.accepted.set_exception(RuntimeError(f"engine failed: {e}"))
                s.queue.put_nowait(RuntimeError(f"engine failed: {e}"))

    def _inline(self) -> bool:
        return (
            self.step_time is not None
            and self.step_time < self.inline_step_s
            and self._new_tokens <= INLINE_MAX_NEW_TOKENS
        )

    def _timed_step(self) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        return outputs, time.perf_counter() - t0

    async def _idle(self) -> None:
        """Wait for work; meanwhile re-publish the gauges (Ray exports a gauge only while it is set)."""
        while True:
            if self.metrics is not None:
                self.metrics.engine_stats(self.engine.stats())
            try:
                await asyncio.wait_for(self._wake.wait(), GAUGE_REFRESH_S)
                return
            except TimeoutError:
                continue

    def _apply_pending(self) -> None:
        adds, self._adds = self._adds, []
        for rid, ids, params, salt in adds:
            stream = self._streams.get(rid)
            if stream is None:  # caller gave up before we got to it
                continue
            try:
                self.engine.add_request(rid, ids, params, salt)
            except ValueError as e:  # EngineInputError is a ValueError
                stream.accepted.set_exception(e)
                continue
            stream.accepted.set_result(True)
            self._new_tokens += len(ids)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(ids))
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            with contextlib.suppress(KeyError, ValueError):  # finished in the step it was cancelled in
                self.engine.abort(rid)

    def _dispatch(self, outputs: list[Any]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._observe(stream, out, now)
            if out.finished:
                stream.finished = True
                self.num_finished += 1
            stream.queue.put_nowait(out)

    def _observe(self, s: _Stream, out: Any, now: float) -> None:
        n = len(out.new_token_ids)
        m = self.metrics
        if s.first_output is None:
            s.first_output = now
            if m is not None:
                m.queue_time.observe(now - s.arrival)
        if n and m is not None:
            if s.num_tokens == 0:
                m.ttft.observe(now - s.arrival)
            elif s.last_token is not None:
                gap = (now - s.last_token) / n
                for _ in range(n):
                    m.itl.observe(gap)
            m.generation_tokens.inc(n)
        if n:
            s.num_tokens += n
            s.last_token = now
        if out.finished and m is not None:
            m.e2e.observe(now - s.arrival)
            if s.num_tokens > 1 and s.first_output is not None:
                m.tpot.observe((now - s.first_output) / (s.num_tokens - 1))

    def stats(self) -> dict[str, Any]:
        st = self.engine.stats()
        out = (
            {k: v for k, v in vars(st).items() if isinstance(v, (int, float, str, bool))}
            if hasattr(st, "__dict__")
            else {}
        )
        out.update(
            num_aborted=self.num_aborted,
            num_finished=self.num_finished,
            num_streams=len(self._streams),
            num_inline_steps=self.num_inline_steps,
            step_time_s=self.step_time,
            healthy=self.healthy,
        )
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _input_error(e: ValueError) -> dict[str, Any]:
    return {"error": str(e).splitlines()[0] if str(e) else "invalid request", "status": 400}


def _output_dict(out: Any) -> dict[str, Any]:
    return {
        "token_ids": list(out.new_token_ids),
        "logprobs": out.new_logprobs,
        "finished": out.finished,
        "finish_reason": out.finish_reason,
        "num_prompt_tokens": out.num_prompt_tokens,
        "num_cached_tokens": out.num_cached_tokens,
    }


class ModelServer:
    """Ray Serve deployment class (decorated in ``serve.app``): the model from the registry, one engine."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from serve.engine import LLMEngine

        cfg = ServeConfig.model_validate(config)
        if cfg.replica.torch_threads:
            torch.set_num_threads(cfg.replica.torch_threads)
        self.cfg = cfg
        self.model = resolve_model(cfg)
        from serve.kv.connector import build_connector

        self.kv_connector = build_connector(cfg.kv_store)  # shared KV store; None unless kv_store.enabled
        engine = LLMEngine.from_pretrained(self.model.dir, cfg.engine, kv_connector=self.kv_connector)
        replica = _replica_id()
        self.metrics = ServingMetrics(cfg.model.public_name, replica)
        version = M.make(
            M.DEPLOYED_VERSION, {"model": cfg.model.public_name, "app": cfg.app_name, "ref": cfg.model.ref}
        )
        version.set(float(self.model.version or 0))
        self.metrics.deployed = (version, float(self.model.version or 0))
        self.driver = EngineDriver(engine, self.metrics)
        from cluster.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(
            cfg.model.tokenizer or self.model.dir
        )  # for ``complete``'s detokenization
        log.info(
            "replica %s serves %s (version %s) from %s",
            replica,
            cfg.model.ref,
            self.model.version,
            self.model.dir,
        )

    def _start(
        self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any], salt: str | None
    ) -> AsyncIterator[Any]:
        from serve.engine import SamplingParams

        return self.driver.generate(request_id, prompt_token_ids, SamplingParams(**params), salt)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any], salt: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            gen = self._start(request_id, prompt_token_ids, params, salt)
            first = await gen.__anext__()
        except StopAsyncIteration:
            return
        except ValueError as e:
            yield _input_error(e)
            return
        try:
            yield {
                "accepted": True,
                "version": self.model.version,
                **_output_dict(first),
            }  # one message, one hop
            async for out in gen:
                yield _output_dict(out)
        finally:
            await gen.aclose()  # cancelled or closed early: the driver aborts the engine request

    async def complete(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: dict[str, Any],
        salt: str | None = None,
        decode: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A whole non-streamed request: generate, detokenize, cut at stop strings, answer once.
        ``decode``: ``stops``, ``skip_ids`` and ``logprobs`` (top n, or None) as the ingress sets them.
        Same argument order as ``generate`` (the cache-aware router reads ids and salt from it)."""
        decode = decode or {}
        decoder = TextDecoder(
            self.tokenizer,
            prompt_token_ids,
            decode.get("stops"),
            set(decode.get("skip_ids") or ()),
            decode.get("logprobs"),
        )
        try:
            gen = self._start(request_id, prompt_token_ids, params, salt)
            out = await gen.__anext__()
        except StopAsyncIteration:
            return {"error": "model server ended the request early", "status": 503}
        except ValueError as e:
            return _input_error(e)
        total = Delta("")
        try:
            while True:
                delta = decoder.consume(_output_dict(out))
                if delta is not None:
                    total.add(delta)
                if out.finished or decoder.stopped:
                    break
                out = await gen.__anext__()
        finally:
            await gen.aclose()  # a stop string (or cancellation) ends it early: abort in the engine
        return {
            "version": self.model.version,
            "text": total.text,
            "tokens": total.tokens,
            "logprobs": total.logprobs,
            "top_logprobs": total.top_logprobs,
            "finish_reason": total.finish_reason,
            "completion_tokens": decoder.completion_tokens,
            "cached_tokens": decoder.cached_tokens,
        }

    def info(self) -> dict[str, Any]:
        return {
            "ref": self.model.ref,
            "name": self.model.name,
            "version": self.model.version,
            "dir": str(self.model.dir),
            "replica": _replica_id(),
        }

    def stats(self) -> dict[str, Any]:
        kv = {"kv_connector": self.kv_connector.stats.as_dict()} if self.kv_connector is not None else {}
        return {**self.driver.stats(), "version": self.model.version, "replica": _replica_id(), **kv}

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this every ``request_routing_stats_period_s``; routers read it as ``replica.routing_stats``."""
        st = self.driver.engine.stats()
        return {"num_running": st.num_running, "num_waiting": st.num_waiting, "kv_usage": float(st.kv_usage)}

    async def check_health(self) -> None:
        if not self.driver.healthy:
            raise RuntimeError(f"engine loop is not running: {self.driver.error}")

    async def __del__(self) -> None:
        await self.driver.close()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests, bench)
        return f"pid{os.getpid()}"
