"""Open Inference Protocol v2 (KServe V2) against a live server, driven by Triton's own HTTP client
(``tritonclient[http]``): a face and a digit scored through ``/v2/models/{name}/infer`` get exactly the
scores and verdicts ``/v1/score`` gives them, in JSON and in the binary tensor extension; metadata and
readiness answer as the client expects; refusals use the same table (status codes, metrics) as ``/v1``
with the protocol's ``{"error": "<message>"}`` body."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from tritonclient.utils import InferenceServerException

from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, metric_value, png_bytes, require_data

pytestmark = [pytest.mark.live, pytest.mark.slow]

KEY = "oip-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict[str, str]:
    """A fresh header dict per tritonclient call: the client adds its own headers to the dict it is given."""
    return dict(AUTH)


MODEL = SHIPPED_MODEL.name  # the V2 model name is the model folder's name
OUTPUT_NAMES = ("score", "threshold", "is_anomaly", "percentile", "p_value")
MAX_IMAGES = 4
QUEUE = 3  # below MAX_IMAGES: the batcher refuses a 4-image request (it could never fit the queue)
INFER_ENDPOINT = "/v2/models/{model_name}/infer"
FAIL_SIZE = (13, 17)
NAN_SIZE = (17, 13)
FAULTS = f"fail={FAIL_SIZE[0]}x{FAIL_SIZE[1]};features={NAN_SIZE[0]}x{NAN_SIZE[1]}:nan"


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    profiles = tmp_path_factory.mktemp("oip-profiles")
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "default.json")
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(profiles),
            "DDM_API_KEYS": KEY,
            "DDM_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
            "DDM_MAX_QUEUE_IMAGES": str(QUEUE),
            "DDM_MAX_UPLOAD_BYTES": str(256 * 1024),
            # tests/faults.py via the test entry point: a 13x17 upload fails its batch, a 17x13 one scores NaN
            "DDM_TEST_FAULTS": FAULTS,
        }
    )


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[Any]:
    triton = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """A CelebA face and an MNIST digit (the shipped model is a CelebA model: the digit is anomalous)."""
    face = require_data("celeba", 1)[0]
    digit = require_data("mnist", 1)[0]
    return [face.read_bytes(), digit.read_bytes()]


@pytest.fixture(scope="module")
def v1_results(server: LiveServer, images: list[bytes]) -> list[dict[str, Any]]:
    body = {"images": [{"data": base64.b64encode(b).decode()} for b in images], "profile": "default"}
    response = httpx.post(f"{server.url}/v1/score", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    assert [r["is_anomaly"] for r in results] == [False, True], "face normal, digit anomalous"
    return results


def metrics(server: LiveServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def assert_same_as_v1(result: Any, v1_results: list[dict[str, Any]]) -> None:
    for name in OUTPUT_NAMES:
        got = result.as_numpy(name)
        assert got is not None, f"output {name} missing"
        assert got.shape == (2,), name
        want = np.asarray([r[name] for r in v1_results])
        if name == "is_anomaly":
            assert got.dtype == np.bool_ and got.tolist() == want.tolist()
        else:
            assert got.dtype == np.float64, name
            np.testing.assert_array_equal(got, want.astype(np.float64), err_msg=name)


# --- scoring -----------------------------------------------------------------------------------------------
def test_tritonclient_json_scores_equal_v1(
    client: Any, server: LiveServer, images: list[bytes], v1_results: list[dict[str, Any]]
) -> None:
    """BYTES elements as base64 strings in the JSON body; outputs asked for as JSON."""
    before = metrics(server)
    tensor = tritonclient_http.InferInput("images", [2], "BYTES")
    encoded = np.array([base64.b64encode(b) for b in images], dtype=np.object_)
    tensor.set_data_from_numpy(encoded, binary_data=False)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in OUTPUT_NAMES]
    result = client.infer(
        MODEL, [tensor], outputs=outputs, request_id="r-1", parameters={"profile": "default"}, headers=auth()
    )
    assert_same_as_v1(result, v1_results)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["id"] == "r-1"
    assert response["model_version"] == client.get_model_metadata(MODEL, headers=auth())["versions"][0]
    assert all("binary_data_size" not in (o.get("parameters") or {}) for o in response["outputs"])

    after = metrics(server)
    delta = {
        verdict: metric_value(after, "anomaly_verdicts_total", profile="default", verdict=verdict)
        - metric_value(before, "anomaly_verdicts_total", profile="default", verdict=verdict)
        for verdict in ("normal", "anomaly")
    }
    assert delta == {"normal": 1.0, "anomaly": 1.0}
    ok = dict(endpoint=INFER_ENDPOINT, code="200")
    assert (
        metric_value(after, "anomaly_requests_total", **ok)
        - metric_value(before, "anomaly_requests_total", **ok)
        == 1
    )
    assert metric_value(after, "anomaly_profile_default_fpr", profile="default") == 0.05


def test_tritonclient_binary_extension_scores_equal_v1(
    client: Any, images: list[bytes], v1_results: list[dict[str, Any]]
) -> None:
    """tritonclient's defaults: raw image bytes in the binary tensor extension, outputs returned binary."""
    tensor = tritonclient_http.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = client.infer(MODEL, [tensor], headers=auth())
    assert_same_as_v1(result, v1_results)
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])


