"""Keys, profile administration and the /v2 JSON against a real uvicorn server with both kinds of key
(scoring and admin) and 62 profiles on disk: each route against each kind of key, the 64-profile limit
under concurrent creations and before any decode, metric series of deleted profiles, /v2 bodies bounded
before parsing and typed strictly, oversized JSON integers. docs/RELIABILITY.md lists the cases."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.engine.calibration.store import MAX_PROFILES
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, metric_value, png_bytes

pytestmark = [pytest.mark.live]

SCORE_KEY = "score-key-1"
ADMIN_KEY = "admin-key-1"
KEYS = {
    "none": {},
    "scoring": {"Authorization": f"Bearer {SCORE_KEY}"},
    "admin": {"Authorization": f"Bearer {ADMIN_KEY}"},
}
MODEL = SHIPPED_MODEL.name
FILLERS = MAX_PROFILES - 2 - 1  # with default.json: 62 profiles before the tests


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    profiles = tmp_path_factory.mktemp("admin-profiles")
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "default.json")
    for i in range(FILLERS):
        shutil.copy(profiles / "default.json", profiles / f"filler-{i:02d}.json")
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(profiles),
            "DDM_API_KEYS": SCORE_KEY,
            "DDM_ADMIN_API_KEYS": ADMIN_KEY,
            "DDM_MAX_BATCH_DELAY_MS": "1",
            "DDM_PROFILE_CREATIONS": "16",  # the limit itself under concurrent creations
        }
    )


def profile_count(server: LiveServer) -> int:
    return len(list(Path(server.env["DDM_PROFILES_DIR"]).glob("*.json")))


def metrics(server: LiveServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30).text


def files(n: int, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = np.random.default_rng(seed)
    return [
        ("files", (f"{i}.png", png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "image/png"))
        for i in range(n)
    ]


def infer_body(data: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    image = base64.b64encode(png_bytes()).decode()
    tensor = {"name": "images", "shape": [1], "datatype": "BYTES", "data": data or [image]}
    return {"inputs": [tensor], **extra}


# --- keys -------------------------------------------------------------------------------------------------
def test_each_route_against_each_kind_of_key(server: LiveServer) -> None:
    """Scoring keys score and read metadata; only admin keys create, overwrite and delete profiles (a scoring
    key there is 403); admin keys also score. Deleting a profile removes its metric series."""
    raw = {"content": png_bytes(), "headers": {"content-type": "image/png"}}
    reads = {
        "GET /v1/models": lambda h: httpx.get(f"{server.url}/v1/models", headers=h, timeout=30),
        "GET /v2/models/{name}": lambda h: httpx.get(
            f"{server.url}/v2/models/{MODEL}", headers=h, timeout=30
        ),
        "POST /v1/score": lambda h: httpx.post(
            f"{server.url}/v1/score", content=raw["content"], headers={**raw["headers"], **h}, timeout=60
        ),
        "POST /v2/models/{name}/infer": lambda h: httpx.post(
            f"{server.url}/v2/models/{MODEL}/infer", json=infer_body(), headers=h, timeout=60
        ),
    }
    for route, call in reads.items():
        got = {kind: call(headers).status_code for kind, headers in KEYS.items()}
        assert got == {"none": 401, "scoring": 200, "admin": 200}, route

    def create(kind: str, **data: str) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/profiles",
            data={"name": "keyed", **data},
            files=files(10),
            headers=KEYS[kind],
            timeout=120,
        )

    forbidden_before = metric_value(metrics(server), "anomaly_refusals_total", reason="forbidden")
    assert create("none").status_code == 401
    refused = create("scoring")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert create("admin").status_code == 201
    assert create("scoring", overwrite="true").status_code == 403
    assert create("admin", overwrite="true").status_code == 201
    scored = httpx.post(
        f"{server.url}/v1/score?profile=keyed",
        content=raw["content"],
        headers={**raw["headers"], **KEYS["scoring"]},
        timeout=60,
    )
    assert scored.status_code == 200
    assert 'profile="keyed"' in metrics(server)
    delete = {
        kind: httpx.delete(f"{server.url}/v1/profiles/keyed", headers=h, timeout=30).status_code
        for kind, h in KEYS.items()
    }
    assert delete == {"none": 401, "scoring": 403, "admin": 204}
    assert metric_value(metrics(server), "anomaly_refusals_total", reason="forbidden") == forbidden_before + 3
    # the deleted profile's series are gone (80 label values were kept for 64 profiles on disk)
    assert 'profile="keyed"' not in metrics(server)
    assert 'profile="default"' in metrics(server)


# --- the profile limit ------------------------------------------------------------------------------------
def test_concurrent_creations_cannot_pass_the_profile_limit(server: LiveServer) -> None:
    """16 creations of distinct names at 62 profiles made 65 files. Creations under way hold their place:
    two are fitted, the others are refused with 413 before any image is decoded."""
    assert profile_count(server) == MAX_PROFILES - 2

    def create(i: int) -> int:
        r = httpx.post(
            f"{server.url}/v1/profiles",
            data={"name": f"race-{i}"},
            files=files(10, seed=i),
            headers=KEYS["admin"],
            timeout=300,
        )
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = sorted(pool.map(create, range(16)))
    assert codes == [201, 201] + [413] * 14, codes
    assert profile_count(server) == MAX_PROFILES


def test_at_the_limit_a_creation_is_refused_before_any_decode(server: LiveServer) -> None:
    """At 64 profiles a creation of 40 images was scored whole (6 s), then refused. Now it is refused with
    the name checks: no image reaches the model."""
    assert profile_count(server) == MAX_PROFILES
    batches = metric_value(metrics(server), "anomaly_batch_size_count")
    r = httpx.post(
        f"{server.url}/v1/profiles",
        data={"name": "one-more"},
        files=files(40),
        headers=KEYS["admin"],
        timeout=120,
    )
    assert r.status_code == 413 and f"at most {MAX_PROFILES} profiles" in r.json()["error"]["message"]
    assert metric_value(metrics(server), "anomaly_batch_size_count") == batches
    for i in range(16):  # leave the folder as the module found it
        httpx.delete(f"{server.url}/v1/profiles/race-{i}", headers=KEYS["admin"], timeout=30)
    assert profile_count(server) == MAX_PROFILES - 2


# --- /v2 JSON ---------------------------------------------------------------------------------------------
def peak_after(server: LiveServer, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    rss = _mib(pid, "VmRSS")
    answer = send()
    return answer, _mib(pid, "VmHWM") - rss


def _mib(pid: int, field: str) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


@pytest.mark.parametrize("flood", ["parameters", "data"])
def test_v2_json_floods_are_refused_before_parsing(server: LiveServer, flood: str) -> None:
    """1.7 M ``parameters`` keys in a 20 MiB body: 200 and +318 MiB per request; 3 M ``data`` elements
    with shape [1]: 400 after +150 MiB. Now both are refused from a count of the JSON's values."""
    if flood == "parameters":
        keys = ",".join(f'"k{i}":0' for i in range(1_600_000))
        tensor = '{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}'
        body = f'{{"parameters": {{{keys}}}, "inputs": [{tensor}]}}'
    else:
        body = (
            '{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ['
            + ",".join(['""'] * 3_000_000)
            + "]}]}"
        )
    assert len(body) < 20 * 1024 * 1024
    before = metric_value(metrics(server), "anomaly_refusals_total", reason="too_large")
    answer, grew = peak_after(
        server,
        lambda: httpx.post(
            f"{server.url}/v2/models/{MODEL}/infer",
            content=body.encode(),
            headers={"content-type": "application/json", **KEYS["scoring"]},
            timeout=120,
        ),
    )
    assert answer.status_code == 413, answer.text
    assert "more than" in answer.json()["error"] and "values" in answer.json()["error"]
    print(f"/v2 {flood} flood: peak RSS +{grew:.0f} MiB")
    assert grew < 80  # the body itself (20 MiB) is held; nothing is built from it
    assert metric_value(metrics(server), "anomaly_refusals_total", reason="too_large") == before + 1


