"""One pure-ASGI middleware around every HTTP request: request id, body byte cap, metrics, last-resort 500.

The byte cap is enforced while the body streams in: a declared ``Content-Length`` over the cap is refused
before anything is read, and a chunked body is cut off (PayloadTooLarge, raised from ``receive``) as soon
as it passes the cap, so no route ever holds more than the cap in memory. An answer sent before the body
has been read to its end carries ``Connection: close``: the protocol (app/web/http_limits.py) then stops
parsing that connection instead of reading the rest of the body for nothing. Every answer carries
``X-Request-ID`` and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import log_format
from app.errors import PayloadTooLarge
from app.service.metrics import STATIC_ENDPOINT, Metrics
from app.web.errors import error_response
from app.web.http_limits import MAX_HEADER_FIELDS

log = logging.getLogger("app.web")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, body_limit: Callable[[str], int]) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope, receive, send)
        scope.setdefault("state", {})["request_id"] = exchange.request_id
        scope["state"]["received_at"] = time.monotonic()
        limit = self.body_limit(scope.get("path", ""))
        logged_as = log_format.request_id.set(exchange.request_id)  # every log line on its behalf
        t0 = time.perf_counter()
        self.metrics.inflight_requests.inc()
        try:
            await self._serve(scope, receive, exchange, limit)
        except asyncio.CancelledError:
            # the server is stopping past its drain time and cancels what is left: answer in the API's
            # error shape rather than leave it to the server's plain-text 500. Nothing is left to do after
            # that answer: the task ends here (re-raising would only log a traceback for an expected stop)
            log.info("cancelled at shutdown: %s [request_id=%s]", scope.get("path"), exchange.request_id)
            if not exchange.started:
                self.metrics.refuse("not_ready")
                await exchange.error(503, "not_ready", "the service stopped before this request was answered")
        except Exception:
            log.exception("unhandled error on %s [request_id=%s]", scope.get("path"), exchange.request_id)
            self.metrics.refuse("engine_error")
            if not exchange.started:
                await exchange.error(500, "internal", "internal error")
        finally:
            self.metrics.inflight_requests.dec()
            self._count(scope, exchange.status, time.perf_counter() - t0)
            log_format.request_id.reset(logged_as)

    async def _serve(self, scope: Scope, receive: Receive, exchange: _Exchange, limit: int) -> None:
        """Refuse too many header fields or a declared body over the cap before reading anything; else run
        the app with the body cap enforced as the body streams in."""
        if len(scope.get("headers", ())) > MAX_HEADER_FIELDS:
            self.metrics.refuse("too_large")
            await exchange.error(431, "headers_too_large", f"more than {MAX_HEADER_FIELDS} header fields")
            return
        declared = _content_length(exchange.headers)
        if declared is not None and declared > limit:
            self.metrics.refuse("too_large")
            log.info("refused %s -> 413: body of %d bytes over %d [request_id=%s]", scope.get("path"),
                     declared, limit, exchange.request_id)  # fmt: skip
            message = f"request body of {declared} bytes is over the cap of {limit} bytes"
            await exchange.error(413, "too_large", message)
            return
        await self.app(scope, _capped_receive(exchange.receive, limit), exchange.send)

    def _count(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or (
            STATIC_ENDPOINT if isinstance(scope.get("endpoint"), StaticFiles) else "unmatched"
        )
        self.metrics.requests.labels(endpoint=endpoint, code=str(status)).inc()
        self.metrics.request_latency.labels(endpoint=endpoint).observe(seconds)


class _Exchange:
    """One request's id and what went back for it: every response carries the id, and the status sent
    (500 until one is) is what the request is counted under."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        incoming = self.headers.get(REQUEST_ID_HEADER, "")
        self.request_id = incoming if _CLIENT_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex[:16]
        self.status = 500
        self.started = False
        has_body = self.headers.get("content-length", "0") != "0" or "transfer-encoding" in self.headers
        self.body_read = not has_body

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_read = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            headers = [*message.get("headers", []), (b"x-request-id", self.request_id.encode())]
            headers.append((b"x-content-type-options", b"nosniff"))
            if not self.body_read:  # answered early (413, 401, ...): the rest of the body is never read
                headers.append((b"connection", b"close"))
            message["headers"] = headers
        await self._send(message)

    async def error(self, status: int, code: str, message: str) -> None:
        """Answer in the API's error shape (app/web/errors.py)."""
        await error_response(status, code, message, self.request_id)(self.scope, self._receive, self.send)


def _capped_receive(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises PayloadTooLarge as soon as the body read so far passes ``limit`` bytes."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"request body over the cap of {limit} bytes")
        return message

    return limited_receive


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # h11/httptools reject a malformed header before we get here