def test_heatmap_output_is_a_png_per_image(client: Any, images: list[bytes]) -> None:
    tensor = tritonclient_http.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(images[:1], dtype=np.object_))
    outputs = [tritonclient_http.InferRequestedOutput(n) for n in ("heatmap", "score")]
    result = client.infer(MODEL, [tensor], outputs=outputs, headers=auth())
    (png,) = result.as_numpy("heatmap")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 100
    assert [o["name"] for o in result.get_response()["outputs"]] == ["heatmap", "score"]


# --- metadata and health ---------------------------------------------------------------------------------
def test_metadata_and_readiness_through_tritonclient(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "ddm-anomaly" and "binary_tensor_data" in server_meta["extensions"]
    meta = client.get_model_metadata(MODEL, headers=auth())
    assert meta["name"] == MODEL and len(meta["versions"]) == 1
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    types = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert types == {
        "score": "FP64",
        "threshold": "FP64",
        "is_anomaly": "BOOL",
        "percentile": "FP64",
        "p_value": "FP64",
        "heatmap": "BYTES",
    }
    assert meta["parameters"]["profile"] == "default" and "default" in meta["parameters"]["profiles"].split(
        ","
    )
    version = meta["versions"][0]
    assert client.get_model_metadata(MODEL, model_version=version, headers=auth())["name"] == MODEL
    with pytest.raises(InferenceServerException, match="no model"):
        client.get_model_metadata(MODEL, model_version="0" * 12, headers=auth())


# --- refusals: the /v1 table, the protocol's body -------------------------------------------------------
def infer_raw(
    server: LiveServer, body: Any, headers: dict[str, str] | None = None, model: str = MODEL
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer",
        content=content,
        headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
        timeout=120,
    )


def request_body(data: list[str], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "shape": [len(data)], "datatype": "BYTES", "data": data}], **extra}


def oip_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert response.headers["x-request-id"]
    message: str = body["error"]
    return message


