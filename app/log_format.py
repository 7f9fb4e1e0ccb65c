"""The service's log lines: text (``time level logger: message``) or JSON lines (``DDM_LOG_FORMAT=json``).

JSON lines are what log pipelines (Loki, Elasticsearch, Cloud Logging) parse without a grok pattern: one
object per line with ``time``, ``level``, ``logger``, ``message``, the ``request_id`` of the request being
served (when there is one) and, for uvicorn's access log, ``client``, ``method``, ``path``, ``status``.
``json.dumps`` with ASCII output encodes every control character and line separator, so no value a
client sends can end a record early; the escaping filter (``app.log_escaping``) runs in both formats, so
a message reads the same in either.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from app import log_escaping

# Set by the request middleware for the request being served; asyncio tasks and ``asyncio.to_thread``
# inherit it, so everything logged on a request's behalf carries its id.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current:
            entry["request_id"] = current
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            entry.update(zip(("client", "method", "path", "http_version", "status"), args, strict=True))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(log_format: Literal["text", "json"], *logger_names: str) -> None:
    """Put the escaping filter on every handler of the root logger and of ``logger_names`` and, for
    ``json``, the JSON-lines formatter (text keeps each handler's own format). Call it after the server
    set up its own loggers (uvicorn does so when its config is built)."""
    if log_format == "json":
        logging.captureWarnings(True)  # Python warnings become records too, not bare stderr lines
        formatter = JsonLines()
        for name in (None, *logger_names):
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(formatter)
    log_escaping.install(*logger_names)
