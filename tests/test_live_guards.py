"""Live checks of behaviour that a relative test cannot see, on one real server that needs nothing outside
the repository (so these never skip): the committed golden images get their golden scores through HTTP,
every one of several API keys opens the service, two requests 50 ms apart share one batch under a 500 ms
batching window, and a declared Content-Length over the cap is refused from the headers alone.

The server: three API keys, ``DDM_MAX_BATCH_DELAY_MS=500``, batches of 8, a 64 KiB body cap, and the
committed default profile (read only).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import LiveServer
from tests.goldens import compute
from tests.helpers import SHIPPED_MODEL, metric_value

pytestmark = [pytest.mark.slow, pytest.mark.live]

KEYS = ("first-live-key", "second-live-key", "third-live-key")
WINDOW_S = 0.5
GAP_S = 0.05
CAP_BYTES = 64 * 1024
ANSWER_LIMIT_S = 10.0  # a refusal from the headers takes milliseconds; waiting for a body never ends


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(live_server_module: Callable[..., LiveServer]) -> LiveServer:
    return live_server_module(
        {
            "DDM_API_KEYS": ",".join(KEYS),
            "DDM_MAX_BATCH_DELAY_MS": str(int(WINDOW_S * 1000)),
            "DDM_MAX_BATCH_SIZE": "8",
            "DDM_MAX_UPLOAD_BYTES": str(CAP_BYTES),
            "DDM_PROFILES_DIR": str(SHIPPED_MODEL / "profiles"),
        }
    )


def golden_images() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in compute.image_files()]


def test_the_service_answers_the_golden_scores(server: LiveServer) -> None:
    """Upload, decode, engine and the committed default profile end to end: tests/goldens/engine.json."""
    goldens = json.loads(compute.ENGINE_FILE.read_text())
    files = [("files", (name, data, "image/png")) for name, data in golden_images()]
    r = httpx.post(f"{server.url}/v1/score", files=files, headers=auth(), timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"]["id"] == goldens["model_id"] and answer["profile"]["name"] == "default"
    expected = goldens["runtimes"][answer["model"]["runtime"]]["default_profile"]
    assert [res["id"] for res in answer["results"]] == [name for name, _ in golden_images()]
    for res in answer["results"]:
        golden = expected[res["id"]]
        assert res["score"] == pytest.approx(golden["score"], rel=1e-4, abs=1e-3), res["id"]
        assert res["threshold"] == pytest.approx(golden["threshold"], rel=1e-9), res["id"]
        assert res["is_anomaly"] is golden["is_anomaly"], res["id"]


def test_every_configured_key_opens_the_service(server: LiveServer) -> None:
    (_, data), *_ = golden_images()
    for key in KEYS:
        assert httpx.get(f"{server.url}/v1/models", headers=auth(key), timeout=30).status_code == 200, key
        r = httpx.post(
            f"{server.url}/v1/score",
            content=data,
            headers={**auth(key), "content-type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["results"][0]["score"] is not None, (key, r.text)
    for wrong in ("first-live", "fourth-live-key", ",".join(KEYS)):
        r = httpx.get(f"{server.url}/v1/models", headers=auth(wrong), timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", wrong


async def test_requests_50_ms_apart_share_one_batch_within_the_window(server: LiveServer) -> None:
    """The batching window is real: a partial batch waits up to DDM_MAX_BATCH_DELAY_MS for company."""
    (_, a), (_, b), *_ = golden_images()
    async with httpx.AsyncClient(base_url=server.url, headers=auth(), timeout=60) as http:

        async def score(data: bytes) -> httpx.Response:
            return await http.post("/v1/score", content=data, headers={"content-type": "image/png"})

        before = (await http.get("/metrics")).text
        started = time.monotonic()
        first = asyncio.ensure_future(score(a))
        await asyncio.sleep(GAP_S)
        second = asyncio.ensure_future(score(b))
        answers = await asyncio.gather(first, second)
        elapsed = time.monotonic() - started
        after = (await http.get("/metrics")).text
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    count = metric_value(after, "anomaly_batch_size_count") - metric_value(before, "anomaly_batch_size_count")
    size = metric_value(after, "anomaly_batch_size_sum") - metric_value(before, "anomaly_batch_size_sum")
    assert (count, size) == (1, 2), f"{size:g} images in {count:g} batches: the window did not hold"
    assert all(r.json()["timings"]["batches"] == 1 for r in answers)
    # the first waited in the queue for about the window (the batch never filled up)
    assert answers[0].json()["timings"]["queue_ms"] >= 0.8 * (WINDOW_S - GAP_S) * 1000
    assert elapsed >= WINDOW_S * 0.9


def test_a_declared_body_over_the_cap_is_refused_before_any_body_byte(server: LiveServer) -> None:
    """Headers only, Content-Length 1 TB, no body: 413 at once (the streaming cap alone would wait for bytes
    that never come)."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        "Content-Type: image/png\r\nContent-Length: 1000000000000\r\n\r\n"
    ).encode()
    before = httpx.get(f"{server.url}/metrics", timeout=30).text
    started = time.monotonic()
    answer = b""
    with socket.create_connection((host, int(port)), timeout=ANSWER_LIMIT_S) as sock:
        sock.sendall(head)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except TimeoutError:
            pytest.fail(
                f"no complete answer within {ANSWER_LIMIT_S:g} s to a declared 1 TB body that was never "
                f"sent (got {answer[:200]!r}): the server waited for the body instead of refusing"
            )
    waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "too_large" and str(CAP_BYTES) in body["error"]["message"]
    assert waited < ANSWER_LIMIT_S
    after = httpx.get(f"{server.url}/metrics", timeout=30).text
    refused = metric_value(after, "anomaly_refusals_total", reason="too_large") - metric_value(
        before, "anomaly_refusals_total", reason="too_large"
    )
    assert refused == 1
