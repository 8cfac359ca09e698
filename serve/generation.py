"""One request's generation as the ingress sees it: call the model server, detokenize, stop.

The ingress talks to the engine through a ``ModelServerClient``, one of two transports:

* ``RemoteServer`` (topology ``split``): model-server replicas behind a ``DeploymentHandle``. A
  streamed request is a streaming call (one message per engine step, detokenized here); a
  non-streamed one is ONE unary ``complete`` call: the replica detokenizes and checks stop strings
  itself and answers once, so no per-token message crosses processes.
* ``LocalServer`` (topology ``collocated``): the ``ModelServer`` object living in this very
  replica; the same calls, without serialization or a process hop.

``Generation.start()`` sends a streamed request and waits until the engine accepted it (so errors
and backpressure become HTTP status codes before any byte is streamed); ``deltas()`` then yields
text pieces with their tokens' logprobs. ``Generation.complete()`` runs a non-streamed request to
its end. Cancelling (stop string, timeout, client gone) cancels the call, and the model server
aborts the engine request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve.detokenizer import IncrementalDetokenizer, StopChecker
from serve.protocol import APIError


@dataclass
class Delta:
    text: str
    tokens: list[str] = field(default_factory=list)  # the token strings whose logprobs follow
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[str, float]]] = field(default_factory=list)  # per token, best first
    finish_reason: str | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.tokens += d.tokens
        self.logprobs += d.logprobs
        self.top_logprobs += d.top_logprobs
        self.finish_reason = d.finish_reason or self.finish_reason


def overloaded(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "server is overloaded: too many queued requests; retry later",
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def timed_out(limit: float) -> APIError:
    return APIError(408, f"request timed out after {limit:g} s", type="timeout_error", code="timeout")


class TextDecoder:
    """Engine output dicts (the model server's wire format) -> ``Delta``s: incremental
    detokenization, stop strings, logprobs and token counts. Used by the ingress for streamed
    requests and by the model server for non-streamed ones, so both give the same text."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        stops: list[str] | None,
        skip_ids: set[int],
        top_n: int | None,
    ) -> None:
        self.tok = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_ids)
        self.stop = StopChecker(stops)
        self.top_n = top_n  # None: no logprobs; n: the sampled token's plus the top n
        self.completion_tokens = 0
        self.cached_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def consume(self, out: dict[str, Any]) -> Delta | None:
        ids: list[int] = out["token_ids"]
        self.completion_tokens += len(ids)
        self.cached_tokens = out.get("num_cached_tokens") or self.cached_tokens
        delta = Delta("")
        if self.top_n is not None and out.get("logprobs"):
            for tid, lps in zip(ids, out["logprobs"], strict=False):
                top = sorted(lps.items(), key=lambda kv: -kv[1])[: self.top_n]
                delta.tokens.append(self.tok.decode([tid]))
                delta.logprobs.append(float(lps.get(tid, float("-inf"))))
                delta.top_logprobs.append([(self.tok.decode([t]), float(v)) for t, v in top])
        delta.text = self.stop.feed(self.detok.push(ids))
        if self.stop.stopped:
            delta.finish_reason = "stop"
        elif out["finished"]:
            delta.text += self.stop.feed(self.detok.flush())
            delta.text += self.stop.finish()
            reason = out.get("finish_reason")
            delta.finish_reason = (
                "stop" if self.stop.stopped else ("length" if reason == "length" else "stop")
            )
        if not delta.text and not delta.tokens and delta.finish_reason is None:
            return None
        return delta


# --- transports --------------------------------------------------------------------------------


class OutputStream(Protocol):
    async def next(self) -> dict[str, Any]: ...  # raises StopAsyncIteration at the end

    def close(self) -> None: ...  # done with it: aborts the engine request if it has not finished


class ModelServerClient(Protocol):
    def stream(
        self, request_id: str, prompt_ids: list[int], params: dict[str, Any], salt: str | None
    ) -> OutputStream: ...

    async def complete(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        salt: str | None,
        decode: dict[str, Any],
    ) -> dict[str, Any]: ...


class _RemoteStream:
    def __init__(self, resp: Any) -> None:
        self.resp, self.finished = resp, False

    async def next(self) -> dict[str, Any]:
        out = await self.resp.__anext__()
        if "error" in out or out.get("finished"):
            self.finished = True
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.resp.cancel()  # the replica cancels the generator, which aborts the engine request


