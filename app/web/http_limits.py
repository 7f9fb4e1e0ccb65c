"""Request-head limits below the ASGI app: the header block's size and its number of fields (431).

uvicorn's httptools protocol buffers a request head of any size before the app sees it, so one 64 MiB
header (or 10,000 small ones) costs memory and parse time and is then answered 200. The protocol here
counts the bytes of a head while it arrives and answers 431 as soon as it passes ``MAX_HEADER_BYTES``,
without waiting for the rest; the field count is checked by ``RequestContext`` once the head is parsed.
Limits as common servers set them (nginx: 4 x 8 KiB header buffers; Apache: 100 fields); see
docs/API.md#errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 32 * 1024  # request line + all header fields
MAX_HEADER_FIELDS = 100
DISCARD_S = 2.0  # how long a refused connection's remaining input is read and dropped


def bounded_http_protocol(on_refused: Callable[[], None]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the head-size cap; ``on_refused`` counts each 431 it sends."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = False
        _head_bytes = 0
        _discarding = False

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            super().data_received(data)
            # counted after parsing: a chunk that ends the head may carry body bytes, which do not count
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEADER_BYTES:
                    self._refuse()

        def _refuse(self) -> None:
            on_refused()
            body = json.dumps(
                {
                    "error": {
                        "code": "headers_too_large",
                        "message": f"request head over {MAX_HEADER_BYTES} bytes",
                        "request_id": "",
                    }
                }
            ).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )
            # Half-close and keep reading (discarding) for a moment: closing with the rest of the head unread
            # would reset the connection and the client would never see the 431.
            self._discarding = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(DISCARD_S, self.transport.close)

    return BoundedHttpToolsProtocol
