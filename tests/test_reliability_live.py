"""Overload, faults and shutdown against live servers (real uvicorn, shipped model, default K=10 steps).

``server``: batches of 4, a queue of 24 images, a 1 s shutdown delay, and the test-only fault wrapper
(``DDM_TEST_FAULTS``, tests/faults.py, served by ``python -m tests.fault_server``) armed by image size: a
13x17 image makes its batch fail, a 15x13 image makes a batch of more than 2 run out of device memory,
and 11x19 / 19x11 / 17x13 images get NaN / +inf / 1e300 features. Ordinary images are untouched. Its
profiles folder starts with six broken or foreign profiles next to the "default" one the fixture creates
through the API.

``broken``: a model folder whose weights file is garbage; with DDM_EXIT_ON_LOAD_FAILURE=false it must stay
live and never become ready (the default exits: tests/test_reliability_protocol.py).

The tests run in file order: overload, faults, profiles, then SIGTERM under load (which stops ``server``).
Figures (counts, memory) are printed; docs/RELIABILITY.md quotes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.engine.calibration.fit import fit_profile
from app.engine.types import MethodOptions
from tests import hostile_media as media
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL
from tests.reliability_helpers import moved, rss_mib, samples

pytestmark = [pytest.mark.slow, pytest.mark.live]

QUEUE = 24
BATCH = 4
FAIL, OOM, NAN, INF, HUGE = (13, 17), (15, 13), (11, 19), (19, 11), (17, 13)
FAULTS = f"fail={FAIL[0]}x{FAIL[1]};oom={OOM[0]}x{OOM[1]}:2;" + ";".join(
    f"features={w}x{h}:{v}" for (w, h), v in ((NAN, "nan"), (INF, "inf"), (HUGE, "1e300"))
)
POLL_S = 60.0  # bound on waiting for a state the server reaches by itself
OVERLOAD_CLIENTS = 4 * QUEUE
OVERLOAD_SECONDS = 8.0
PNG = "image/png"


def image(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    return media.png(seed, *size)


@dataclass
class Servers:
    main: LiveServer
    broken: LiveServer
    model_id: str


def _profile_json(model_id: str, **changes: Any) -> dict[str, Any]:
    features = np.random.default_rng(0).normal(size=(40, 6))
    profile = fit_profile("x", features, model_id=model_id, options=MethodOptions())
    data = profile.to_dict()
    data.update(changes)
    return data


def _foreign_profiles(folder: Path, model_id: str) -> None:
    """Profiles the server must refuse at load, each for its own reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.json").write_text('{"format_version": 1, "name": ')
    (folder / "wrongmodel.json").write_text(json.dumps(_profile_json("other-model@000000000000")))
    options = {**MethodOptions().to_dict(), "steps": 20}
    (folder / "wrongoptions.json").write_text(json.dumps(_profile_json(model_id, options=options)))
    (folder / "oldformat.json").write_text(json.dumps(_profile_json(model_id, format_version=99)))
    (folder / "nanscores.json").write_text(json.dumps(_profile_json(model_id, calibration_scores=[math.nan])))
    padded = json.dumps(_profile_json(model_id)) + " " * (9 * 1024 * 1024)
    (folder / "huge.json").write_text(padded)


REFUSED_PROFILES = {
    "broken": "corrupt profile",
    "wrongmodel": "made for model other-model@000000000000",
    "wrongoptions": "made with method options",
    "oldformat": "profile format 99",
    "nanscores": "no usable calibration scores",
    "huge": "larger than",
}