class RemoteServer:
    """Model-server replicas behind a ``DeploymentHandle`` (routed by the deployment's request router)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._streaming = handle.options(stream=True)

    def stream(
        self, request_id: str, prompt_ids: list[int], params: dict[str, Any], salt: str | None
    ) -> OutputStream:
        return _RemoteStream(self._streaming.generate.remote(request_id, prompt_ids, params, salt))

    async def complete(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        salt: str | None,
        decode: dict[str, Any],
    ) -> dict[str, Any]:
        resp = self.handle.complete.remote(request_id, prompt_ids, params, salt, decode)
        try:
            return await resp
        except asyncio.CancelledError:  # timeout or client gone: stop the replica's work too
            resp.cancel()
            raise


class _LocalStream:
    def __init__(self, agen: AsyncIterator[dict[str, Any]], owner: LocalServer) -> None:
        self.agen, self.owner, self.closed = agen, owner, False

    async def next(self) -> dict[str, Any]:
        return await self.agen.__anext__()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.release()
            self.owner.close_later(self.agen)  # runs the generator's finally: abort if unfinished


class LocalServer:
    """The ``ModelServer`` of this replica, called in-process. Serve's own queue sits in front of
    the whole replica here, so the replica admits at most ``max_inflight`` generations itself
    (``limits.max_ongoing_requests + max_queued_requests``) and answers 503 past that."""

    def __init__(self, server: Any, max_inflight: int | None, retry_after_s: int) -> None:
        self.server, self.max_inflight, self.retry_after_s = server, max_inflight, retry_after_s
        self.inflight = 0
        self._closing: set[asyncio.Task] = set()

    def admit(self) -> None:
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            raise overloaded(self.retry_after_s)
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    def close_later(self, agen: Any) -> None:
        task = asyncio.get_running_loop().create_task(agen.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def stream(
        self, request_id: str, prompt_ids: list[int], params: dict[str, Any], salt: str | None
    ) -> OutputStream:
        self.admit()
        return _LocalStream(self.server.generate(request_id, prompt_ids, params, salt), self)

    async def complete(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        salt: str | None,
        decode: dict[str, Any],
    ) -> dict[str, Any]:
        self.admit()
        try:
            return await self.server.complete(request_id, prompt_ids, params, salt, decode)
        finally:
            self.release()


# --- one request --------------------------------------------------------------------------------


class Generation:
    def __init__(
        self,
        server: ModelServerClient,
        tokenizer: Any,
        prompt_ids: list[int],
        params: dict[str, Any],
        stops: list[str] | None,
        salt: str | None,
        *,
        deadline: float,
        timeout_s: float,
        retry_after_s: int,
        skip_ids: set[int],
        logprobs: int | None = None,
    ) -> None:
        self.server, self.tok = server, tokenizer
        self.prompt_ids, self.params, self.salt = prompt_ids, params, salt
        self.deadline, self.timeout_s, self.retry_after_s = deadline, timeout_s, retry_after_s
        self.stops, self.skip_ids = stops, skip_ids
        self.decoder = TextDecoder(tokenizer, prompt_ids, stops, skip_ids, logprobs)
        self.top_n = logprobs
        if logprobs is not None:
            self.params = {**params, "logprobs": max(1, logprobs)}
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.version: int | None = None
        self._resp: OutputStream | None = None
        self._first: dict[str, Any] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise timed_out(self.timeout_s)
        return left

    async def _bounded(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self._remaining())
        except TimeoutError:
            raise timed_out(self.timeout_s) from None

    async def _call(self, awaitable: Any) -> Any:
        """Await a model-server call within the deadline; Serve's backpressure becomes 503."""
        from ray.serve.exceptions import BackPressureError

        try:
            return await self._bounded(awaitable)
        except BackPressureError:
            raise overloaded(self.retry_after_s) from None

    # --- non-streamed: one call ---------------------------------------------------------------

    async def complete(self, request_id: str) -> Delta:
        """Run the request to its end in one model-server call; the replica detokenizes."""
        decode = {"stops": self.stops, "skip_ids": sorted(self.skip_ids), "logprobs": self.top_n}
        res = await self._call(
            self.server.complete(request_id, self.prompt_ids, self.params, self.salt, decode)
        )
        if "error" in res:
            raise APIError(int(res.get("status", 400)), res["error"])
        self.version = res.get("version")
        self.completion_tokens, self.cached_tokens = res["completion_tokens"], res["cached_tokens"]
        return Delta(
            res["text"],
            res["tokens"],
            res["logprobs"],
            [[tuple(t) for t in top] for top in res["top_logprobs"]],
            res["finish_reason"],
        )

    # --- streamed: one message per engine step ------------------------------------------------

    async def start(self, request_id: str) -> None:
        try:
            self._resp = self.server.stream(request_id, self.prompt_ids, self.params, self.salt)
            first = await self._call(self._resp.next())
        except StopAsyncIteration:
            self.cancel()
            raise APIError(503, "model server ended the request early", type="server_error") from None
        except BaseException:
            self.cancel()
            raise
        if "error" in first:
            self.cancel()
            raise APIError(int(first.get("status", 400)), first["error"])
        self.version = first.get("version")
        self._first = first  # also carries the first step's output

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas until the request finishes; the last one carries ``finish_reason``."""
        try:
            while True:
                if self._first is not None:
                    out, self._first = self._first, None
                else:
                    try:
                        out = await self._bounded(self._resp.next())
                    except StopAsyncIteration:
                        raise APIError(
                            503, "model server ended the stream early", type="server_error"
                        ) from None
                delta = self.decoder.consume(out)
                self.completion_tokens, self.cached_tokens = (
                    self.decoder.completion_tokens,
                    self.decoder.cached_tokens,
                )
                if delta is not None:
                    yield delta
                if out["finished"] or self.decoder.stopped:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._resp is not None:
            self._resp.close()
