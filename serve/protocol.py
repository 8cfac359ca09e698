"""OpenAI-compatible request/response models and the error body every failure uses.

Requests are validated strictly (unknown fields, wrong types, NaN/inf, out-of-range values are
400s with OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``); responses and
stream chunks are built as plain dicts by the small functions at the bottom, in OpenAI's layout.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_SEED = 2**63 - 1
MAX_TOKENS_BOUND = 2**31 - 1  # far beyond any context; the context check gives the real limit


class APIError(Exception):
    """An error that becomes an OpenAI-style JSON response with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=())


class StreamOptions(_Strict):
    include_usage: bool = False


PositiveTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND)]


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions (OpenAI names; vLLM extensions marked)."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: PositiveTokens | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=1 << 20)  # vLLM extension: -1 = off
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)  # vLLM extension
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = False  # vLLM extension
    cache_salt: str | None = Field(
        None, min_length=1, max_length=256
    )  # vLLM extension: per-tenant prefix cache

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > 256 for s in stops):
            raise ValueError("stop strings must be at most 256 characters")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (must be 0)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def single_prompt(self) -> str | list[int]:
        """The one prompt this request carries (a batch of one is unwrapped)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if len(p) == 0:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return p  # type: ignore[return-value]
        if len(p) != 1:
            raise bad_request(f"only one prompt per request is supported (got {len(p)})", "prompt")
        return p[0]  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: PositiveTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _chat_only(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_json(raw: bytes) -> Any:
    """Bytes -> JSON value; invalid UTF-8/JSON and NaN/Infinity literals are 400s."""

    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=reject)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad_request(f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def validate_request(cls: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` against ``cls``; the first error becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            msg = f"missing required argument: {param}"
        else:
            msg = f"{param}: {err['msg']}" if param else err["msg"]
        raise bad_request(msg, param) from None


# --- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(
    tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]], offset: int
) -> dict[str, Any]:
    """OpenAI legacy completions layout (parallel arrays; top_logprobs are dicts keyed by token
    text, so byte-level tokens that render alike collapse into one entry, as in OpenAI's API)."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(x) for x in logprobs],
        "top_logprobs": [{k: _finite(v) for k, v in reversed(top)} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(
    tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]
) -> dict[str, Any]:
    content = []
    for t, lp, top in zip(tokens, logprobs, tops, strict=True):
        content.append(
            {
                "token": t,
                "logprob": _finite(lp),
                "bytes": list(t.encode("utf-8")),
                "top_logprobs": [
                    {"token": k, "logprob": _finite(v), "bytes": list(k.encode("utf-8"))} for k, v in top
                ],
            }
        )
    return {"content": content}


def _finite(x: float) -> float:
    """JSON has no -inf: clamp to the most negative float like OpenAI's -9999.0 convention."""
    return x if math.isfinite(x) else -9999.0


def completion_body(
    rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **({"usage": use} if use is not None or not chunk else {}),
    }


def chat_body(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool) -> dict[str, Any]:
    obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **({"usage": use} if use is not None or not chunk else {}),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
