"""Limits below the routes and what open profile creation and deep images cost, against a real uvicorn
server (open profile creation, no keys, a 3 s request deadline): chunked trailers, request heads that
arrive in one read, early answers that close the connection, security headers, anonymous uploads, decode
memory of 16-bit and transparent images. docs/RELIABILITY.md#limits-per-layer lists what each layer
enforces."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.web.http_limits import MAX_HEADER_BYTES, MAX_TRAILER_BYTES
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, metric_value, png_bytes

pytestmark = [pytest.mark.live]

CAP = 1024 * 1024  # DDM_MAX_UPLOAD_BYTES here (the scoring cap, also for anonymous profile uploads)
PROFILE_CAP = 64 * CAP  # DDM_MAX_PROFILE_UPLOAD_BYTES: only for admin keys
TIMEOUT_S = 6.0
DRAIN_S = 3.0


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    profiles = tmp_path_factory.mktemp("protocol-profiles")
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "default.json")
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(profiles),
            "DDM_ALLOW_OPEN_PROFILE_CREATION": "true",
            "DDM_MAX_UPLOAD_BYTES": str(CAP),
            "DDM_MAX_PROFILE_UPLOAD_BYTES": str(PROFILE_CAP),
            "DDM_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
            "DDM_MAX_IMAGE_PIXELS": str(4096 * 4096),
            "DDM_DRAIN_TIMEOUT_S": str(DRAIN_S),
            "DDM_MAX_BATCH_SIZE": "1",  # a profile creation takes many batches: it outlasts the drain
        }
    )


def refusals(server: LiveServer, reason: str) -> float:
    return metric_value(
        httpx.get(f"{server.url}/metrics", timeout=30).text, "anomaly_refusals_total", reason=reason
    )


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_answer(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes (bounded by ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def head_and_body(answer: bytes) -> tuple[dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return headers, json.loads(body)


def reset_peak_rss(server: LiveServer) -> float:
    """Reset the server's VmHWM (Linux: clear_refs 5) and return its RSS now, MiB."""
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
    return _status_mib(server, "VmRSS")


def peak_rss(server: LiveServer) -> float:
    return _status_mib(server, "VmHWM")


def _status_mib(server: LiveServer, field: str) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


# --- the HTTP protocol ------------------------------------------------------------------------------------
def test_chunked_trailers_are_capped(server: LiveServer) -> None:
    """After the last chunk every trailer line was kept: 3.5 GB of them took one server from 607 MiB to
    4.7 GB. Now: 431 once chunk framing and trailers pass their cap, and the server's memory stays put."""
    before = refusals(server, "too_large")
    rss = reset_peak_rss(server)
    sock = connect(server)
    sock.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n"
    )
    line = b"X-T: " + b"a" * 1000 + b"\r\n"
    sent, answer = 0, b""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < 64 * 1024 * 1024 and not answer:  # 64 MiB of trailers at most, then the test fails
            sock.sendall(line * 64)
            sent += len(line) * 64
            sock.settimeout(0.001)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                answer = sock.recv(65536)
    answer += read_answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), (sent, answer[:300])
    headers, body = head_and_body(answer)
    assert (
        body["error"]["code"] == "headers_too_large"
        and body["error"]["request_id"] == headers["x-request-id"]
    )
    assert sent < 64 * MAX_TRAILER_BYTES  # answered long before the client gave up
    assert peak_rss(server) - rss < 50
    assert refusals(server, "too_large") == before + 1
    assert httpx.get(f"{server.url}/livez", timeout=30).status_code == 200


@pytest.mark.parametrize("size", [33 * 1024, 64 * 1024])
@pytest.mark.parametrize("path", ["/livez", "/v2/models/celeba32-ref"])
def test_a_head_over_the_cap_in_one_read_is_431(server: LiveServer, size: int, path: str) -> None:
    """A 33 or 64 KiB head in one write passed the cap (200); in two writes it got 431. Now 431 either way,
    with a request id, and on /v2 in the protocol's error shape."""
    before = refusals(server, "too_large")
    sock = connect(server)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode() + b"a" * size + b"\r\n\r\n")
    answer = read_answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    headers, body = head_and_body(answer)
    assert re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"])
    assert headers["x-content-type-options"] == "nosniff"
    if path.startswith("/v2"):
        assert body == {"error": f"request head over {MAX_HEADER_BYTES} bytes"}
    else:
        assert body["error"]["request_id"] == headers["x-request-id"]
    assert headers["x-request-id"] in server.log()  # the refusal is logged under its id
    assert refusals(server, "too_large") == before + 1


