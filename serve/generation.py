"""One request's generation as the ingress sees it: call the model server, detokenize, stop.

``Generation.start()`` sends the request to a model-server replica and waits until the engine
accepted it (so errors and backpressure become HTTP status codes before any byte is streamed);
``deltas()`` then yields text pieces with their tokens' logprobs. Cancelling (stop string,
timeout, client gone) cancels the Serve call, and the replica aborts the engine request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serve.detokenizer import IncrementalDetokenizer, StopChecker
from serve.protocol import APIError


@dataclass
class Delta:
    text: str
    tokens: list[str] = field(default_factory=list)  # the token strings whose logprobs follow
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[str, float]]] = field(default_factory=list)  # per token, best first
    finish_reason: str | None = None


def overloaded(retry_after_s: int) -> APIError:
    return APIError(503, "server is overloaded: too many queued requests; retry later", type="server_error",
                    code="overloaded", headers={"Retry-After": str(retry_after_s)})


def timed_out(limit: float) -> APIError:
    return APIError(408, f"request timed out after {limit:g} s", type="timeout_error", code="timeout")


class Generation:
    def __init__(self, handle: Any, tokenizer: Any, prompt_ids: list[int], params: dict[str, Any],
                 stops: list[str] | None, salt: str | None, *, deadline: float, timeout_s: float,
                 retry_after_s: int, skip_ids: set[int], logprobs: int | None = None) -> None:
        self.handle, self.tok = handle, tokenizer
        self.prompt_ids, self.params, self.salt = prompt_ids, params, salt
        self.deadline, self.timeout_s, self.retry_after_s = deadline, timeout_s, retry_after_s
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_ids)
        self.stop = StopChecker(stops)
        self.skip_ids = skip_ids
        self.top_n = logprobs  # None: no logprobs; n: the sampled token's plus the top n
        if logprobs is not None:
            self.params = {**params, "logprobs": max(1, logprobs)}
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.version: int | None = None
        self._resp: Any = None
        self._first: dict[str, Any] | None = None
        self._done = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise timed_out(self.timeout_s)
        return left

    async def _next(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self._resp.__anext__(), self._remaining())
        except TimeoutError:
            raise timed_out(self.timeout_s) from None

    async def start(self, request_id: str) -> None:
        from ray.serve.exceptions import BackPressureError

        self._resp = self.handle.options(stream=True).generate.remote(request_id, self.prompt_ids, self.params,
                                                                      self.salt)
        try:
            first = await self._next()
        except BackPressureError:
            self._done = True
            raise overloaded(self.retry_after_s) from None
        except StopAsyncIteration:
            self._done = True
            raise APIError(503, "model server ended the request early", type="server_error") from None
        except APIError:
            self.cancel()
            raise
        if "error" in first:
            self._done = True
            raise APIError(int(first.get("status", 400)), first["error"])
        self.version = first.get("version")
        self._first = first  # also carries the first step's output

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas until the request finishes; the last one carries ``finish_reason``."""
        try:
            while True:
                try:
                    if self._first is not None:
                        out, self._first = self._first, None
                    else:
                        out = await self._next()
                except StopAsyncIteration:
                    raise APIError(503, "model server ended the stream early", type="server_error") from None
                delta = self._consume(out)
                if delta is not None:
                    yield delta
                if out["finished"] or self.stop.stopped:
                    self._done = out["finished"]
                    return
        finally:
            self.cancel()

    def _consume(self, out: dict[str, Any]) -> Delta | None:
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
            delta.finish_reason = "stop" if self.stop.stopped else ("length" if reason == "length" else "stop")
        if not delta.text and not delta.tokens and delta.finish_reason is None:
            return None
        return delta

    def cancel(self) -> None:
        if self._resp is not None and not self._done:
            self._done = True
            self._resp.cancel()

    async def collect(self) -> Delta:
        """Run to the end and merge every delta (non-streaming responses)."""
        total = Delta("")
        async for d in self.deltas():
            total.text += d.text
            total.tokens += d.tokens
            total.logprobs += d.logprobs
            total.top_logprobs += d.top_logprobs
            total.finish_reason = d.finish_reason or total.finish_reason
        return total