@pytest.mark.parametrize(
    ("case", "status", "reason", "needle"),
    [
        ("unknown profile", 404, "not_found", "no calibration profile"),
        ("unknown model", 404, "not_found", "no model"),
        ("bad base64", 400, "bad_input", "not valid base64"),
        ("not an image", 415, "unsupported_media_type", "image '0': not an image"),
        ("wrong datatype", 400, "bad_input", "must be BYTES"),
        ("shape mismatch", 400, "bad_input", "does not match its shape"),
        ("unknown output", 400, "bad_input", "unknown output"),
        ("not the protocol", 422, "validation", "inputs"),
        ("too many images", 413, "too_large", "at most 4"),
        ("bigger than the queue", 413, "too_large", "the queue holds at most 3"),
        ("no API key", 401, "unauthorized", "API key"),
    ],
)
def test_refusals_in_protocol_shape(
    server: LiveServer, images: list[bytes], case: str, status: int, reason: str, needle: str
) -> None:
    face = base64.b64encode(images[0]).decode()
    body: Any = request_body([face])
    headers: dict[str, str] = {}
    model = MODEL
    if case == "unknown profile":
        body["parameters"] = {"profile": "nope"}
    elif case == "unknown model":
        model = "nope"
    elif case == "bad base64":
        body = request_body(["***"])
    elif case == "not an image":
        body = request_body([base64.b64encode(b"plain text").decode()])
    elif case == "wrong datatype":
        body["inputs"][0]["datatype"] = "FP32"
    elif case == "shape mismatch":
        body["inputs"][0]["shape"] = [2]
    elif case == "unknown output":
        body["outputs"] = [{"name": "logits"}]
    elif case == "not the protocol":
        body = {"images": [{"data": face}]}
    elif case == "too many images":
        body = request_body([face] * (MAX_IMAGES + 1))
    elif case == "bigger than the queue":
        body = request_body([face] * MAX_IMAGES)
    elif case == "no API key":
        headers = {"Authorization": ""}
    before = metrics(server)
    response = infer_raw(server, body, headers, model)
    assert needle in oip_error(response, status)
    after = metrics(server)
    refused = metric_value(after, "anomaly_refusals_total", reason=reason)
    assert refused - metric_value(before, "anomaly_refusals_total", reason=reason) == 1
    code = dict(endpoint=INFER_ENDPOINT, code=str(status))
    assert (
        metric_value(after, "anomaly_requests_total", **code)
        - metric_value(before, "anomaly_requests_total", **code)
        == 1
    )


def test_engine_failure_is_a_500_in_protocol_shape(server: LiveServer) -> None:
    before = metrics(server)
    response = infer_raw(server, request_body([base64.b64encode(png_bytes(size=FAIL_SIZE)).decode()]))
    assert oip_error(response, 500)
    after = metrics(server)
    reason = "engine_error"
    assert (
        metric_value(after, "anomaly_refusals_total", reason=reason)
        - metric_value(before, "anomaly_refusals_total", reason=reason)
        == 1
    )


def test_a_score_that_is_not_finite(server: LiveServer, client: Any) -> None:
    """null in JSON (as /v1/score), NaN in binary; such an image is judged anomalous."""
    image = png_bytes(size=NAN_SIZE)
    response = infer_raw(server, request_body([base64.b64encode(image).decode()]))
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["score"] == [None] and outputs["is_anomaly"] == [True]
    tensor = tritonclient_http.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    result = client.infer(MODEL, [tensor], headers=auth())
    assert np.isnan(result.as_numpy("score")).all() and result.as_numpy("is_anomaly").tolist() == [True]


def test_body_over_the_byte_cap_is_refused_before_reading(server: LiveServer) -> None:
    response = infer_raw(server, b"{" + b" " * (256 * 1024) + b"}")
    assert "over the cap" in oip_error(response, 413)


def test_refusals_through_tritonclient_carry_the_message(client: Any, images: list[bytes]) -> None:
    tensor = tritonclient_http.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(images[:1], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="no calibration profile 'nope'"):
        client.infer(MODEL, [tensor], parameters={"profile": "nope"}, headers=auth())
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer(MODEL, [tensor])


def test_v1_errors_keep_their_shape(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/v1/score", json={"images": []}, headers=AUTH, timeout=30)
    assert response.status_code == 422
    assert set(response.json()["error"]) == {"code", "message", "request_id"}


def test_openapi_lists_the_v2_routes(server: LiveServer) -> None:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    for path in ("/v2", "/v2/models/{model_name}", "/v2/models/{model_name}/ready", INFER_ENDPOINT):
        assert path in paths, path
    assert "application/json" in paths[INFER_ENDPOINT]["post"]["requestBody"]["content"]