def test_413_on_a_chunked_upload_closes_the_connection(server: LiveServer) -> None:
    """After a 413 the connection stayed open and 200 MiB more were read and parsed for nothing. Now the
    413 says ``Connection: close`` and the server drops the rest unparsed, at most the largest body cap
    (here PROFILE_CAP), then closes."""
    sock = connect(server)
    sock.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
    sent, answer, after_answer, closed = 0, b"", 0, False
    try:
        while sent < 256 * 1024 * 1024:
            sock.sendall(chunk)
            sent += len(chunk)
            if answer:
                after_answer += len(chunk)
                continue
            sock.settimeout(0.001)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                answer = sock.recv(65536)
            sock.settimeout(30)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert closed, f"the server read {sent} bytes and never closed"
    assert after_answer < PROFILE_CAP + 16 * 1024 * 1024  # what was dropped + socket buffers


def test_declared_body_over_the_cap_closes_the_connection(server: LiveServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/score", content=b"x" * (CAP + 1), headers={"content-type": "image/png"}, timeout=30
    )
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_ui_has_the_strict_policy_and_every_answer_nosniff(server: LiveServer) -> None:
    ui = httpx.get(f"{server.url}/ui", timeout=30)
    policy = ui.headers["content-security-policy"]
    assert (
        "'unsafe-inline'" not in policy and "script-src 'self';" in policy and "style-src 'self';" in policy
    )
    page = ui.text
    assert not re.search(r"<script>|<script(?![^>]*\bsrc=)|<style|\sstyle=|\son[a-z]+=", page)
    for path in ("/ui", "/livez", "/metrics", "/openapi.json", "/v2", "/no/such/path", "/static/ui/ui.js"):
        assert httpx.get(f"{server.url}{path}", timeout=30).headers["x-content-type-options"] == "nosniff", (
            path
        )


