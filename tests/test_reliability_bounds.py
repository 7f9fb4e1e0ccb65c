"""Bounds a hostile client meets before it costs the server anything, against a real uvicorn server:
JSON image lists counted before validation, request heads capped (431), options checked before compute,
log lines that cannot be forged, HEAD on the health routes. docs/RELIABILITY.md lists the cases."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.web.http_limits import MAX_HEADER_BYTES, MAX_HEADER_FIELDS
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, png_bytes


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    profiles = tmp_path_factory.mktemp("profiles")
    (profiles / "default.json").write_bytes((SHIPPED_MODEL / "profiles" / "default.json").read_bytes())
    return live_server_module(
        {
            "DDM_PROFILES_DIR": str(profiles),
            "DDM_ALLOW_OPEN_PROFILE_CREATION": "true",
            "DDM_PROFILE_CREATIONS": "2",  # two creations of one name race to the name check
        }
    )


def series(server: LiveServer, name: str, **labels: str) -> float:
    """One sample of /metrics; a missing series fails the test (a renamed metric must not read as 0)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    selector = re.escape(name) + (rf"\{{{re.escape(want)}\}}" if labels else "")
    match = re.search(rf"^{selector} (\S+)$", text, re.M)
    assert match, f"no series {name}{{{want}}} in /metrics"
    return float(match.group(1))


def peak_rss_mib(server: LiveServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


def test_json_image_flood_is_refused_before_validation(server: LiveServer) -> None:
    """1.6M empty entries in 4.6 MiB (under the byte cap): 413 from the early count, no per-entry objects
    (validating them first took 9 s and 1.3 GB in the server)."""
    before_rss = peak_rss_mib(server)
    before = series(server, "anomaly_refusals_total", reason="too_large")
    body = b'{"profile": "default", "images": [' + b",".join([b"{}"] * 1_600_000) + b"]}"
    r = httpx.post(
        f"{server.url}/v1/score", content=body, headers={"content-type": "application/json"}, timeout=120
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    assert "at most 64" in r.json()["error"]["message"]
    assert series(server, "anomaly_refusals_total", reason="too_large") == before + 1
    assert peak_rss_mib(server) - before_rss < 200


def raw_request(server: LiveServer, head: bytes) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)  # may be refused while still sending: the answer is on its way
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_request_heads_are_capped_with_431(server: LiveServer) -> None:
    before = series(server, "anomaly_refusals_total", reason="too_large")
    # one huge header: refused once the head passes the cap, without reading the rest of it
    huge = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * MAX_HEADER_BYTES) + b"\r\n\r\n"
    answer = raw_request(server, huge)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"code": "headers_too_large"' in answer
    # many small fields inside the byte cap: refused by count, with the usual error body and request id
    headers = {f"x-h{i}": "1" for i in range(MAX_HEADER_FIELDS + 5)}
    r = httpx.get(f"{server.url}/livez", headers=headers, timeout=30)
    assert r.status_code == 431
    assert r.json()["error"]["code"] == "headers_too_large" and r.json()["error"]["request_id"]
    # an ordinary head at the field limit still works
    fine = {f"x-h{i}": "1" for i in range(MAX_HEADER_FIELDS - 10)}
    assert httpx.get(f"{server.url}/livez", headers=fine, timeout=30).status_code == 200
    assert series(server, "anomaly_refusals_total", reason="too_large") == before + 2


def test_profile_options_are_checked_before_any_image_is_computed(server: LiveServer) -> None:
    batches = series(server, "anomaly_batch_size_count")
    images = [{"data": base64.b64encode(png_bytes(size=(32, 32))).decode()}] * 12
    too_many = {"name": "fprs-flood", "images": images, "fprs": [0.001 * (i + 1) for i in range(100)]}
    r = httpx.post(f"{server.url}/v1/profiles", json=too_many, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation"
    out_of_range = {"name": "fprs-range", "images": images, "fprs": [0.05, 1.5]}
    assert httpx.post(f"{server.url}/v1/profiles", json=out_of_range, timeout=60).status_code == 422
    files = [("files", (f"{i}.png", png_bytes(size=(32, 32)), "image/png")) for i in range(12)]
    form = {"name": "fprs-form", "fprs": ",".join(str(0.001 * (i + 1)) for i in range(40))}
    r = httpx.post(f"{server.url}/v1/profiles", data=form, files=files, timeout=60)
    assert r.status_code == 400 and "at most 31" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/v1/profiles", data={"name": "bad-fpr", "default_fpr": "2"}, files=files, timeout=60
    )
    assert r.status_code == 400 and "(0, 1)" in r.json()["error"]["message"]
    assert series(server, "anomaly_batch_size_count") == batches  # no image reached the model


