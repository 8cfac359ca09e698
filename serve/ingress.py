"""The OpenAI-compatible HTTP ingress (FastAPI under ``@serve.ingress``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``. The ingress tokenizes (so a cache-aware router sees token ids), validates
against the model's vocabulary and context and sends token ids to the engine (``serve.generation``):

* topology ``split`` (default): to a model-server replica through a ``DeploymentHandle`` (routed
  by the cache-aware router when configured). Streamed requests are a streaming call detokenized
  here; non-streamed ones one unary ``complete`` call that the replica finishes on its own.
* topology ``collocated``: this replica IS the model server (``serve.app`` deploys it under the
  model server's name, with its autoscaling and resources); the engine is called in-process.

Every failure is an OpenAI-style JSON error with a 4xx or 503 status.
"""

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import metrics as M
from cluster.config.serve import ServeConfig
from serve.auth import APIKeys
from serve.generation import Delta, Generation, LocalServer, RemoteServer
from serve.guard import Guard, GuardMiddleware, read_body, request_id_of
from serve.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    new_id,
    parse_json,
    sse,
    usage,
    validate_request,
)
from serve.server import ModelServer, resolve_model

log = logging.getLogger("retort.serve")

app = FastAPI(title="Retort", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(GuardMiddleware)


def _json_error(err: APIError, request: Request | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _json_error(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    status = exc.status_code if 400 <= exc.status_code < 500 else 503
    return _json_error(APIError(status, str(exc.detail), code=code))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _json_error(
        bad_request(str(exc.errors()[0].get("msg", "invalid request")) if exc.errors() else "invalid request")
    )


def _unavailable(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "model server unavailable; retry later",
        type="server_error",
        code="unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


VERSION_HEADER = "X-Retort-Model-Version"  # the registry version that answered (rollouts are visible)


def _json_response(body: dict[str, Any], gen: Generation) -> JSONResponse:
    return JSONResponse(body, headers={VERSION_HEADER: str(gen.version)})


def _sse_response(chunks: Any, gen: Generation) -> StreamingResponse:
    """Wrap chunk generation: errors after the headers went out become an error event, then [DONE].
    If the client goes away Starlette closes ``body``; the ``finally`` cancels the generation,
    which aborts the engine request on the replica (its KV blocks are freed)."""

    async def body():
        try:
            async for c in chunks:
                yield c
            yield SSE_DONE
        except APIError as e:
            yield sse(e.body())
            yield SSE_DONE
        except Exception as e:  # noqa: BLE001 - mid-stream failure: tell the client in-band
            log.warning("stream failed: %r", e)
            yield sse(_unavailable(1).body())
            yield SSE_DONE
        finally:
            gen.cancel()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", VERSION_HEADER: str(gen.version)},
    )


@serve.ingress(app)
class Ingress:
    def __init__(self, server: Any, config: dict[str, Any]) -> None:
        from cluster.checkpoint import config_from_hf, read_hf_config
        from cluster.tokenizer import load_tokenizer

        cfg = ServeConfig.model_validate(config)
        self.cfg = cfg
        # server: a DeploymentHandle to the model servers (split), or None: host the engine here (collocated)
        self.local: ModelServer | None = ModelServer(config) if server is None else None
        if self.local is not None:
            lim = cfg.limits
            admitted = (
                lim.max_ongoing_requests + lim.max_queued_requests if lim.max_queued_requests >= 0 else None
            )
            self.server = LocalServer(self.local, admitted, lim.retry_after_s)
        else:
            self.server = RemoteServer(server)
        self.model = self.local.model if self.local is not None else resolve_model(cfg)
        self.tok = (
            self.local.tokenizer
            if self.local is not None
            else load_tokenizer(cfg.model.tokenizer or self.model.dir)
        )
        mcfg = config_from_hf(read_hf_config(self.model.dir))
        if self.tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} ids but the model only {mcfg.vocab_size}")
        self.vocab_size = mcfg.vocab_size
        self.max_len = cfg.engine.max_model_len or mcfg.max_seq_len
        self.name = cfg.model.public_name
        self.created = int(time.time())
        self.eos = {i for i in (self.tok.eos_id,) if i is not None}
        keys = APIKeys.from_config(cfg.auth)
        app.state.guard = Guard(
            keys, cfg.limits.max_body_bytes, cfg.limits.retry_after_s, self.name, M.make(M.RESPONSES)
        )

    # --- the model server's methods, when this replica hosts the engine (collocated) -----------

    def _engine(self) -> ModelServer:
        if self.local is None:
            raise RuntimeError(
                "this ingress has no engine: topology is split, ask the ModelServer deployment"
            )
        return self.local

    async def check_health(self) -> None:
        if self.local is not None:
            await self.local.check_health()

    def stats(self) -> dict[str, Any]:
        return {**self._engine().stats(), "inflight": self.server.inflight}

    def info(self) -> dict[str, Any]:
        return self._engine().info()

    def record_routing_stats(self) -> dict[str, Any]:
        return self.local.record_routing_stats() if self.local is not None else {}

    # --- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "retort",
                    "root": f"{self.model.name}:{self.model.version}",
                    "max_model_len": self.max_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req: CompletionRequest = validate_request(CompletionRequest, await self._json(request))
        self._check_model(req.model)
        prompt = req.single_prompt()
        ids = await self._tokens(prompt)
        gen = self._generation(req, ids, req.stop, req.logprobs, list(req.stop_token_ids or []))
        rid = new_id("cmpl")
        if req.stream:
            await self._start(gen, request)
            include = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(self._completion_chunks(gen, rid, include), gen)
        total = await self._complete(gen, request)
        lp = (
            completion_logprobs(total.tokens, total.logprobs, total.top_logprobs, 0)
            if req.logprobs is not None
            else None
        )
        choice = {"index": 0, "text": total.text, "logprobs": lp, "finish_reason": total.finish_reason}
        return _json_response(
            completion_body(
                rid,
                self.name,
                [choice],
                usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
                chunk=False,
            ),
            gen,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        req: ChatCompletionRequest = validate_request(ChatCompletionRequest, await self._json(request))
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template rejected the conversation
            raise bad_request(
                f"messages: {str(e).splitlines()[0] if str(e) else 'invalid conversation'}", "messages"
            ) from None
        ids = await self._tokens(text)
        stop_ids = sorted(set(req.stop_token_ids or []) | set(self.tok.stop_ids))
        gen = self._generation(req, ids, req.stop, req.num_logprobs(), stop_ids)
        rid = new_id("chatcmpl")
        if req.stream:
            await self._start(gen, request)
            include = bool(req.stream_options and req.stream_options.include_usage)
            return _sse_response(self._chat_chunks(gen, rid, include, req.logprobs), gen)
        total = await self._complete(gen, request)
        lp = chat_logprobs(total.tokens, total.logprobs, total.top_logprobs) if req.logprobs else None
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": total.text},
            "logprobs": lp,
            "finish_reason": total.finish_reason,
        }
        return _json_response(
            chat_body(
                rid,
                self.name,
                [choice],
                usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
                chunk=False,
            ),
            gen,
        )

    # --- request handling ---------------------------------------------------------------------

    async def _json(self, request: Request) -> Any:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            raise APIError(
                415, f"Content-Type must be application/json, got {ctype!r}", code="unsupported_media_type"
            )
        return parse_json(await read_body(request.receive, self.cfg.limits.max_body_bytes))

    def _check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(
                404,
                f"The model `{name}` does not exist. Served: `{self.name}`.",
                param="model",
                code="model_not_found",
            )

    async def _tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
            ids = (
                self.tok.encode(prompt)
                if len(prompt) < 8192
                else await asyncio.to_thread(self.tok.encode, prompt)
            )
            if not ids:
                raise bad_request("prompt encodes to no tokens", "prompt")
            return ids
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} is out of range [0, {self.vocab_size})", "prompt", "invalid_token_id"
            )
        return prompt

    def _generation(
        self, req: Any, ids: list[int], stops: list[str] | None, logprobs: int | None, stop_ids: list[int]
    ) -> Generation:
        if req.n != 1:
            raise bad_request("n > 1 is not supported; send n separate requests", "n")
        if stops and len(stops) > self.cfg.limits.max_stop_strings:
            raise bad_request(f"at most {self.cfg.limits.max_stop_strings} stop strings are allowed", "stop")
        bad = next((t for t in stop_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"stop token id {bad} is out of range [0, {self.vocab_size})", "stop_token_ids")
        asked = req.requested_max_tokens() if isinstance(req, ChatCompletionRequest) else req.max_tokens
        room = self.max_len - len(ids)
        if room < 1 or (asked is not None and asked > room):
            want = asked if asked is not None else 1
            raise bad_request(
                f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                f"{len(ids) + want} tokens ({len(ids)} in the prompt, {want} for the completion). "
                "Please reduce the length of the prompt or the completion.",
                "max_tokens" if room >= 1 else "prompt",
                "context_length_exceeded",
            )
        max_tokens = asked if asked is not None else min(self.cfg.limits.default_max_tokens, room)
        params = {
            "max_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": max(req.top_k, 0),
            "seed": req.seed,
            "stop_token_ids": stop_ids,
            "logprobs": 0,
            "ignore_eos": req.ignore_eos,
        }
        limits = self.cfg.limits
        return Generation(
            self.server,
            self.tok,
            ids,
            params,
            stops,
            req.cache_salt,
            deadline=time.monotonic() + limits.request_timeout_s,
            timeout_s=limits.request_timeout_s,
            retry_after_s=limits.retry_after_s,
            skip_ids=self.eos | set(stop_ids),
            logprobs=logprobs,
        )

    def _engine_request_id(self, request: Request) -> str:
        return f"{request_id_of(request.scope)}/{uuid.uuid4().hex[:12]}"

    async def _start(self, gen: Generation, request: Request) -> None:
        try:
            await gen.start(self._engine_request_id(request))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - replica died / unavailable: the client may retry
            log.warning("model server call failed: %r", e)
            raise _unavailable(self.cfg.limits.retry_after_s) from None

    async def _complete(self, gen: Generation, request: Request) -> Delta:
        try:
            return await gen.complete(self._engine_request_id(request))
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - replica died / unavailable: the client may retry
            log.warning("model server call failed: %r", e)
            raise _unavailable(self.cfg.limits.retry_after_s) from None

    # --- streaming ----------------------------------------------------------------------------

    async def _completion_chunks(self, gen: Generation, rid: str, include_usage: bool):
        async for d in gen.deltas():
            lp = (
                completion_logprobs(d.tokens, d.logprobs, d.top_logprobs, 0)
                if gen.top_n is not None
                else None
            )
            choice = {"index": 0, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
            yield sse(completion_body(rid, self.name, [choice], None, chunk=True))
        if include_usage:
            yield sse(
                completion_body(
                    rid,
                    self.name,
                    [],
                    usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
                    chunk=True,
                )
            )

    async def _chat_chunks(self, gen: Generation, rid: str, include_usage: bool, logprobs: bool):
        first = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield sse(chat_body(rid, self.name, [first], None, chunk=True))
        async for d in gen.deltas():
            lp = chat_logprobs(d.tokens, d.logprobs, d.top_logprobs) if logprobs else None
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
            yield sse(chat_body(rid, self.name, [choice], None, chunk=True))
        if include_usage:
            yield sse(
                chat_body(
                    rid,
                    self.name,
                    [],
                    usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
                    chunk=True,
                )
            )
