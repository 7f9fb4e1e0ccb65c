"""What the routes share, for both protocols (fake engine, in process).

One request deadline: ``timeout_s`` on ``/v1/score`` and the OIP request parameter ``timeout``
(microseconds) on ``/v2`` shorten the server's DDM_REQUEST_TIMEOUT_S, are capped by it, and are refused
below DDM_MIN_REQUEST_TIMEOUT_S; a request whose deadline passes while the model is busy gets its 504 and
costs no compute. Profile files are read off the event loop on every route that reads them."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.engine.calibration.fit import fit_profile
from app.engine.calibration.store import ProfileStore
from app.settings import Settings
from app.web.app import create_app
from tests.helpers import metric_value, until
from tests.service_fakes import FakeEngine, png

WAIT = 10.0


def score_v1(client: TestClient, data: bytes, timeout_s: float | None = None) -> httpx.Response:
    params = {} if timeout_s is None else {"timeout_s": timeout_s}
    return client.post("/v1/score", params=params, content=data, headers={"content-type": "image/png"})


def score_v2(client: TestClient, data: bytes, timeout_s: float | None = None) -> httpx.Response:
    tensor = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}
    body: dict[str, Any] = {"inputs": [tensor]}
    if timeout_s is not None:
        body["parameters"] = {"timeout": round(timeout_s * 1e6)}  # microseconds, Triton's name
    return client.post("/v2/models/fake/infer", json=body)


PROTOCOLS = {"v1": score_v1, "v2": score_v2}
Score = Callable[..., httpx.Response]


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


def serve(tmp_path: Path, fake: FakeEngine, **overrides: Any) -> TestClient:
    settings = Settings(
        profiles_dir=tmp_path / "profiles",
        max_batch_delay_ms=1.0,
        min_request_timeout_s=0.01,  # lets a request ask for a deadline that passes while a batch is held
        **overrides,
    )
    fitter = FakeEngine()  # another instance: ``fake.seen`` counts only the images of requests
    stats = fitter.image_stats([fitter.decode(png(100 + i)) for i in range(12)])
    features = np.stack([s.features for s in stats])
    fit_profile("default", features, model_id=fitter.info.model_id, options=fitter.options).save(
        tmp_path / "profiles" / "default.json"
    )
    return TestClient(create_app(settings, engine=fake), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path: Path, fake: FakeEngine) -> Iterator[TestClient]:
    with serve(tmp_path, fake) as c:
        until(lambda: c.get("/readyz").status_code == 200, "/readyz 200", WAIT)
        yield c


def late_while_busy(
    client: TestClient, fake: FakeEngine, late: Callable[[], httpx.Response]
) -> httpx.Response:
    """``late()`` while the worker holds another request's batch; that one still answers 200."""
    fake.hold()
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(score_v1(client, png(1))))
    thread.start()
    try:
        assert fake.entered.wait(WAIT)
        answer = late()
    finally:
        fake.gate.set()
        thread.join(WAIT)
    assert len(first) == 1
    return answer, first[0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_requests_own_timeout_shortens_its_deadline(
    client: TestClient, fake: FakeEngine, protocol: str
) -> None:
    answer, held = late_while_busy(client, fake, lambda: PROTOCOLS[protocol](client, png(77), timeout_s=0.05))
    assert answer.status_code == 504, answer.text
    assert held.status_code == 200, held.text
    assert len(fake.seen) == 1  # the held request's image only; never the late one
    assert metric_value(client.get("/metrics").text, "anomaly_images_total", outcome="expired") == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_longer_timeout_is_capped_at_the_servers(tmp_path: Path, fake: FakeEngine, protocol: str) -> None:
    with serve(tmp_path, fake, request_timeout_s=0.3) as client:
        until(lambda: client.get("/readyz").status_code == 200, "/readyz 200", WAIT)
        answer, _ = late_while_busy(client, fake, lambda: PROTOCOLS[protocol](client, png(77), timeout_s=600))
        # uncapped, it would wait for the held batch, which is let go only after this answer
        assert answer.status_code == 504, answer.text


@pytest.mark.parametrize(("protocol", "status"), [("v1", 422), ("v2", 400)])
def test_a_timeout_under_the_minimum_is_refused(client: TestClient, protocol: str, status: int) -> None:
    answer = PROTOCOLS[protocol](client, png(5), timeout_s=0.005)
    assert answer.status_code == status, answer.text
    assert "0.01" in answer.text  # the minimum is named
    assert PROTOCOLS[protocol](client, png(5), timeout_s=5).status_code == 200


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_profile_files_are_read_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat, a JSON read and a density load per lookup: on the event loop they would stall every
    request in flight behind a slow disk."""
    on_loop: list[tuple[str, bool]] = []
    get, load_all = ProfileStore.get, ProfileStore.load_all

    def watched_get(self: ProfileStore, name: str) -> Any:
        on_loop.append(("get", _on_event_loop()))
        return get(self, name)

    def watched_load_all(self: ProfileStore) -> Any:
        on_loop.append(("load_all", _on_event_loop()))
        return load_all(self)

    monkeypatch.setattr(ProfileStore, "get", watched_get)
    monkeypatch.setattr(ProfileStore, "load_all", watched_load_all)
    for answer in (
        score_v1(client, png(3)),
        score_v2(client, png(3)),
        client.get("/v1/models"),
        client.get("/v1/models/fake"),
        client.get("/v2/models/fake"),
    ):
        assert answer.status_code == 200, answer.text
    assert {call for call, _ in on_loop} == {"get", "load_all"}
    assert [call for call, loop in on_loop if loop] == []