def test_client_text_cannot_forge_log_lines(server: LiveServer) -> None:
    forged = "FORGED-LINE ERROR app: admin logged in"
    r = httpx.post(
        f"{server.url}/v1/score",
        json={"images": [{"data": "aGk="}], f"x\n{forged}": 1},
        timeout=30,
    )
    assert r.status_code == 422
    assert (
        httpx.get(f"{server.url}/no/such%0A{forged.replace(' ', '%20')}%1b%5b31m%00", timeout=30).status_code
        == 404
    )
    log = server.log()
    assert not any(line.startswith("FORGED-LINE") for line in log.splitlines())
    assert "\x1b" not in log and "\x00" not in log
    assert f"\\n{forged}" in log  # the refusal is still logged, escaped


def test_head_on_health_routes(server: LiveServer) -> None:
    for path in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready"):
        r = httpx.head(f"{server.url}{path}", timeout=30)
        assert r.status_code == 200, path
        assert r.content == b""


def test_drain_answers_every_admitted_request_in_json(live_server: Callable[..., LiveServer]) -> None:
    """SIGTERM with a queue far longer than the drain: every admitted request gets a JSON answer (a result,
    or 504 at the capped deadline), none a cut connection or a plain-text 500, and the process exits 0."""
    server = live_server(
        {
            "DDM_PROFILES_DIR": str(SHIPPED_MODEL / "profiles"),
            "DDM_MAX_BATCH_SIZE": "1",
            "DDM_DRAIN_TIMEOUT_S": "4",
            "DDM_SHUTDOWN_DELAY_S": "0.5",
            "DDM_REQUEST_TIMEOUT_S": "60",
        }
    )
    images = [png_bytes(size=(32, 32)) for _ in range(4)]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{server.url}/v1/score", files=files)

    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            tasks = [asyncio.ensure_future(one(client)) for _ in range(40)]  # 160 images at batch 1
            end = time.monotonic() + 60
            while series(server, "anomaly_queue_images") < 60:
                assert time.monotonic() < end, "the queue never filled"
                await asyncio.sleep(0.1)
            server.send(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    answers = asyncio.run(scenario())
    assert server.process.wait(60) == 0
    codes = Counter(r.status_code for r in answers)
    assert set(codes) <= {200, 503, 504}, codes
    assert codes[504] > 0, codes  # the queue could not be computed in the drain: capped deadlines answered
    for r in answers:
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        if r.status_code != 200:
            assert r.json()["error"]["code"] in ("timeout", "not_ready"), r.text


def _profile_files(n: int = 12) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype="uint8") for _ in range(n)]
    return [("files", (f"{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(arrays)]


def test_open_profile_creation_is_serialised_and_never_overwrites(server: LiveServer) -> None:
    """Without API keys (DDM_ALLOW_OPEN_PROFILE_CREATION): two concurrent creates of one name give one 201
    and one 409, a name that differs only by case is refused, overwriting (the shipped default included)
    needs a key, and deleting needs a key."""
    files = _profile_files()

    async def create(client: httpx.AsyncClient, name: str) -> httpx.Response:
        return await client.post(f"{server.url}/v1/profiles", data={"name": name}, files=files)

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(create(client, "raced"), create(client, "raced"))

    codes = sorted(r.status_code for r in asyncio.run(race()))
    assert codes == [201, 409], codes
    r = httpx.post(f"{server.url}/v1/profiles", data={"name": "RACED"}, files=files, timeout=120)
    assert r.status_code == 409 and r.json()["error"]["code"] == "profile_conflict"
    assert "only by case" in r.json()["error"]["message"]
    for name in ("raced", "default"):
        r = httpx.post(
            f"{server.url}/v1/profiles", data={"name": name, "overwrite": "true"}, files=files, timeout=120
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", name
    assert httpx.delete(f"{server.url}/v1/profiles/raced", timeout=30).status_code == 403
    default = httpx.post(
        f"{server.url}/v1/score",
        content=png_bytes(size=(32, 32)),
        headers={"content-type": "image/png"},
        timeout=60,
    )
    assert (
        default.status_code == 200 and default.json()["profile"]["n_reference"] > 100
    )  # still the shipped one


def test_profiles_delete_with_a_key_and_stale_writes_are_cleaned(
    live_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "default.json").write_bytes((SHIPPED_MODEL / "profiles" / "default.json").read_bytes())
    stale = profiles / ".widgets.json.k3j2h1.tmp"  # what a kill -9 during a write leaves behind
    stale.write_text("{")
    server = live_server({"DDM_PROFILES_DIR": str(profiles), "DDM_ADMIN_API_KEYS": "k1,k2"})
    assert not stale.exists()
    auth = {"Authorization": "Bearer k1"}
    r = httpx.post(
        f"{server.url}/v1/profiles",
        data={"name": "widgets"},
        files=_profile_files(),
        headers=auth,
        timeout=120,
    )  # 12 images computed: seconds on a busy host, past httpx's 5 s default
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{server.url}/v1/profiles/widgets", timeout=30).status_code == 401
    assert httpx.delete(f"{server.url}/v1/profiles/widgets", headers=auth, timeout=30).status_code == 204
    assert not (profiles / "widgets.json").exists()
    r = httpx.delete(f"{server.url}/v1/profiles/widgets", headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "profile_not_found"
    r = httpx.delete(f"{server.url}/v1/profiles/default", headers=auth, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "profile_conflict"
    assert httpx.delete(f"{server.url}/v1/profiles/..%2Fx", headers=auth, timeout=30).status_code in (
        404,
        422,
    )
    assert sorted(p.name for p in profiles.iterdir()) == ["default.json"]  # no temp file left either


def _progressive_jpeg(repeat_scans: int = 0) -> bytes:
    """A progressive JPEG; with ``repeat_scans`` its smallest scan is repeated that many times before EOI
    (libjpeg decodes each one: seconds of CPU from a few MB)."""
    rng = np.random.default_rng(3)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(
        out, "JPEG", progressive=True, quality=90
    )
    data = out.getvalue()
    end = data.rfind(b"\xff\xd9")
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    return data[:end] + min(scans, key=len) * repeat_scans + data[end:]


def test_decoding_is_bounded_per_image_and_per_request(server: LiveServer) -> None:
    jpeg = {"content-type": "image/jpeg"}
    hostile = _progressive_jpeg(repeat_scans=5000)
    assert len(hostile) < 20 * 1024 * 1024

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            url = f"{server.url}/v1/score"
            return await asyncio.gather(
                client.post(url, content=hostile, headers=jpeg),
                client.post(url, content=hostile, headers=jpeg),
                client.post(url, params={"timeout_s": 10}, content=_progressive_jpeg(), headers=jpeg),
            )

    first, second, ordinary = asyncio.run(scenario())
    for r in (first, second):  # refused from the markers, before any decoding
        assert r.status_code == 400 and "5010 scans" in r.json()["error"]["message"], r.text
    assert ordinary.status_code == 200, ordinary.text  # answered within its own 10 s deadline

    # MPO (phone cameras): scored as its first JPEG frame
    frame = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mpo = io.BytesIO()
    frame.save(mpo, "MPO", save_all=True, append_images=[frame.rotate(90)])
    r = httpx.post(f"{server.url}/v1/score", content=mpo.getvalue(), headers=jpeg, timeout=60)
    assert r.status_code == 200, r.text

    # nine images of 8.4 MP: each under the per-image cap, together over the request's 64 Mi-pixel budget
    big = io.BytesIO()
    Image.new("RGB", (4096, 2048)).save(big, "PNG")
    files = [("files", (f"{i}.png", big.getvalue(), "image/png")) for i in range(9)]
    batches = series(server, "anomaly_batch_size_count")
    r = httpx.post(f"{server.url}/v1/score", files=files, timeout=120)
    assert r.status_code == 413 and "DDM_MAX_REQUEST_PIXELS" in r.json()["error"]["message"], r.text
    assert series(server, "anomaly_batch_size_count") == batches