@pytest.fixture(scope="module")
def servers(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> Servers:
    tmp = tmp_path_factory.mktemp("reliability")
    weights = SHIPPED_MODEL / "unet" / "diffusion_pytorch_model.safetensors"
    model_id = f"{SHIPPED_MODEL.resolve().name}@{hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"
    broken_model = tmp / "broken-model"
    shutil.copytree(SHIPPED_MODEL / "scheduler", broken_model / "scheduler")
    (broken_model / "unet").mkdir()
    shutil.copy(SHIPPED_MODEL / "unet" / "config.json", broken_model / "unet")
    (broken_model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(media.random_bytes(4096))
    # started first and not waited for: it loads (and fails) while the main server starts
    broken = live_server_module(
        {"DDM_MODEL_DIR": str(broken_model), "DDM_EXIT_ON_LOAD_FAILURE": "false"}, wait_ready=False
    )
    _foreign_profiles(tmp / "profiles", model_id)
    main = live_server_module(
        {
            "DDM_PROFILES_DIR": str(tmp / "profiles"),
            "DDM_ALLOW_OPEN_PROFILE_CREATION": "true",
            "DDM_MAX_BATCH_SIZE": str(BATCH),
            "DDM_MAX_QUEUE_IMAGES": str(QUEUE),
            "DDM_MAX_IMAGES_PER_REQUEST": "8",
            "DDM_MAX_BATCH_DELAY_MS": "50",
            "DDM_SHUTDOWN_DELAY_S": "1.0",
            "DDM_TEST_FAULTS": FAULTS,
        }
    )
    files = [("files", (f"ref{i}.png", image(100 + i), PNG)) for i in range(12)]
    created = httpx.post(f"{main.url}/v1/profiles", data={"name": "default"}, files=files, timeout=120)
    assert created.status_code == 201, created.text
    return Servers(main, broken, model_id)


def score(url: str, *images: bytes, **params: Any) -> httpx.Response:
    files = [("files", (f"{i}.png", data, PNG)) for i, data in enumerate(images)]
    return httpx.post(f"{url}/v1/score", files=files, params=params, timeout=60)


def scores(response: httpx.Response) -> list[float | None]:
    assert response.status_code == 200, response.text
    return [r["score"] for r in response.json()["results"]]


def strict_json(text: str) -> Any:
    """Parse JSON refusing the NaN / Infinity extensions Python's json module would accept."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON number {token} in an answer")

    return json.loads(text, parse_constant=refuse)


# --- overload --------------------------------------------------------------------------------------------
async def test_overload_every_request_answered_memory_bounded(servers: Servers) -> None:
    url, pid = servers.main.url, servers.main.process.pid
    good = image(7)
    baseline = scores(score(url, good))[0]
    before = samples(url)
    rss_before = rss_mib(pid)
    outcomes: Counter[str] = Counter()
    bad: list[str] = []
    pool = [image(1000 + i) for i in range(64)]  # made before the flood: the clients only send
    rss_peak, live_worst = rss_before, 0.0
    stop_at = time.monotonic() + OVERLOAD_SECONDS

    def watch() -> None:
        """Every 0.2 s: the server's resident memory, and how long /livez takes to answer."""
        nonlocal rss_peak, live_worst
        with httpx.Client(base_url=url, timeout=30) as own:
            while time.monotonic() < stop_at + 1:
                t0 = time.monotonic()
                if own.get("/livez").status_code != 200:
                    bad.append("/livez was not 200")
                live_worst = max(live_worst, time.monotonic() - t0)
                rss_peak = max(rss_peak, rss_mib(pid))
                time.sleep(0.2)

    limits = httpx.Limits(
        max_connections=OVERLOAD_CLIENTS + 4, max_keepalive_connections=OVERLOAD_CLIENTS + 4
    )

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def client(n: int) -> None:
            sent = n
            while time.monotonic() < stop_at:
                sent += 1
                params = {"timeout_s": "1.5"} if n % 4 == 0 else {}  # a quarter are impatient: some 504
                try:
                    r = await http.post("/v1/score", content=pool[sent % len(pool)], params=params,
                                        headers={"content-type": PNG})  # fmt: skip
                except httpx.HTTPError as exc:
                    outcomes["no answer"] += 1
                    bad.append(f"client {n}: {type(exc).__name__}")
                    continue
                outcomes[str(r.status_code)] += 1
                body = r.json()
                if r.status_code == 503:
                    ok = body["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
                    await asyncio.sleep(0.25)  # a client that backs off a little (Retry-After is >= 1 s)
                elif r.status_code == 504:
                    ok = body["error"]["code"] == "timeout"
                else:
                    ok = r.status_code == 200 and body["results"][0]["score"] is not None
                if not ok:
                    bad.append(f"{r.status_code}: {r.text[:200]}")

        watcher = threading.Thread(target=watch)  # own thread and client: not slowed by this event loop
        watcher.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(OVERLOAD_CLIENTS))), 120)
        finally:
            watcher.join(30)

    end = time.monotonic() + POLL_S
    while samples(url)["anomaly_queue_images"] > 0:  # impatient requests' leftovers drain
        assert time.monotonic() < end
        time.sleep(0.1)
    after = samples(url)
    rss_after = rss_mib(pid)
    sent = sum(outcomes.values())
    print(f"\noverload: {OVERLOAD_CLIENTS} clients x {OVERLOAD_SECONDS:.0f} s, queue {QUEUE}: {sent} sent "
          f"{dict(outcomes)}; RSS {rss_before:.0f} -> peak {rss_peak:.0f} -> {rss_after:.0f} MiB; "
          f"/livez worst {1000 * live_worst:.0f} ms")  # fmt: skip
    assert not bad, bad[:5]
    assert set(outcomes) <= {"200", "503", "504"} and outcomes["200"] > 0 and outcomes["503"] > 0
    requests = moved(before, after, "anomaly_requests_total")
    assert sum(v for k, v in requests.items() if 'endpoint="/v1/score"' in k) == sent  # none dropped
    refusals = moved(before, after, "anomaly_refusals_total")
    assert refusals.get('{reason="queue_full"}', 0) == outcomes["503"]
    assert refusals.get('{reason="timeout"}', 0) == outcomes["504"]
    assert moved(before, after, "anomaly_images_total").get('{outcome="scored"}', 0) >= outcomes["200"]
    assert after["anomaly_inflight_requests"] == 1  # only the scrape itself
    assert (
        rss_peak - rss_before < 400 and rss_after - rss_before < 250
    )  # MiB: bounded, not leaking per request
    assert live_worst < 5.0
    assert scores(score(url, good))[0] == pytest.approx(baseline, rel=1e-6)  # serves normally afterwards


