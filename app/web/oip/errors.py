"""Error bodies in the protocol's shape on ``/v2`` paths."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.web.errors import error_responses
from app.web.oip.wire import OipError


def oip_errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for these statuses with the protocol's error body."""
    return {s: {**r, "model": OipError} for s, r in error_responses(*statuses).items()}


def is_oip_path(path: str) -> bool:
    return path == "/v2" or (path.startswith("/v2/") and not path.startswith("/v2/health/"))


class OipErrors:
    """On ``/v2`` paths, rewrite the service's error body ``{"error": {"code", "message", "request_id"}}``
    to the protocol's ``{"error": "<message>"}``; status, headers (Retry-After, x-request-id), metrics and
    logs stay those of the shared error handlers. Outermost middleware: it also sees the byte-cap 413."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_oip_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _oip_error_body(b"".join(chunks))
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


def _oip_error_body(body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        message = error.get("message") or error.get("code") or "error"
        return json.dumps({"error": str(message)}).encode()
    return body
