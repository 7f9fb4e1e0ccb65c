"""Against real uvicorn processes with the shipped model: concurrency and batching, metrics, auth, cancelled
clients, overload, deadlines, the streaming byte cap, model instances and SIGTERM draining.

Four servers for the module: ``main`` (default batching and runtime, API keys), ``two_instances`` (two
model instances, batch 4), ``torch_runtime`` (the UNet in torch rather than the default ONNX Runtime, two
instances) and ``small`` (batch 2, queue 4, 64 KiB bodies, a shutdown delay; the last test stops it with
SIGTERM). They share one profiles folder, and the "faces" profile is created through the API
from 12 CelebA images.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.client import AnomalyClient, AsyncAnomalyClient, ServiceError
from tests.conftest import LiveServer
from tests.helpers import metric_value, require_data
from tests.reliability_helpers import send_chunks_until_answered

pytestmark = [pytest.mark.slow, pytest.mark.live]

KEY = "live-test-key"
PROFILE = "faces"
POLL_LIMIT_S = 60.0  # bound on waiting for a state the server reaches by itself


def faces(start: int, count: int) -> list[bytes]:
    return [p.read_bytes() for p in require_data("celeba", count, start)]


def metric(text: str, name: str, **labels: str) -> float:
    """A sample of a /metrics text; a missing series fails (tests/helpers.py: metric_value)."""
    return metric_value(text, name, **labels)


async def until_batch_running(client: AsyncAnomalyClient) -> None:
    """Wait (bounded) until the server is computing a batch."""
    end = time.monotonic() + POLL_LIMIT_S
    while metric(await client.metrics(), "anomaly_inflight_batches") < 1:
        assert time.monotonic() < end, "no batch started"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def profiles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def main(live_server_module: Callable[..., LiveServer], profiles_dir: Path) -> LiveServer:
    faces(0, 1)  # skip before starting anything when the data is missing
    server = live_server_module(
        {"DDM_API_KEYS": KEY, "DDM_ADMIN_API_KEYS": KEY, "DDM_PROFILES_DIR": str(profiles_dir)}
    )
    with AnomalyClient(server.url, api_key=KEY) as client:
        summary = client.create_profile(PROFILE, faces(100, 12), source="CelebA 100-111")
    assert summary.n_reference == 12 and summary.model_id.startswith("celeba32-ref@")
    return server


@pytest.fixture(scope="module")
def small(main: LiveServer, live_server_module: Callable[..., LiveServer], profiles_dir: Path) -> LiveServer:
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(profiles_dir),
            "DDM_MAX_BATCH_SIZE": "2",
            "DDM_MAX_QUEUE_IMAGES": "4",
            "DDM_MAX_IMAGES_PER_REQUEST": "4",
            "DDM_MAX_UPLOAD_BYTES": str(64 * 1024),
            "DDM_SHUTDOWN_DELAY_S": "1.5",
            "DDM_MIN_REQUEST_TIMEOUT_S": "0.01",  # a deadline that expires behind a running batch
        }
    )


# --- the main server ------------------------------------------------------------------------------------
def test_profile_and_model_metadata(main: LiveServer) -> None:
    with AnomalyClient(main.url, api_key=KEY) as client:
        card = client.models().models[0]
        assert card.sample_size == 32 and card.parameters > 1_000_000 and card.options["steps"] == 10
        assert [p.name for p in card.profiles] == [PROFILE]
        assert client.model(card.id).id == card.id
        result = client.score(faces(0, 1), profile=PROFILE, explain=True, features=True).results[0]
        assert result.score is not None and 0.0 < result.p_value <= 1.0 and result.heatmap_png
        assert result.features is not None and len(result.features.timesteps) == 10
    with AnomalyClient(main.url) as anonymous, pytest.raises(ServiceError) as refused:
        anonymous.score(faces(0, 1), profile=PROFILE)
    assert refused.value.status == 401 and refused.value.code == "unauthorized"


async def test_32_concurrent_clients_batched_correct_and_health_responsive(main: LiveServer) -> None:
    images = faces(0, 32)
    async with AsyncAnomalyClient(main.url, api_key=KEY) as client:
        before = await client.metrics()
        alone = [(await client.score([images[i]], profile=PROFILE)).results[0].score for i in (0, 17)]

        async def one(i: int) -> float | None:
            async with AsyncAnomalyClient(main.url, api_key=KEY) as own:  # 32 separate connections
                return (await own.score([images[i]], ids=[f"img{i}"], profile=PROFILE)).results[0].score

        tasks = [asyncio.ensure_future(one(i)) for i in range(32)]
        await until_batch_running(client)
        live = await client.live()  # answered while a batch is being computed
        assert live.live and not all(t.done() for t in tasks)
        scores = await asyncio.gather(*tasks)
        after = await client.metrics()
    assert all(s is not None for s in scores)
    # a score does not depend on the other images in its batch (float32 tolerance)
    assert [scores[0], scores[17]] == pytest.approx(alone, rel=1e-4, abs=1e-3)
    sent = 2 + 32
    ok = 'code="200",endpoint="/v1/score"'
    assert _delta(before, after, f"anomaly_requests_total{{{ok}}}") == sent
    batches = _delta(before, after, "anomaly_batch_size_count")
    assert _delta(before, after, "anomaly_batch_size_sum") == sent
    assert batches < 32  # 32 requests shared batches ...
    assert _delta(before, after, 'anomaly_batch_size_bucket{le="1.0"}') < batches  # ... of more than one
    assert metric(after, "anomaly_queue_images") == 0


def _delta(before: str, after: str, series: str) -> float:
    name, _, labels = series.partition("{")
    pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return metric(after, name, **pairs) - metric(before, name, **pairs)


async def test_disconnected_client_is_dropped_before_compute(main: LiveServer) -> None:
    async with AsyncAnomalyClient(main.url, api_key=KEY) as client:
        before = await client.metrics()
        blocker = asyncio.ensure_future(client.score(faces(0, 32), profile=PROFILE))  # one full batch
        await until_batch_running(client)
        async with AsyncAnomalyClient(main.url, api_key=KEY, timeout=0.3) as impatient:
            with pytest.raises(httpx.TimeoutException):
                await impatient.score(faces(40, 3), profile=PROFILE)  # queued behind the batch; gives up
        assert len((await blocker).results) == 32
        end = time.monotonic() + POLL_LIMIT_S
        while _delta(before, await client.metrics(), 'anomaly_images_total{outcome="cancelled"}') < 3:
            assert time.monotonic() < end, "cancelled images not counted"
            await asyncio.sleep(0.05)
        after = await client.metrics()
    assert _delta(before, after, 'anomaly_images_total{outcome="scored"}') == 32  # never the 3
    assert _delta(before, after, 'anomaly_refusals_total{reason="cancelled"}') == 1


# --- two model instances -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_instances(
    main: LiveServer, live_server_module: Callable[..., LiveServer], profiles_dir: Path
) -> LiveServer:
    return live_server_module(
        {"DDM_PROFILES_DIR": str(profiles_dir), "DDM_MODEL_INSTANCES": "2", "DDM_MAX_BATCH_SIZE": "4"}
    )


async def test_two_model_instances_score_as_one(main: LiveServer, two_instances: LiveServer) -> None:
    images, ids = faces(0, 12), [f"img{i}" for i in range(12)]
    chunks = [images[i : i + 4] for i in range(0, 12, 4)]
    async with AsyncAnomalyClient(main.url, api_key=KEY) as one:
        # one request at a time: each chunk is one batch of 4, as on the other server (the kernels, and so
        # the float rounding, depend on the batch size; nothing else may)
        expected = [r.score for chunk in chunks for r in (await one.score(chunk, profile=PROFILE)).results]
        assert metric(await one.metrics(), "anomaly_model_instances") == 1
    async with AsyncAnomalyClient(two_instances.url) as two:
        before = await two.metrics()
        spread = await two.score(images, ids=ids, profile=PROFILE)  # batches of 4 on both workers
        concurrent = await asyncio.gather(*(two.score(chunk, profile=PROFILE) for chunk in chunks))
        after = await two.metrics()
    assert metric(after, "anomaly_model_instances") == 2
    assert spread.timings.batches == 3 and [r.id for r in spread.results] == ids
    assert [r.score for r in spread.results] == pytest.approx(expected, rel=1e-9)
    assert [r.score for c in concurrent for r in c.results] == pytest.approx(expected, rel=1e-9)
    assert _delta(before, after, "anomaly_batch_size_count") == 6
    assert _delta(before, after, "anomaly_batch_size_sum") == 24


# --- the other UNet runtime ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_runtime(
    main: LiveServer, live_server_module: Callable[..., LiveServer], profiles_dir: Path
) -> LiveServer:
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(profiles_dir),
            "DDM_RUNTIME": "torch",
            "DDM_MODEL_INSTANCES": "2",
            "DDM_MAX_BATCH_SIZE": "4",
        }
    )


async def test_both_runtimes_serve_the_same_scores(main: LiveServer, torch_runtime: LiveServer) -> None:
    images = faces(0, 12)
    chunks = [images[i : i + 4] for i in range(0, 12, 4)]
    async with AsyncAnomalyClient(main.url, api_key=KEY) as default:
        answers = await asyncio.gather(*(default.score(c, profile=PROFILE) for c in chunks))
        default_text = await default.metrics()
    async with AsyncAnomalyClient(torch_runtime.url) as client:
        expected = [r.score for c in chunks for r in (await client.score(c, profile=PROFILE)).results]
        card = (await client.models()).models[0]
        torch_text = await client.metrics()
    assert {a.model.runtime for a in answers} == {"onnxruntime"} and card.runtime == "torch"
    # float32 in both: features move by ~1e-4 (tests/test_runtimes.py), scores by ~1e-3; a different model,
    # timestep or mixed-up batch moves them by ~10
    got = [r.score for a in answers for r in a.results]
    assert got == pytest.approx(expected, abs=0.05)
    labels = {"model_id": card.id, "device": "cpu", "dtype": "float32", "method": "diffpath-v2"}
    assert metric(default_text, "anomaly_model_info", **labels, runtime="onnxruntime") == 1
    assert metric(torch_text, "anomaly_model_info", **labels, runtime="torch") == 1


# --- the small server ------------------------------------------------------------------------------------
async def test_overload_is_503_with_retry_after_never_a_hang(small: LiveServer) -> None:
    images = faces(0, 24)

    async def one(i: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as http:
            files = [("files", (f"{i}.png", images[i], "image/png"))]
            return await http.post("/v1/score", params={"profile": PROFILE}, files=files)

    responses = await asyncio.gather(*(one(i) for i in range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    text = httpx.get(f"{small.url}/metrics").text
    assert metric(text, "anomaly_refusals_total", reason="queue_full") == codes.count(503)
    with AnomalyClient(small.url) as client:  # and it serves normally afterwards
        assert client.score(images[:1], profile=PROFILE).results[0].score is not None


async def test_deadline_is_504_and_the_expired_request_costs_no_compute(small: LiveServer) -> None:
    async with AsyncAnomalyClient(small.url) as client:
        before = await client.metrics()
        blocker = asyncio.ensure_future(client.score(faces(0, 4), profile=PROFILE))  # two batches of two
        await until_batch_running(client)
        with pytest.raises(ServiceError) as late:
            await client.score(faces(50, 1), profile=PROFILE, timeout_s=0.05)
        assert late.value.status == 504 and late.value.code == "timeout"
        assert len((await blocker).results) == 4
        after = await client.metrics()
    assert _delta(before, after, 'anomaly_images_total{outcome="scored"}') == 4
    assert _delta(before, after, 'anomaly_refusals_total{reason="timeout"}') == 1


def test_chunked_body_over_the_cap_is_cut_off_while_streaming(small: LiveServer) -> None:
    host, port = small.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        sent, answer = send_chunks_until_answered(sock, 10 * 1024 * 1024)  # 10 MiB against a 64 KiB cap
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):  # headers + JSON body
            more = sock.recv(65536)  # bounded by the socket's 30 s timeout
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "too_large" and str(64 * 1024) in error["message"], error
    assert sent < 1024 * 1024  # refused after about the cap, not after reading 10 MiB


async def test_sigterm_drains_accepted_requests_then_exits_0(small: LiveServer) -> None:
    images = faces(60, 4)
    async with httpx.AsyncClient(base_url=small.url, timeout=120) as http:

        async def one(i: int) -> httpx.Response:
            files = [("files", (f"{i}.png", images[i], "image/png"))]
            return await http.post("/v1/score", params={"profile": PROFILE}, files=files)

        accepted = [asyncio.ensure_future(one(i)) for i in range(4)]
        end = time.monotonic() + POLL_LIMIT_S
        while metric((await http.get("/metrics")).text, "anomaly_inflight_requests") < 5:  # 4 + this scrape
            assert time.monotonic() < end, "requests never arrived"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # margin: from the socket to admission is a few awaits, not a wait
        small.send(signal.SIGTERM)
        ready = await http.get("/readyz")  # during the shutdown delay: still listening, not ready
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        late = await http.post("/v1/score", params={"profile": PROFILE}, content=images[0],
                               headers={"content-type": "image/png"})  # fmt: skip
        assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
        responses = await asyncio.gather(*accepted)
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json()["results"][0]["score"] is not None for r in responses)
    assert await asyncio.to_thread(small.stop) == 0
