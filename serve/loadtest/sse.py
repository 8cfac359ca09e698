"""Measure one streamed (SSE) OpenAI response: TTFT, ITL gaps, TPOT, e2e, output tokens.

Definitions (as ``vllm bench serve`` / llmperf): TTFT = first chunk with non-empty text - send;
ITL = every gap between consecutive non-empty chunks; TPOT = (e2e - TTFT) / (tokens - 1);
tokens = ``usage.completion_tokens`` of the final chunk (``stream_options.include_usage``),
else the number of non-empty chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class StreamResult:
    ok: bool = False
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_text(chunk: dict) -> str:
    """The text a completion or chat chunk carries ('' for role-only / usage-only chunks)."""
    out = []
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            out.append(choice.get("text") or "")
        else:
            out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def consume(
    readline: Callable[[], bytes], t_send: float, clock: Callable[[], float] = time.perf_counter
) -> StreamResult:
    """Read SSE lines until ``data: [DONE]`` or end of stream; ``t_send`` is ``clock()`` at send.

    A stream that ends without ``[DONE]`` or carries an ``error`` object is a failure; a complete
    stream without any text (every token decoded to '') succeeds with ``ttft_s`` None.
    """
    res = StreamResult()
    last: float | None = None
    n_text = 0
    usage_tokens: int | None = None
    done = False
    while True:
        raw = readline()
        if not raw:
            break
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        now = clock()
        try:
            chunk = json.loads(payload)
        except ValueError:
            res.error = f"bad SSE payload: {payload[:80]!r}"
            return res
        if "error" in chunk:
            res.error = f"error event: {str(chunk['error'])[:160]}"
            return res
        if chunk.get("usage"):
            usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        for choice in chunk.get("choices") or []:
            res.finish_reason = choice.get("finish_reason") or res.finish_reason
        if chunk_text(chunk):
            n_text += 1
            if res.ttft_s is None:
                res.ttft_s = now - t_send
            else:
                res.itl_s.append(now - last)  # type: ignore[operator]
            last = now
    end = clock()
    if not done:
        res.error = "stream ended before data: [DONE]"
        return res
    res.e2e_s = end - t_send
    res.output_tokens = usage_tokens if usage_tokens is not None else n_text
    # a complete stream whose tokens all decode to '' (e.g. special tokens) succeeded, but has no TTFT
    if res.ttft_s is not None and res.output_tokens > 1:
        res.tpot_s = (res.e2e_s - res.ttft_s) / (res.output_tokens - 1)
    res.ok = True
    return res