# --- faults ----------------------------------------------------------------------------------------------
async def _until(url: str, condition: Callable[[dict[str, float]], bool], http: httpx.AsyncClient) -> None:
    end = time.monotonic() + POLL_S
    while True:
        text = (await http.get(f"{url}/metrics")).text
        current = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                current[series] = float(value)
        if condition(current):
            return
        assert time.monotonic() < end, "condition never reached"
        await asyncio.sleep(0.01)


async def test_engine_error_fails_only_its_batch_and_the_worker_keeps_serving(servers: Servers) -> None:
    url = servers.main.url
    alone = scores(score(url, image(51)))[0]
    before = samples(url)
    async with httpx.AsyncClient(timeout=60) as http:

        async def post(*images: bytes) -> httpx.Response:
            files = [("files", (f"{i}.png", data, PNG)) for i, data in enumerate(images)]
            return await http.post(f"{url}/v1/score", files=files)

        blocker = asyncio.ensure_future(post(*(image(60 + i) for i in range(BATCH))))  # one full batch
        await _until(url, lambda m: m["anomaly_inflight_batches"] >= 1, http)
        poisoned = asyncio.ensure_future(post(image(52, FAIL)))
        neighbour = asyncio.ensure_future(post(image(53)))  # queued with it: the same next batch
        await _until(url, lambda m: m["anomaly_queue_images"] >= 2 or poisoned.done(), http)
        answers = await asyncio.gather(blocker, poisoned, neighbour)
        after_fault = await post(image(51))
    after = samples(url)
    assert answers[0].status_code == 200 and len(answers[0].json()["results"]) == BATCH  # batch before
    for failed in answers[1:]:
        assert failed.status_code == 500, failed.text
        error = strict_json(failed.text)["error"]
        assert error["code"] == "engine_error" and "injected engine failure" in error["message"]
        assert "Traceback" not in failed.text
    assert scores(after_fault)[0] == pytest.approx(alone, rel=1e-6)  # the worker keeps serving
    assert moved(before, after, "anomaly_refusals_total") == {'{reason="engine_error"}': 2.0}
    assert moved(before, after, "anomaly_images_total") == {
        '{outcome="failed"}': 2.0,
        '{outcome="scored"}': 5.0,
    }


def test_non_finite_results_never_reach_a_client_as_numbers(servers: Servers) -> None:
    url = servers.main.url
    before = samples(url)
    sizes = (NAN, INF, HUGE)
    r = score(
        url, *(image(70 + i, s) for i, s in enumerate(sizes)), image(73), explain="true", features="true"
    )
    after = samples(url)
    assert r.status_code == 200, r.text
    results = strict_json(r.text)["results"]
    for result in results[:3]:
        assert result["score"] is None and result["is_anomaly"] is True
        assert result["p_value"] == 0.0 and result["percentile"] == 100.0
        assert result["heatmap_png"]  # a (blank) map, not an error
    for result in results[:2]:  # NaN / inf features travel as null
        assert set(result["features"]["vector"]) == {None}
        assert {v for row in result["features"]["step_sums"] for v in row} == {None}
    assert set(results[2]["features"]["vector"]) == {1e300}  # finite features whose density overflows
    assert isinstance(results[3]["score"], float)
    verdicts = moved(before, after, "anomaly_verdicts_total")
    assert verdicts.get('{profile="default",verdict="non_finite"}') == 3.0