@pytest.mark.parametrize(
    "body, status",
    [
        ({"inputs": [{"name": "images", "shape": ["1"], "datatype": "BYTES", "data": ["aGk="]}]}, 422),
        (infer_body(outputs=[{"name": "score", "parameters": {"binary_data": "false"}}]), 400),
        (infer_body(parameters={"explain": "true"}), 400),
        (infer_body(parameters={"binary_data_output": 1}), 400),
    ],
    ids=["shape-string", "binary_data-string", "explain-string", "binary_data_output-int"],
)
def test_v2_types_are_strict(server: LiveServer, body: dict[str, Any], status: int) -> None:
    """``"shape": ["1"]`` scored, ``"binary_data": "false"`` gave binary output and ``"explain": "true"``
    was ignored. Wrong JSON types are refused."""
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=KEYS["scoring"], timeout=60)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str)


@pytest.mark.parametrize("path", ["/v1/score", "/v1/profiles"])
def test_json_integers_over_the_digit_limit_are_422(server: LiveServer, path: str) -> None:
    """An integer of more than 4,300 digits escaped the early image count as a ValueError: 500."""
    big = "9" * 5000
    for body in (
        f'{{"images": [{{"data": "aGk="}}], "timeout": {big}}}',
        f'{{"images": [{big}], "name": "x"}}',
    ):
        r = httpx.post(
            f"{server.url}{path}",
            content=body,
            headers={"content-type": "application/json", **KEYS["admin"]},
            timeout=30,
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "validation"
    assert "Traceback" not in server.log()


def test_plain_v2_request_still_scores(server: LiveServer) -> None:
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer", json=infer_body(), headers=KEYS["scoring"], timeout=60
    )
    assert r.status_code == 200
    assert json.loads(r.text)["outputs"][0]["name"] == "score"
