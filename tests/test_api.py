"""The HTTP API in process (FastAPI TestClient, lifespan included) over a fake engine: routes, options,
error table, auth, limits, metrics and OpenAPI examples. The real model is exercised in
tests/test_live_server.py."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.engine.calibration.fit import fit_profile
from app.settings import Settings
from app.web.app import create_app
from tests.helpers import metric_value, until
from tests.service_fakes import FakeEngine, png

WAIT = 10.0


@contextmanager
def running(tmp_path: Path, fake: FakeEngine, wait: bool = True, **overrides: Any) -> Iterator[TestClient]:
    options: dict[str, Any] = {
        "profiles_dir": tmp_path / "profiles",
        "allow_open_profile_creation": True,
        "max_batch_delay_ms": 1.0,
        "min_request_timeout_s": 0.01,  # lets a test ask for a deadline that expires while a batch is held
        **overrides,
    }
    app = create_app(Settings(**options), engine=fake)
    with TestClient(app, raise_server_exceptions=False) as client:
        if wait:
            assert fake.loaded.wait(WAIT)
            until(lambda: client.get("/readyz").status_code == 200, "/readyz 200", WAIT)
        yield client


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(tmp_path: Path, fake: FakeEngine) -> Iterator[TestClient]:
    with running(tmp_path, fake) as c:
        yield c


def make_profile(client: TestClient, name: str = "default", n: int = 12) -> dict[str, Any]:
    files = [("files", (f"ref{i}.png", png(100 + i), "image/png")) for i in range(n)]
    response = client.post("/v1/profiles", data={"name": name}, files=files)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def default_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 'default' profile for the fake engine, fitted once and copied into each test's profiles dir."""
    fake = FakeEngine()
    fake.loaded.set()
    stats = fake.image_stats([fake.decode(png(100 + i)) for i in range(12)])
    profile = fit_profile(
        "default", np.stack([s.features for s in stats]), model_id=fake.info.model_id, options=fake.options
    )
    return profile.save(tmp_path_factory.mktemp("fitted") / "default.json")


@pytest.fixture
def profiled(client: TestClient, default_profile: Path, tmp_path: Path) -> TestClient:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    shutil.copy(default_profile, tmp_path / "profiles" / "default.json")
    return client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return error


def metric(client: TestClient, name: str, **labels: str) -> float:
    """A sample of /metrics; a missing series fails (tests/helpers.py: metric_value)."""
    return metric_value(client.get("/metrics").text, name, **labels)


# --- health and lifecycle ---------------------------------------------------------------------------------
def test_livez_answers_while_loading_and_readyz_turns_ready(tmp_path: Path, fake: FakeEngine) -> None:
    fake.release.clear()
    with running(tmp_path, fake, wait=False) as client:
        for path in ("/livez", "/v2/health/live"):
            assert client.get(path).json() == {
                "status": "live",
                "live": True,
                "ready": False,
                "model_id": None,
            }
        for path in ("/readyz", "/v2/health/ready"):
            response = client.get(path)
            assert response.status_code == 503 and response.json()["status"] == "loading"
        refused = client.post("/v1/score", content=png(1), headers={"content-type": "image/png"})
        error_of(refused, 503, "not_ready")
        assert refused.headers["retry-after"]
        fake.release.set()
        assert fake.loaded.wait(WAIT)
        until(lambda: client.get("/readyz").status_code == 200, "/readyz 200", WAIT)
        assert client.get("/v2/health/ready").json()["model_id"] == "fake@000000000000"


def test_failed_load_stays_not_ready_but_live(tmp_path: Path, fake: FakeEngine) -> None:
    fake.load_error = RuntimeError("weights missing")
    with running(tmp_path, fake, wait=False) as client:
        until(lambda: client.get("/readyz").json()["status"] != "loading", "the load to end", WAIT)
        assert client.get("/readyz").status_code == 503
        assert client.get("/readyz").json()["status"] == "failed"
        assert client.get("/livez").status_code == 200
        assert "weights missing" not in client.get("/readyz").text  # the reason goes to the log only