def test_simulated_device_oom_splits_the_batch_and_lowers_the_safe_size(servers: Servers) -> None:
    url = servers.main.url
    others = [image(80 + i) for i in range(BATCH - 1)]
    alone = [scores(score(url, data))[0] for data in others]
    before = samples(url)
    assert before["anomaly_safe_batch_size"] == BATCH
    together = scores(score(url, image(84, OOM), *others))  # one batch of 4 -> OOM -> 2 + 2
    after = samples(url)
    assert all(s is not None for s in together)
    assert together[1:] == pytest.approx(alone, rel=1e-4)  # batch independence survives the split
    assert after["anomaly_safe_batch_size"] == 2
    assert after["anomaly_oom_splits_total"] - before["anomaly_oom_splits_total"] == 1
    assert moved(before, after, "anomaly_refusals_total") == {}
    assert "device out of memory on a batch of 4; retrying as 2 + 2" in servers.main.log()


# --- calibration profiles and model folders -------------------------------------------------------------
def test_corrupt_and_foreign_profiles_are_refused_at_load_with_a_reason(servers: Servers) -> None:
    url, log = servers.main.url, servers.main.log()
    for name, reason in REFUSED_PROFILES.items():
        assert any(f"calibration profile refused: {name}.json" in line and reason in line
                   for line in log.splitlines()), (name, reason)  # fmt: skip
    card = httpx.get(f"{url}/v1/models", timeout=30).json()["models"][0]
    assert [p["name"] for p in card["profiles"]] == ["default"]
    refused = {p["name"]: p["reason"] for p in card["refused_profiles"]}
    assert refused.keys() == REFUSED_PROFILES.keys()
    for name, reason in REFUSED_PROFILES.items():
        assert reason in refused[name]
    r = score(url, image(1), profile="wrongmodel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "profile_mismatch"
    assert "other-model@000000000000" in r.json()["error"]["message"]


def test_a_model_folder_that_fails_to_load_stays_live_and_not_ready(servers: Servers) -> None:
    broken = servers.broken
    end = time.monotonic() + 180
    while "model failed to load" not in broken.log():
        assert broken.process.poll() is None, broken.log()
        assert time.monotonic() < end, broken.log()
        time.sleep(0.2)
    assert "cannot load UNet2DModel" in broken.log()
    for path in ("/readyz", "/v2/health/ready"):
        r = httpx.get(f"{broken.url}{path}", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "failed"
    assert httpx.get(f"{broken.url}/livez", timeout=10).json() == {
        "status": "live", "live": True, "ready": False, "model_id": None,
    }  # fmt: skip
    r = httpx.post(f"{broken.url}/v1/score", content=image(1), headers={"content-type": PNG}, timeout=10)
    assert (
        r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"] == "5"
    )
    assert "failed to load" in r.json()["error"]["message"]
    assert samples(broken.url)["anomaly_ready"] == 0
    assert broken.stop() == 0


# --- shutdown --------------------------------------------------------------------------------------------
async def test_sigterm_under_load_answers_every_accepted_request_then_exits_0(servers: Servers) -> None:
    main = servers.main
    in_flight = QUEUE  # fits the queue: every one is accepted
    async with httpx.AsyncClient(base_url=main.url, timeout=120) as http:

        async def one(i: int) -> httpx.Response:
            return await http.post("/v1/score", content=image(500 + i), headers={"content-type": PNG})

        accepted = [asyncio.ensure_future(one(i)) for i in range(in_flight)]
        await _until(main.url, lambda m: m["anomaly_inflight_requests"] >= in_flight + 1, http)
        await asyncio.sleep(0.3)  # margin: from the socket to admission is a few awaits
        assert not all(t.done() for t in accepted)
        main.send(signal.SIGTERM)
        ready = await http.get("/readyz")  # during the shutdown delay: still listening, not ready
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        late = await http.post("/v1/score", content=image(1), headers={"content-type": PNG})
        assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
        responses = await asyncio.gather(*accepted)
    codes = Counter(r.status_code for r in responses)
    print(f"\nSIGTERM with {in_flight} requests in flight: {dict(codes)}")
    assert codes == {200: in_flight}
    assert all(r.json()["results"][0]["score"] is not None for r in responses)
    assert await asyncio.to_thread(main.stop) == 0
    assert "draining" in main.log()
