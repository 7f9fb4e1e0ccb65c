"""``ddm-anomaly serve``: the HTTP service under uvicorn.

SIGTERM/SIGINT: readiness turns 503 and new work is refused at once; after ``shutdown_delay_s`` uvicorn
stops listening, waits for the requests already accepted (up to ``drain_timeout_s``), and the lifespan
shutdown drains the batcher. The process then exits 0.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import math
import re
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from app.commands.setting_flags import add_setting_flags, overrides

if TYPE_CHECKING:  # the CLI imports commands lazily: the web stack loads only when serving
    from fastapi import FastAPI

    from app.settings import Settings

log = logging.getLogger(__name__)

# The settings `serve` also takes as flags (generated from Settings: choices, types and help); every other
# setting comes from its DDM_* variable.
SERVE_FLAGS = (
    "host", "port", "model_dir", "profiles_dir", "device", "dtype", "runtime", "method", "steps",
    "aggregation", "trajectory", "max_batch_size", "max_batch_delay_ms", "torch_threads", "model_instances",
    "log_level", "log_format",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP scoring service",
        description="Serve POST /v1/score, /v1/models, /v1/profiles, health and /metrics with uvicorn. "
        "Every setting comes from DDM_* environment variables (see README); flags override them.",
    )
    add_setting_flags(p, SERVE_FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.web.app import create_app

    settings = settings_from_args(args)
    if settings is None:
        return 2
    return serve_app(create_app(settings), settings)


def settings_from_args(args: argparse.Namespace) -> Settings | None:
    """The environment's settings with this command's flags on top; None (logged) when they are invalid."""
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings(**overrides(args, SERVE_FLAGS))
    except ValidationError as exc:
        log.error("invalid settings: %s", exc)
        return None


def serve_app(app: FastAPI, settings: Settings) -> int:
    """Run ``app`` under uvicorn until a signal has drained it; 0 when it started and stopped cleanly."""
    from app import log_format
    from app.bootstrap import apply_thread_policy
    from app.web.http_limits import bounded_http_protocol

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
        timeout_keep_alive=max(1, math.ceil(settings.keep_alive_timeout_s)),
        lifespan="on",
        # X-Forwarded-* only from the proxies named (uvicorn trusts loopback by default)
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        # bounds the request head (431) before the app buffers it; counted like every refusal
        http=bounded_http_protocol(
            lambda: app.state.metrics.refuse("too_large"),
            discard_bytes=max(settings.max_upload_bytes, settings.max_profile_upload_bytes),
        ),
    )
    logging.getLogger("uvicorn.access").addFilter(RedactQuerySecrets())  # after uvicorn set up logging
    log_format.configure(settings.log_format, "uvicorn", "uvicorn.error", "uvicorn.access")
    apply_thread_policy(settings)  # once, before the lifespan loads the model (logs in the chosen format)
    service = app.state.service
    server = DrainingServer(
        config,
        on_signal=service.begin_drain,
        delay_s=settings.shutdown_delay_s,
        give_up=lambda: settings.exit_on_load_failure and service.failure is not None,
    )
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place that is a
    # no-op and the process exits 0 instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    server.run()
    if server.gave_up:
        log.error("exiting: the model failed to load (DDM_EXIT_ON_LOAD_FAILURE)")
        return 1
    return 0 if server.started else 1


_SECRET_PARAM = re.compile(r"([?&](?:[\w.-]*(?:key|token|secret|passw(?:or)?d|auth)[\w.-]*)=)[^&#\s]*", re.I)


class RedactQuerySecrets(logging.Filter):
    """uvicorn's access log prints each request's query string. Keys are only taken from the Authorization
    header, but a client that puts one in the URL (``?api_key=...``, refused with 401) must not leave it in
    the log: values of key/token/secret/password/auth parameters are replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], _SECRET_PARAM.sub(r"\1[redacted]", args[2]), *args[3:])
        return True


def _ignore(sig: int, frame: FrameType | None) -> None:
    pass


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with two changes: the first signal only starts draining (``on_signal``: readiness
    503, new work refused) and ``delay_s`` later uvicorn's usual graceful shutdown begins (a second signal
    goes straight to uvicorn: a second SIGINT forces exit); and it stops by itself once ``give_up()`` is
    true (the model failed to load)."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_signal: Callable[[], None],
        delay_s: float,
        give_up: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(config)
        self.on_signal = on_signal
        self.delay_s = delay_s
        self.give_up = give_up
        self.gave_up = False
        self.exit_requested_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.exit_requested_at is not None:
            super().handle_exit(sig, frame)
            return
        self.exit_requested_at = time.monotonic()
        # a signal interrupts whatever runs, maybe a request's task: its records must not carry that
        # request's id (app/log_format.py), so the drain starts in an empty context
        contextvars.Context().run(self._begin_drain, sig)
        if self.delay_s <= 0:
            super().handle_exit(sig, frame)

    def _begin_drain(self, sig: int) -> None:
        log.info("signal %d: draining; shutdown in %.1f s, then accepted work finishes", sig, self.delay_s)
        self.on_signal()

    async def on_tick(self, counter: int) -> bool:
        requested = self.exit_requested_at
        if requested is not None and time.monotonic() - requested >= self.delay_s:
            self.should_exit = True
        if not self.gave_up and self.give_up():
            self.gave_up = self.should_exit = True
        return await super().on_tick(counter)
