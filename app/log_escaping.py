"""Log lines a client cannot forge: control characters in what a record carries are escaped.

Paths, JSON keys, ids and file names come from clients and end up in log messages (refusals name the
field or path they refused). A newline there would start a forged log line; ESC or NUL bytes would drive
the operator's terminal. The filter sits on the handlers, so it covers every logger that writes through
them, uvicorn's access log included, and leaves tracebacks (``exc_info``) alone.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``"a\\nb\\x1b"`` for ``"a<LF>b<ESC>"``: visible, one line, reversible by reading."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, bytes):
        return escape(value.decode("latin-1"))
    return value


class EscapeControlCharacters(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = escape(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _escaped(v) for k, v in record.args.items()}
        return True


def install(*logger_names: str) -> None:
    """Add the filter to every handler of the root logger and of ``logger_names`` (once each)."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in logger_names)]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
                handler.addFilter(EscapeControlCharacters())
