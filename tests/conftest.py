"""Shared fixtures. ``live_server`` / ``live_server_module``: start ``python -m app serve`` for real.

    def test_something(live_server):
        server = live_server({"DDM_MAX_BATCH_SIZE": "4"})   # waits for /readyz
        httpx.get(f"{server.url}/livez")
        assert server.stop() == 0                           # optional: SIGTERM + exit code

Each server runs on 127.0.0.1 on a free port with the shipped model (the repository root is the working
directory), calibration profiles in a temporary folder unless ``DDM_PROFILES_DIR`` is given, and its log
in a file (printed when start-up fails). On teardown every server still running gets SIGTERM and must exit
with status 0 within its drain time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240.0  # imports + model load on a busy 2-core CPU
STOP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` (if still running) and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            log = self.log()
            raise AssertionError(
                f"server did not exit within {timeout} s after signal {sig}:\n{log}"
            ) from None

    def __str__(self) -> str:
        return self.url


class LiveServers:
    """Starts servers on demand; on close, SIGTERMs the ones still running and checks they exit 0."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[LiveServer] = []

    def start(self, env: dict[str, str] | None = None, *, wait_ready: bool = True) -> LiveServer:
        port = free_port()
        index = len(self.servers)
        overrides = {
            "DDM_HOST": "127.0.0.1",
            "DDM_PORT": str(port),
            "DDM_PROFILES_DIR": str(self.workdir / f"profiles-{index}"),
            # One intra-op thread: on a shared, oversubscribed CPU more threads make torch far slower.
            "DDM_TORCH_THREADS": "1",
            "DDM_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        log_path = self.workdir / f"server-{index}.log"
        with log_path.open("wb") as log:
            # with DDM_TEST_FAULTS the test entry point serves the real engine wrapped in tests/faults.py
            entry = ["tests.fault_server"] if "DDM_TEST_FAULTS" in overrides else ["app", "serve"]
            process = subprocess.Popen(
                [sys.executable, "-m", *entry],
                cwd=ROOT,
                env={**os.environ, **overrides},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = LiveServer(f"http://127.0.0.1:{port}", process, log_path, overrides)
        self.servers.append(server)
        if wait_ready:
            self.wait_ready(server)
        return server

    def wait_ready(self, server: LiveServer, timeout: float = READY_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if server.process.poll() is not None:
                pytest.fail(
                    f"server exited with {server.process.returncode} during start-up:\n{server.log()}"
                )
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        server.stop(signal.SIGKILL)
        pytest.fail(f"server not ready after {timeout:.0f} s:\n{server.log()}")

    def close(self) -> None:
        failures = []
        for server in self.servers:
            if server.process.poll() is None:
                code = server.stop()
                if code != 0:
                    failures.append(f"{server.url} exited with {code}:\n{server.log()[-4000:]}")
        assert not failures, "\n".join(failures)


@pytest.fixture
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``live_server(env_overrides) -> LiveServer`` (``.url`` is the base URL); one test's life."""
    servers = LiveServers(tmp_path_factory.mktemp("live"))
    yield servers.start
    servers.close()


@pytest.fixture(scope="module")
def live_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LiveServer]]:
    """The same factory, for servers shared by the tests of one module."""
    servers = LiveServers(tmp_path_factory.mktemp("live"))
    yield servers.start
    servers.close()
