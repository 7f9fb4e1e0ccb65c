"""The decode queue and structured logs against a real server: expensive images within every cap share
one decode thread fairly and fill a bounded queue (503 + Retry-After), and JSON log lines that no client
value can split. docs/RELIABILITY.md lists the cases; the in-process tests pin the queue's order."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from app.engine.preprocessing import decode_image, prepare
from app.errors import Overloaded
from app.service.decode_queue import DecodeQueue
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, png_bytes
from tests.reliability_helpers import moved, samples

SIDE = 4096  # the default per-image pixel cap: 4 such images are exactly the per-request pixel budget


def costly_jpeg(side: int = SIDE, scans: int = 64) -> bytes:
    """A smooth progressive JPEG of ``side``² padded to ``scans`` scans (the most that are decoded): about
    150 KB on the wire and about a second of one core to decode, at every cap but none exceeded."""
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", progressive=True, quality=75)
    data = out.getvalue()
    end = data.rfind(b"\xff\xd9")
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    pieces = [data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    return data[:end] + min(pieces, key=len) * (scans - len(starts)) + data[end:]


@pytest.fixture(scope="module")
def server(live_server_module: Callable[..., LiveServer]) -> LiveServer:
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(SHIPPED_MODEL / "profiles"),
            "DDM_DECODE_THREADS": "1",
            "DDM_MAX_DECODE_QUEUE_IMAGES": "9",  # two hostile requests of 4 and one ordinary image
            "DDM_LOG_FORMAT": "json",
        }
    )


def test_ordinary_request_keeps_its_deadline_beside_costly_decodes_and_a_full_queue_is_503(
    server: LiveServer,
) -> None:
    """Three requests of four costly JPEGs at once: two are admitted (eight decodes on the one decode
    thread), the third does not fit the bound of 9: 503 queue_full with Retry-After. An ordinary image sent
    next, with a deadline of 3.5 costly decodes, is decoded after the running one (fair order; first come
    it would wait for about seven) and answered 200."""
    costly = costly_jpeg()
    files = [("files", (f"{i}.jpg", costly, "image/jpeg")) for i in range(4)]
    t0 = time.perf_counter()
    prepare(decode_image(costly), 32)  # what the server does per image, timed on this host now
    one_decode = time.perf_counter() - t0
    deadline = round(max(2.0, 3.5 * one_decode), 1)
    before = samples(server.url)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, float]:
        async with httpx.AsyncClient(timeout=180) as client:
            url = f"{server.url}/v1/score"
            costly_requests = [asyncio.ensure_future(client.post(url, files=files)) for _ in range(3)]
            await asyncio.sleep(min(1.0, one_decode))  # the bodies (600 KB each) are in, about one decoded
            t0 = time.monotonic()
            ordinary = await client.post(
                url, params={"timeout_s": deadline}, content=png_bytes(size=(64, 64)),
                headers={"content-type": "image/png"},
            )  # fmt: skip
            waited = time.monotonic() - t0
            return list(await asyncio.gather(*costly_requests)), ordinary, waited

    answers, ordinary, waited = asyncio.run(scenario())
    assert ordinary.status_code == 200, (deadline, ordinary.text)
    assert waited < deadline + 0.5, (deadline, waited)
    assert sorted(r.status_code for r in answers) == [200, 200, 503], [r.text[:200] for r in answers]
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.json()["error"]["code"] == "queue_full"
    assert "decode queue is full" in refused.json()["error"]["message"]
    assert refused.json()["error"]["request_id"] == refused.headers["x-request-id"]
    assert int(refused.headers["retry-after"]) >= 1
    after = samples(server.url)
    assert moved(before, after, "anomaly_refusals_total") == {'{reason="queue_full"}': 1.0}
    # the queue is empty again: the same costly request is admitted now
    assert httpx.post(f"{server.url}/v1/score", files=files, timeout=120).status_code == 200


def test_json_log_lines_cannot_be_split_by_client_values(server: LiveServer) -> None:
    """With DDM_LOG_FORMAT=json every line of the server's output is one JSON object; a newline, ESC or
    U+2028 in a JSON key or a path stays inside its record, which carries the request id."""
    forged = '{"level": "ERROR", "message": "FORGED admin logged in"}'
    r = httpx.post(
        f"{server.url}/v1/score",
        json={"images": [{"data": "aGk="}], f"x\n{forged}\u2028": 1},
        headers={"x-request-id": "forge-json-1"},
        timeout=30,
    )
    assert r.status_code == 422
    path = "/no/such%0A" + forged.replace(" ", "%20").replace('"', "%22") + "%1b%5b31m%00"
    assert httpx.get(f"{server.url}{path}", headers={"x-request-id": "forge-json-2"}).status_code == 404
    records = []
    for line in server.log().splitlines():
        record = json.loads(line)  # fails on any line that is not a whole JSON object
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    assert not any("FORGED" in r["message"] and r["message"].startswith("{") for r in records)
    refusals = [r for r in records if r.get("request_id") == "forge-json-1" and r["logger"] == "app.web"]
    assert len(refusals) == 1 and "FORGED" in refusals[0]["message"], refusals
    access = [r for r in records if r.get("request_id") == "forge-json-2" and r["logger"] == "uvicorn.access"]
    assert len(access) == 1 and access[0]["status"] == 404, access
    assert all("\n" not in r["message"] and "\x1b" not in r["message"] for r in records)


def test_decode_queue_serves_the_least_served_request_first() -> None:
    """In process, one thread: while request A's first job runs, A queues 3 more, then B queues 1; B's job
    runs second, not fifth. A request that would pass the bound is refused with a Retry-After."""
    queue = DecodeQueue(threads=1, max_images=5)
    gate = threading.Event()
    order: list[str] = []

    def job(name: str) -> Callable[[], str]:
        def run() -> str:
            if name == "a0":
                gate.wait(10)
            order.append(name)
            return name

        return run

    try:
        a = queue.submit([job(f"a{i}") for i in range(4)])
        b = queue.submit([job("b0")])
        with pytest.raises(Overloaded) as refused:
            queue.submit([job("c0")])  # 5 admitted: a sixth does not fit
        assert refused.value.retry_after_s >= 1
        gate.set()
        assert [f.result(10) for f in [*a, *b]] == ["a0", "a1", "a2", "a3", "b0"]
        assert order == ["a0", "b0", "a1", "a2", "a3"]
        end = time.monotonic() + 10
        while queue.admitted and time.monotonic() < end:  # released just after each result is set
            time.sleep(0.01)
        assert queue.admitted == 0
        big = queue.submit([job(f"d{i}") for i in range(8)])  # over the bound, into an empty queue
        assert [f.result(10) for f in big] == [f"d{i}" for i in range(8)]
    finally:
        queue.close()


def test_cancelled_jobs_never_run_and_free_their_place() -> None:
    queue = DecodeQueue(threads=1, max_images=2)
    gate = threading.Event()
    ran: list[int] = []
    try:
        first = queue.submit([lambda: gate.wait(10)])
        waiting = queue.submit([lambda: ran.append(1)])
        assert waiting[0].cancel()  # its request gave up (deadline, client gone)
        assert queue.admitted == 1
        gate.set()
        first[0].result(10)
        queue.submit([lambda: ran.append(2)])[0].result(10)
        assert ran == [2]
    finally:
        queue.close()