# --- open profile creation --------------------------------------------------------------------------------
def test_anonymous_profile_uploads_get_the_scoring_caps(server: LiveServer) -> None:
    """Open creation gave anonymous clients the admin body cap and no upload deadline (20 slow uploads
    declaring 200 MB stayed open > 50 s). Now: the scoring cap (413 from the header) and the deadline
    (504 for a trickle)."""
    declared = httpx.post(
        f"{server.url}/v1/profiles",
        content=b"x" * (CAP + 1),
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert declared.status_code == 413 and str(CAP) in declared.json()["error"]["message"]
    sock = connect(server)
    sock.sendall(
        b"POST /v1/profiles HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 500000\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="files"; filename="0.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    started = time.monotonic()
    answer = b""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while time.monotonic() - started < 4 * TIMEOUT_S and not answer:
            sock.sendall(b"x" * 64)
            sock.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 504 "), answer[:200]
    assert time.monotonic() - started < TIMEOUT_S + 2


def test_one_profile_creation_at_a_time(server: LiveServer) -> None:
    """Each creation holds its upload until its profile is fitted: one more than DDM_PROFILE_CREATIONS
    (1 here) is refused before its body is read, 503 queue_full with Retry-After."""
    rng = np.random.default_rng(3)
    files = [
        ("files", (f"{i}.png", png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "image/png"))
        for i in range(10)
    ]

    def batches() -> float:
        return metric_value(httpx.get(f"{server.url}/metrics", timeout=30).text, "anomaly_batch_size_count")

    started = batches()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            httpx.post, f"{server.url}/v1/profiles", data={"name": "first"}, files=files, timeout=120
        )
        end = time.monotonic() + 60
        while batches() == started:  # the first creation computes (batches of 1 here)
            assert time.monotonic() < end and not first.done(), "the first creation never computed"
            time.sleep(0.05)
        second = httpx.post(f"{server.url}/v1/profiles", data={"name": "second"}, files=files, timeout=60)
        assert second.status_code == 503 and second.headers["retry-after"] == "5", second.text
        assert second.json()["error"]["code"] == "queue_full"
        assert first.result(timeout=120).status_code == 201


# --- decode memory ----------------------------------------------------------------------------------------
def _deep_png() -> bytes:
    ramp = (np.arange(4096 * 4096, dtype=np.uint32) % 65536).astype(np.uint16).reshape(4096, 4096)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")  # mode I;16, ~150 KB
    return out.getvalue()


def _rgba_png() -> bytes:
    pixels = np.zeros((4096, 4096, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 128
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("make", [_deep_png, _rgba_png], ids=["16-bit", "rgba"])
def test_deep_and_transparent_images_decode_within_their_budget(
    server: LiveServer, make: Callable[[], bytes]
) -> None:
    """A 4096² 16-bit PNG (150 KB) raised the server's RSS by 476 MiB: its conversion made float64 copies
    of the whole image. Converted a band at a time it costs about what an RGB image of its size costs."""
    data = make()
    assert len(data) < CAP
    rss = reset_peak_rss(server)
    r = httpx.post(f"{server.url}/v1/score", content=data, headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["score"] is not None
    grew = peak_rss(server) - rss
    print(f"{make.__name__}: peak RSS +{grew:.0f} MiB")
    assert grew < 200  # 4096² RGB is 64 MiB in Pillow; was +476 (16-bit) and +384 (RGBA)


def test_a_small_png_still_scores(server: LiveServer) -> None:
    r = httpx.post(
        f"{server.url}/v1/score", content=png_bytes(), headers={"content-type": "image/png"}, timeout=60
    )
    assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"


# --- deployment choices -----------------------------------------------------------------------------------
def test_x_forwarded_for_is_not_trusted_by_default(server: LiveServer) -> None:
    """uvicorn trusts X-Forwarded-For from loopback unless told otherwise; the service trusts no proxy
    unless DDM_FORWARDED_ALLOW_IPS names it: the access log shows the peer's own address."""
    r = httpx.get(f"{server.url}/livez?xff-probe=1", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=30)
    assert r.status_code == 200
    line = next(line for line in server.log().splitlines() if "xff-probe" in line)
    assert "203.0.113.9" not in line and "127.0.0.1:" in line


def test_a_model_that_fails_to_load_exits_1(live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    """A server whose model folder is missing used to stay up unready forever (liveness 200, so nothing
    restarted it). Now it exits 1 with the reason logged, as Triton does (DDM_EXIT_ON_LOAD_FAILURE=false
    keeps the old behaviour: tests/test_reliability_live.py)."""
    server = live_server({"DDM_MODEL_DIR": str(tmp_path / "no-such-model")}, wait_ready=False)
    try:
        code = server.process.wait(120)
    except Exception:
        server.stop(signal.SIGKILL)
        raise
    assert code == 1, server.log()
    assert "model failed to load" in server.log() and "exiting: the model failed to load" in server.log()


def test_sigterm_during_a_profile_creation_that_outlasts_the_drain(server: LiveServer) -> None:
    """Last in this module: it stops the server. A profile creation admitted before SIGTERM that cannot
    finish within the drain gets its answer in JSON (504 at the capped deadline, or 503 if cancelled),
    writes nothing, logs no traceback, and the process exits 0."""
    profiles = Path(server.env["DDM_PROFILES_DIR"])
    rng = np.random.default_rng(5)
    files = [
        ("files", (f"{i}.png", png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "image/png"))
        for i in range(200)
    ]

    def batches() -> float:
        return metric_value(httpx.get(f"{server.url}/metrics", timeout=30).text, "anomaly_batch_size_count")

    started = batches()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post, f"{server.url}/v1/profiles", data={"name": "drained"}, files=files, timeout=120
        )
        end = time.monotonic() + 60
        while batches() < started + 3:
            assert time.monotonic() < end and not pending.done(), "the creation never started computing"
            time.sleep(0.1)
        server.send(signal.SIGTERM)
        answer = pending.result(timeout=120)
    assert answer.status_code in (503, 504), answer.text
    assert answer.json()["error"]["code"] in ("timeout", "not_ready")
    assert server.stop() == 0
    assert "Traceback" not in server.log() and "CancelledError" not in server.log()
    assert not (profiles / "drained.json").exists() and not list(profiles.glob(".drained*"))
