"""ASGI middleware in front of every route: request id, auth, body size, response counting, and a
last-resort catch so no input can turn into a 500 or an unhandled error in the replica."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from serve.auth import APIKeys
from serve.protocol import APIError

log = logging.getLogger("retort.serve")

_REQUEST_ID_OK = re.compile(r"^[\x21-\x7e]{1,128}$")
KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")


@dataclass
class Guard:
    keys: APIKeys
    max_body_bytes: int
    retry_after_s: int
    model: str
    responses: Any = None  # ray.util.metrics Counter (RESPONSES) or None


def request_id_of(scope: dict[str, Any]) -> str:
    return scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _route(scope: dict[str, Any]) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


async def send_error(send: Any, err: APIError, request_id: str | None = None) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Pure ASGI (streaming-safe). Reads its settings from ``app.state.guard`` (set by the ingress)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard: Guard | None = getattr(scope["app"].state, "guard", None) if "app" in scope else None
        # Behind Serve's proxy the header is always there (the proxy generates it if the client sent
        # none, and echoes it on the response); served directly, we generate and echo it here.
        given = _header(scope, b"x-request-id")
        echo = given is None
        rid = given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        route = _route(scope)
        status_seen: list[int] = []

        async def send_wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                if echo:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                    }
            await send(message)

        try:
            err = self._precheck(guard, scope, route)
            if err is not None:
                await send_error(send_wrapped, err)
            else:
                await self.app(scope, receive, send_wrapped)
        except Exception:  # noqa: BLE001 - last resort: never a 500, never a dead replica
            log.exception("unhandled error on %s %s", scope.get("method"), route)
            if not status_seen:
                await send_error(
                    send_wrapped,
                    APIError(
                        503,
                        "internal error; retry the request",
                        type="server_error",
                        code="internal_error",
                        headers=_retry(guard),
                    ),
                )
        finally:
            if guard is not None and guard.responses is not None and status_seen:
                guard.responses.inc(
                    1,
                    {
                        "model": guard.model,
                        "route": route if route in KNOWN_ROUTES else "other",
                        "status": str(status_seen[0]),
                    },
                )

    @staticmethod
    def _precheck(guard: Guard | None, scope: dict[str, Any], route: str) -> APIError | None:
        if guard is None:
            return APIError(
                503, "server is starting", type="server_error", code="not_ready", headers={"Retry-After": "1"}
            )
        if route != "/health" and not guard.keys.check(_header(scope, b"authorization")):
            return APIError(
                401,
                "missing or invalid API key (Authorization: Bearer <key>)",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return APIError(400, "invalid Content-Length header")
            if int(length) > guard.max_body_bytes:
                return too_large(guard.max_body_bytes)
        return None


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


def _retry(guard: Guard | None) -> dict[str, str]:
    return {"Retry-After": str(guard.retry_after_s if guard else 1)}


async def read_body(receive: Any, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it grows past ``limit`` (chunked uploads too)."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "client disconnected while sending the body")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