# --- scoring ------------------------------------------------------------------------------------------------
def test_multipart_json_and_raw_bodies_agree_and_keep_order(profiled: TestClient) -> None:
    images = [png(i) for i in range(5)]
    multipart = profiled.post(
        "/v1/score", files=[("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    )
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert [r["id"] for r in body["results"]] == [f"img{i}.png" for i in range(5)]
    as_json = profiled.post(
        "/v1/score", json={"images": [{"id": f"j{i}", "data": b64(d)} for i, d in enumerate(images)]}
    )
    assert [r["id"] for r in as_json.json()["results"]] == [f"j{i}" for i in range(5)]
    raw = profiled.post("/v1/score", content=images[3], headers={"content-type": "image/png"})
    scores = [r["score"] for r in body["results"]]
    assert [r["score"] for r in as_json.json()["results"]] == pytest.approx(scores)
    assert raw.json()["results"][0]["score"] == pytest.approx(scores[3])
    assert len(set(scores)) == 5
    result = body["results"][0]
    assert set(result) >= {"score", "threshold", "is_anomaly", "percentile", "p_value", "thresholds"}
    assert result["heatmap_png"] is None and result["features"] is None
    assert body["model"]["id"] == "fake@000000000000" and body["profile"]["name"] == "default"
    assert body["timings"]["batches"] >= 1 and body["request_id"] == multipart.headers["x-request-id"]


def test_json_body_options_and_url_safe_base64(profiled: TestClient) -> None:
    data = base64.urlsafe_b64encode(png(3)).decode().rstrip("=")
    response = profiled.post(
        "/v1/score", json={"images": [{"data": data}], "explain": True, "features": True}
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["id"] == "0" and result["heatmap_png"] and result["features"]["vector"]


def test_explain_returns_png_over_the_source_image(profiled: TestClient) -> None:
    response = profiled.post(
        "/v1/score?explain=true&features=true",
        files=[("files", ("wide.png", png(7, size=(48, 24)), "image/png"))],
    )
    result = response.json()["results"][0]
    heat = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
    assert heat.format == "PNG" and heat.size == (48, 24) and heat.mode == "RGBA"
    assert heat.getpixel((0, 12))[3] == 0 and heat.getpixel((24, 12))[3] > 0  # only the centre square
    features = result["features"]
    assert (
        len(features["vector"]) == 6 and len(features["step_sums"]) == 4 and len(features["delta_sums"]) == 3
    )


def test_form_fields_choose_options(profiled: TestClient) -> None:
    make_profile(profiled, "other")
    response = profiled.post(
        "/v1/score",
        data={"profile": "other", "features": "true"},
        files=[("files", ("a.png", png(1), "image/png"))],
    )
    assert response.json()["profile"]["name"] == "other" and response.json()["results"][0]["features"]


def test_non_finite_scores_travel_as_null(profiled: TestClient) -> None:
    black = png(0, color=(0, 0, 0))
    response = profiled.post("/v1/score?features=true", content=black, headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert "NaN" not in response.text and "Infinity" not in response.text
    result = response.json()["results"][0]
    assert result["score"] is None and result["is_anomaly"] is True
    assert result["features"]["vector"] == [None] * 6


def test_unknown_profile_is_404(client: TestClient) -> None:
    error = error_of(
        client.post("/v1/score", content=png(1), headers={"content-type": "image/png"}),
        404,
        "profile_not_found",
    )
    assert "default" in error["message"]


# --- profiles and models ------------------------------------------------------------------------------------
def test_profile_created_listed_and_usable_at_once(client: TestClient, tmp_path: Path) -> None:
    summary = make_profile(client, "textures.v1")
    assert summary["name"] == "textures.v1" and summary["n_reference"] == 12
    assert (tmp_path / "profiles" / "textures.v1.json").is_file()
    scored = client.post(
        "/v1/score?profile=textures.v1", content=png(50), headers={"content-type": "image/png"}
    )
    assert scored.status_code == 200 and scored.json()["profile"]["name"] == "textures.v1"
    models = client.get("/v1/models").json()["models"]
    assert [p["name"] for p in models[0]["profiles"]] == ["textures.v1"]
    assert models[0]["sample_size"] == 8 and models[0]["options"]["steps"] == 4 and "path" not in models[0]
    assert client.get("/v1/models/fake@000000000000").json()["id"] == "fake@000000000000"
    assert client.get("/v1/models/fake").status_code == 200
    error_of(client.get("/v1/models/other"), 404, "model_not_found")


def test_profile_json_body_and_refusals(client: TestClient) -> None:
    images = [{"data": b64(png(200 + i))} for i in range(10)]
    created = client.post("/v1/profiles", json={"name": "json-made", "images": images, "fprs": [0.01, 0.2]})
    assert created.status_code == 201, created.text
    assert set(created.json()["thresholds"]) == {"0.01", "0.05", "0.2"}
    error_of(
        client.post("/v1/profiles", json={"name": "json-made", "images": images}), 409, "profile_conflict"
    )
    error_of(
        client.post("/v1/profiles", json={"name": "../etc", "images": images}), 422, "validation"
    )  # the schema's name pattern
    error_of(client.post("/v1/profiles", json={"name": "few", "images": images[:3]}), 400, "bad_input")
    files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(10)]
    error_of(client.post("/v1/profiles", files=files), 400, "bad_input")  # no name


def test_profile_creation_is_closed_without_keys_unless_opened(tmp_path: Path, fake: FakeEngine) -> None:
    with running(tmp_path, fake, allow_open_profile_creation=False) as client:
        error_of(
            client.post("/v1/profiles", json={"name": "x", "images": [{"data": b64(png(1))}]}),
            403,
            "forbidden",
        )
        assert metric(client, "anomaly_refusals_total", reason="forbidden") == 1


def test_request_latency_is_observed_in_seconds(tmp_path: Path, fake: FakeEngine) -> None:
    """The latency histogram is in seconds (the p99 alert and the dashboards read it so): a request adds
    at most its wall time as the client measured it, not a thousand times that."""
    with running(tmp_path, fake) as client:
        client.post("/v1/score", content=png(1), headers={"content-type": "image/png"})  # the series exists
        before = metric(client, "anomaly_request_latency_seconds_sum", endpoint="/v1/score")
        started = time.perf_counter()
        r = client.post("/v1/score", content=png(2), headers={"content-type": "image/png"})
        wall = time.perf_counter() - started
        assert r.status_code in (200, 404)
        added = metric(client, "anomaly_request_latency_seconds_sum", endpoint="/v1/score") - before
        assert 0 < added <= wall, (added, wall)


def test_api_keys(tmp_path: Path, fake: FakeEngine) -> None:
    """Scoring keys score; profile administration takes an admin key, which scores too."""
    keys = {"api_keys": "alpha-key,beta-key", "admin_api_keys": "admin-key"}
    with running(tmp_path, fake, **keys, allow_open_profile_creation=False) as client:
        body = {"content": png(1), "headers": {"content-type": "image/png"}}
        missing = client.post("/v1/score", **body)
        error_of(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = {"content-type": "image/png", "authorization": "Bearer wrong"}
        error_of(client.post("/v1/score", content=png(1), headers=wrong), 401, "unauthorized")
        error_of(client.get("/v1/models"), 401, "unauthorized")
        auth = {"authorization": "Bearer beta-key"}
        admin = {"authorization": "Bearer admin-key"}
        files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(10)]
        refused = client.post("/v1/profiles", data={"name": "default"}, files=files, headers=auth)
        error_of(refused, 403, "forbidden")  # a scoring key never administers profiles
        assert (
            client.post("/v1/profiles", data={"name": "default"}, files=files, headers=admin).status_code
            == 201
        )
        for key in (auth, admin):
            ok = client.post("/v1/score", content=png(1), headers={"content-type": "image/png", **key})
            assert ok.status_code == 200
        assert client.get("/livez").status_code == 200 and client.get("/metrics").status_code == 200
        assert metric(client, "anomaly_refusals_total", reason="unauthorized") == 3
        assert metric(client, "anomaly_refusals_total", reason="forbidden") == 1


# --- the error table and limits ----------------------------------------------------------------------------
def _tiny() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (2, 2)).save(out, format="PNG")
    return out.getvalue()


PNG_BODY = {"content-type": "image/png"}
BAD_REQUESTS = [
    # (description, request kwargs, status, code)
    (
        "text body",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("no content type", {"content": png(1)}, 415, "unsupported_media_type"),
    ("not an image", {"content": b"GIF89a nonsense", "headers": PNG_BODY}, 415, "unsupported_media_type"),
    ("empty image", {"content": b"", "headers": PNG_BODY}, 400, "bad_input"),
    ("truncated png", {"content": png(1)[:60], "headers": PNG_BODY}, 400, "bad_input"),
    ("2x2 image", {"content": _tiny(), "headers": PNG_BODY}, 400, "bad_input"),
    ("invalid base64", {"json": {"images": [{"data": "!!!notbase64"}]}}, 400, "bad_input"),
    ("no images", {"json": {"images": []}}, 422, "validation"),
    ("unknown field", {"json": {"images": [{"data": "aGk="}], "colour": 1}}, 422, "validation"),
    ("broken json", {"content": b"{", "headers": {"content-type": "application/json"}}, 422, "validation"),
    ("too many images", {"json": {"images": [{"data": b64(png(i))} for i in range(5)]}}, 413, "too_large"),
    (
        "too many parts",
        {"files": [("files", (f"{i}", png(i), "image/png")) for i in range(5)]},
        413,
        "too_large",
    ),
    ("text part as file", {"files": [("files", (None, b"abc"))]}, 400, "bad_input"),
    (
        "bad boolean",
        {"params": {"explain": "maybe"}, "content": png(1), "headers": PNG_BODY},
        422,
        "validation",
    ),
    # what the published schema refuses is refused as a validation error (422), before any image is read
    (
        "bad profile",
        {"params": {"profile": "../../x"}, "content": png(1), "headers": PNG_BODY},
        422,
        "validation",
    ),
    ("bad profile in body", {"json": {"images": [{"data": "aGk="}], "profile": "a/b"}}, 422, "validation"),
    ("empty data", {"json": {"images": [{"data": ""}]}}, 422, "validation"),
    ("empty id", {"json": {"images": [{"id": "", "data": b64(png(1))}]}}, 422, "validation"),
    (
        "deadline no request can meet",
        {"params": {"timeout_s": "5e-324"}, "content": png(1), "headers": PNG_BODY},
        422,
        "validation",
    ),
]


@pytest.mark.parametrize(
    ("what", "request_kwargs", "status", "code"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_their_error_and_are_counted(
    tmp_path: Path,
    fake: FakeEngine,
    default_profile: Path,
    what: str,
    request_kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    (tmp_path / "profiles").mkdir()
    shutil.copy(default_profile, tmp_path / "profiles" / "default.json")
    with running(tmp_path, fake, max_images_per_request=4) as client:
        error_of(client.post("/v1/score", **request_kwargs), status, code)
        refusals = client.get("/metrics").text
        assert sum(float(line.rsplit(" ", 1)[1]) for line in refusals.splitlines()
                   if line.startswith("anomaly_refusals_total{")) == 1  # fmt: skip
        good = client.post("/v1/score", content=png(9), headers={"content-type": "image/png"})
        assert good.status_code == 200


def test_body_over_the_cap_is_refused_before_and_while_streaming(tmp_path: Path, fake: FakeEngine) -> None:
    with running(tmp_path, fake, max_upload_bytes=4096) as client:
        declared = client.post("/v1/score", content=b"x" * 5000, headers={"content-type": "image/png"})
        error_of(declared, 413, "too_large")

        def body() -> Iterator[bytes]:  # no Content-Length: chunked (the live tests check it is cut off)
            for _ in range(10):
                yield b"y" * 1024

        streamed = client.post("/v1/score", content=body(), headers={"content-type": "image/png"})
        error_of(streamed, 413, "too_large")
        assert metric(client, "anomaly_refusals_total", reason="too_large") == 2


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    error_of(client.get("/v1/nothing"), 404, "not_found")
    error_of(client.get("/v1/score"), 405, "method_not_allowed")


def test_engine_failure_is_500_and_the_service_keeps_serving(profiled: TestClient, fake: FakeEngine) -> None:
    fake.fail_next = True
    error = error_of(
        profiled.post("/v1/score", content=png(1), headers={"content-type": "image/png"}), 500, "engine_error"
    )
    assert "fake engine failure" in error["message"]
    assert (
        profiled.post("/v1/score", content=png(1), headers={"content-type": "image/png"}).status_code == 200
    )
    assert metric(profiled, "anomaly_refusals_total", reason="engine_error") == 1


def _post_in_thread(
    client: TestClient, data: bytes, results: list[httpx.Response], **params: Any
) -> threading.Thread:
    def go() -> None:
        results.append(
            client.post("/v1/score", params=params, content=data, headers={"content-type": "image/png"})
        )

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_full_queue_is_503_with_retry_after(tmp_path: Path, fake: FakeEngine, default_profile: Path) -> None:
    (tmp_path / "profiles").mkdir()
    shutil.copy(default_profile, tmp_path / "profiles" / "default.json")
    with running(tmp_path, fake, max_batch_size=1, max_queue_images=2) as client:
        app_service = client.app.state.service  # type: ignore[attr-defined]
        fake.hold()
        results: list[httpx.Response] = []
        threads = [_post_in_thread(client, png(1), results)]
        assert fake.entered.wait(WAIT)  # the worker is inside the first batch
        threads += [_post_in_thread(client, png(i), results) for i in (2, 3)]
        until(lambda: app_service.batcher.queued >= 2, "two queued images", WAIT)
        refused = client.post("/v1/score", content=png(4), headers={"content-type": "image/png"})
        error_of(refused, 503, "queue_full")
        assert int(refused.headers["retry-after"]) >= 1
        fake.gate.set()
        for t in threads:
            t.join(WAIT)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert metric(client, "anomaly_refusals_total", reason="queue_full") == 1


def test_deadline_is_504_and_costs_no_compute(profiled: TestClient, fake: FakeEngine) -> None:
    fake.hold()
    results: list[httpx.Response] = []
    first = _post_in_thread(profiled, png(1), results)
    assert fake.entered.wait(WAIT)
    late = profiled.post("/v1/score?timeout_s=0.05", content=png(77), headers={"content-type": "image/png"})
    error_of(late, 504, "timeout")
    fake.gate.set()
    first.join(WAIT)
    assert results[0].status_code == 200
    assert len(fake.seen) == 1  # the first request only; never the late one
    assert metric(profiled, "anomaly_images_total", outcome="expired") == 1


def test_concurrent_requests_are_batched(profiled: TestClient, fake: FakeEngine) -> None:
    fake.hold()
    results: list[httpx.Response] = []
    threads = [_post_in_thread(profiled, png(1), results)]
    assert fake.entered.wait(WAIT)
    threads += [_post_in_thread(profiled, png(i), results) for i in range(2, 8)]
    service = profiled.app.state.service  # type: ignore[attr-defined]
    until(lambda: service.batcher.queued >= 6, "six queued images", WAIT)
    fake.gate.set()
    for t in threads:
        t.join(WAIT)
    assert [r.status_code for r in results] == [200] * 7
    assert fake.batches[-2:] == [1, 6]


def test_metrics_after_traffic(profiled: TestClient) -> None:
    for i in range(3):
        profiled.post("/v1/score", content=png(i), headers={"content-type": "image/png"})
    profiled.post("/v1/score", content=b"junk", headers={"content-type": "image/png"})
    text = profiled.get("/metrics").text
    assert 'anomaly_requests_total{code="200",endpoint="/v1/score"} 3.0' in text
    assert 'anomaly_requests_total{code="415",endpoint="/v1/score"} 1.0' in text
    info = (
        'anomaly_model_info{device="cpu",dtype="float32",method="diffpath-v2",model_id="fake@000000000000",'
        'runtime="torch"}'
    )
    assert f"{info} 1.0" in text
    assert 'anomaly_verdicts_total{profile="default",verdict="normal"}' in text
    assert "anomaly_score_bucket" in text and 'anomaly_device_memory_bytes{kind="max_rss"} 1.0' in text
    assert "anomaly_ready 1.0" in text and "anomaly_inflight_requests 1.0" in text  # the scrape itself


# --- OpenAPI ------------------------------------------------------------------------------------------------
def test_openapi_examples_work(profiled: TestClient) -> None:
    schema = profiled.get("/openapi.json").json()
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/png"} <= set(body)
    example = body["application/json"]["schema"]["examples"][0]
    response = profiled.post("/v1/score", json=example)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["id"] == "face-1"
    documented = schema["components"]["schemas"]["ScoreResponse"]["examples"][0]
    assert set(documented) == set(response.json())
    assert "/v1/profiles" in schema["paths"] and "/readyz" in schema["paths"]
    assert schema["paths"]["/v1/score"]["post"]["responses"]["503"]
    json.dumps(schema)  # serialisable as it is
    assert profiled.get("/docs").status_code == 200


def test_profile_creation_waits_for_room_in_a_full_queue(
    tmp_path: Path, fake: FakeEngine, default_profile: Path
) -> None:
    (tmp_path / "profiles").mkdir()
    shutil.copy(default_profile, tmp_path / "profiles" / "default.json")
    with running(tmp_path, fake, max_batch_size=1, max_queue_images=2) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        fake.hold()
        results: list[httpx.Response] = []
        threads = [_post_in_thread(client, png(1), results)]
        assert fake.entered.wait(WAIT)
        threads += [_post_in_thread(client, png(i), results) for i in (2, 3)]
        until(lambda: service.batcher.queued >= 2, "two queued images", WAIT)
        before = metric(client, "anomaly_refusals_total", reason="queue_full")
        created: list[httpx.Response] = []
        maker = threading.Thread(target=lambda: created.append(make_profile_response(client, "waited")))
        maker.start()
        # its first chunk found no room
        until(lambda: metric(client, "anomaly_images_total", outcome="refused") >= 1, "a refused chunk", WAIT)
        fake.gate.set()
        for t in [*threads, maker]:
            t.join(WAIT)
        assert created[0].status_code == 201, created[0].text
        assert [r.status_code for r in results] == [200] * 3
        assert metric(client, "anomaly_refusals_total", reason="queue_full") == before  # nobody was refused


def make_profile_response(client: TestClient, name: str) -> httpx.Response:
    files = [("files", (f"ref{i}.png", png(100 + i), "image/png")) for i in range(12)]
    return client.post("/v1/profiles", data={"name": name}, files=files)


def test_model_instances_show_in_metrics_and_oversubscription_is_logged(
    tmp_path: Path, fake: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"), running(tmp_path, fake, model_instances=2, torch_threads=4096) as c:
        assert "anomaly_model_instances 2.0" in c.get("/metrics").text
    assert any("2 model instances x 4096 torch threads" in r.getMessage() for r in caplog.records)
