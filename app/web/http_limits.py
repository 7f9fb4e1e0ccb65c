"""Limits below the ASGI app, in the HTTP protocol: the request head's size (431), the bytes of chunk
framing and trailer fields around a body (431), and what happens to a connection answered before its
request has been read to the end (half-closed, the rest dropped unparsed).

uvicorn's httptools protocol buffers a request head of any size before the app sees it, keeps every
trailer field of a chunked body (the app never sees them; 3.5 GB of trailer lines went into one server's
memory), and after an early answer (413) keeps reading and parsing the rest of a body for nothing. The
protocol here:

- counts a head both as it streams in (a head that never ends) and field by field as it is parsed (a head
  that arrives in one read), and answers 431 once it passes ``MAX_HEADER_BYTES``;
- counts the bytes of a body that are not body data (chunk size lines, CRLFs, trailers) and answers 431
  once they pass ``MAX_TRAILER_BYTES`` plus a small allowance per chunk; trailer fields are dropped;
- closes lingering: when the answer goes out while the request is still arriving (an early 413 carries
  ``Connection: close``, see app/web/middleware.py), the connection is half-closed and what still arrives
  is dropped without parsing for ``DISCARD_S`` (at most the largest body cap), then closed. Closing at once
  would reset the connection and the client, still sending, might never read its answer.

The field count is checked by ``RequestContext`` once the head is parsed. Limits as common servers set
them (nginx: 4 x 8 KiB header buffers; Apache: 100 fields); docs/RELIABILITY.md#limits-per-layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.web.oip.errors import is_oip_path

log = logging.getLogger("app.web")

MAX_HEADER_BYTES = 32 * 1024  # request line + all header fields
MAX_TRAILER_BYTES = 32 * 1024  # trailer fields + chunk framing of one body, beyond the per-chunk allowance
CHUNK_FRAMING_ALLOWANCE = 64  # bytes per chunk: its size line (with extensions) and two CRLFs
MAX_HEADER_FIELDS = 100
DISCARD_S = 2.0  # how long the rest of an answered request is read and dropped before the close
DISCARD_BYTES = 64 * 1024 * 1024  # ... and how much of it at most (serve passes its largest body cap)


def bounded_http_protocol(
    on_refused: Callable[[], None], discard_bytes: int = DISCARD_BYTES
) -> type[HttpToolsProtocol]:
    """``BoundedHttpToolsProtocol`` for uvicorn's ``http=``; ``on_refused`` counts each 431 it sends;
    ``discard_bytes``: the most of a refused body dropped before the close (a body within the caps is
    dropped to its end, so its client reads the answer)."""

    class Counted(BoundedHttpToolsProtocol):
        max_discard = discard_bytes

        def on_refused(self) -> None:
            on_refused()

    return Counted


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (see ``bounded_http_protocol``)."""

    _phase = "idle"  # "head" | "body" (the request is still arriving) | "idle"
    _head_streamed = 0  # bytes received while a head was incomplete
    _head_parsed = 0  # bytes of the request line and fields parsed so far
    _framing = 0  # bytes of a body that were not body data (chunk lines, trailers)
    _chunks = 0
    _body_seen = 0
    _discarding = False
    _discarded = 0
    max_discard = DISCARD_BYTES

    def on_refused(self) -> None:
        """Called for each 431 sent (the service counts it as a refusal)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > self.max_discard:
                self.transport.close()
            return
        phase, body_before = self._phase, self._body_seen
        super().data_received(data)
        if self._discarding or self.transport.is_closing():
            return
        if self._phase == "head":  # the head is still incomplete: every byte of this read was head
            self._head_streamed += len(data)
            if self._head_streamed > MAX_HEADER_BYTES:
                self._refuse(f"request head over {MAX_HEADER_BYTES} bytes")
        elif phase == "body" and self._phase == "body":
            self._framing += len(data) - (self._body_seen - body_before)
            if self._framing > MAX_TRAILER_BYTES + CHUNK_FRAMING_ALLOWANCE * self._chunks:
                self._refuse(f"chunk framing and trailers over {MAX_TRAILER_BYTES} bytes")

    # parser callbacks: after a refusal the parser may still run over the rest of the read; ignored
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = "head"
        self._head_streamed = self._head_parsed = self._framing = self._chunks = self._body_seen = 0

    def on_url(self, url: bytes) -> None:
        self._head_parsed += len(url) + 16  # the method, the version and the line's separators
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._discarding or self._phase != "head":
            return  # a trailer field: counted as framing, never kept (the app does not read them)
        self._head_parsed += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._discarding:
            return
        if self._head_parsed > MAX_HEADER_BYTES:  # the whole head came in one read
            self._refuse(f"request head over {MAX_HEADER_BYTES} bytes")
            return
        self._phase = "body"
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        if self._discarding:
            return
        self._body_seen += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._discarding:
            return
        self._phase = "idle"
        super().on_message_complete()

    def input_pending(self) -> bool:
        return self._phase != "idle"

    def linger(self, transport: asyncio.Transport) -> None:
        """Half-close and drop what still arrives, unparsed, for DISCARD_S; then close."""
        self._discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()  # flow control may have paused it; the rest is dropped, not kept
        self.loop.call_later(DISCARD_S, transport.close)

    def _refuse(self, message: str) -> None:
        self.on_refused()
        cycle = self.cycle if self._phase == "body" else None
        if cycle is not None:  # the app waits for this body: it sees the client gone
            cycle.disconnected = True
            cycle.message_event.set()
        if cycle is None or not cycle.response_started:
            self.transport.write(_answer_431(self.url.decode("latin-1"), message))
        self._phase = "head"  # the rest of the input is never read: close lingering
        self.transport.close()


class _LingeringTransport:
    """The connection's transport as uvicorn sees it; ``close()`` while the request is still arriving
    closes lingering (the protocol's ``linger``) instead of resetting the connection."""

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closed or self._transport.is_closing()

    def close(self) -> None:
        if self._closed or self._transport.is_closing():
            self._transport.close()
            return
        self._closed = True
        if self._protocol.input_pending():
            self._protocol.linger(self._transport)
        else:
            self._transport.close()


def _answer_431(url: str, message: str) -> bytes:
    """431 in the API's error shape (the protocol's shape on /v2 paths), with a request id."""
    request_id = uuid.uuid4().hex[:16]
    path = url.partition("?")[0]
    log.info("refused %s -> 431 headers_too_large: %s [request_id=%s]", path[:200], message, request_id)
    error: object = {"code": "headers_too_large", "message": message, "request_id": request_id}
    body = json.dumps({"error": message if is_oip_path(path) else error}).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\n"
        b"x-content-type-options: nosniff\r\n"
        b"x-request-id: " + request_id.encode() + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )
