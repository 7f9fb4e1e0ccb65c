"""Hostile input against one live server (real uvicorn, shipped model), every case generated here.

One module-scoped server: API keys on, 1 MiB body cap, 1 Mpx pixel cap, 8 images per request, K=2
trajectory steps (the shipped model; cheaper good-image checks); its "default" profile is created through
the API from 12 generated images. Each case is its own test id:

* refused cases get their documented status with a JSON error body whose ``request_id`` matches the
  ``X-Request-ID`` header and appears in the server log; ``anomaly_refusals_total`` moves by exactly one,
  under the case's reason and no other; no image reaches the model unless the case says so;
* accepted cases (valid but unusual images: 16-bit, CMYK, palette, animated, EXIF-rotated, ...) get 200
  with a finite score, and the same score as their reference image where one exists (EXIF-rotated ==
  upright, animated / multi-page == first frame);
* after every case the known good image still gets exactly the score it got at the start.

The module ends with schemathesis over the live OpenAPI schema. docs/RELIABILITY.md lists the cases.
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests import hostile_media as media
from tests.conftest import LiveServer
from tests.reliability_helpers import moved, samples, send_chunks_until_answered

pytestmark = [pytest.mark.slow, pytest.mark.live]

KEY = "reliability-input-key"
AUTH = {"authorization": f"Bearer {KEY}"}
CAP_BYTES = 1024 * 1024
CAP_PIXELS = 1024 * 1024
MAX_IMAGES = 8
GOOD = media.png(seed=7)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Send = Callable[[str], Answer]


@dataclass(frozen=True)
class Case:
    id: str
    send: Send
    status: int
    code: str = ""  # error code of a refusal
    reason: str = ""  # anomaly_refusals_total{reason} that must move by one
    computed: int = 0  # images that reach the model before the refusal
    reference: Callable[[], bytes] | None = None  # accepted: must score the same as this image


# --- sending -------------------------------------------------------------------------------------------
def request(
    method: str = "POST",
    path: str = "/v1/score",
    *,
    auth: bool = True,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    **body: Callable[[], Any],
) -> Send:
    """A request whose body parts (``content``, ``json``, ``files``, ``data``) are built when sent."""

    def send(url: str) -> Answer:
        built = {name: make() for name, make in body.items()}
        all_headers = {**(AUTH if auth else {}), **(headers or {})}
        r = httpx.request(method, url + path, headers=all_headers, params=params, timeout=60, **built)
        return Answer(r.status_code, dict(r.headers), r.content)

    return send


def raw(make: Callable[[], bytes], content_type: str | None = "image/png", **kw: Any) -> Send:
    headers = {"content-type": content_type} if content_type else {}
    return request(content=make, headers={**headers, **kw.pop("headers", {})}, **kw)


def multipart(*parts: tuple[str, str, Callable[[], bytes]], **kw: Any) -> Send:
    return request(files=lambda: [("files", (name, make(), ctype)) for name, ctype, make in parts], **kw)


def as_json(make: Callable[[], Any], **kw: Any) -> Send:
    return request(json=make, **kw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parts_body(count: int, *, files: bool) -> bytes:
    """A multipart body of ``count`` tiny parts (files or plain fields), boundary ``b``."""
    one = (
        b'--b\r\nContent-Disposition: form-data; name="files"; filename="%d.png"\r\n'
        b"Content-Type: image/png\r\n\r\nx\r\n"
        if files
        else b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n'
    )
    return b"".join(one % i for i in range(count)) + b"--b--\r\n"


def _socket_for(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_answer(sock: socket.socket, first: bytes = b"") -> Answer:
    data = first
    sock.settimeout(30)
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return Answer(int(lines[0].split()[1]), headers, body)


STREAMED: dict[str, int] = {}  # bytes the client managed to send before each socket case was answered


def chunked_over_cap(url: str) -> Answer:
    """A chunked body (no Content-Length) of up to 8x the cap: the answer must come after about the cap."""
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with _socket_for(url) as sock:
        sock.sendall(head)
        sent, first = send_chunks_until_answered(sock, 8 * CAP_BYTES)
        STREAMED["chunked"] = sent
        return _read_answer(sock, first)


def slow_upload(url: str) -> Answer:
    """Declares 100 kB, then trickles 64 bytes every 0.1 s under a 1 s deadline: 504 while still sending."""
    head = (
        f"POST /v1/score?timeout_s=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    sent, first = 0, b""
    started = time.monotonic()
    with _socket_for(url) as sock:
        sock.sendall(head + GOOD[:64])
        while time.monotonic() - started < 10 and not first:
            sock.settimeout(0.1)
            try:
                first = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"\0" * 64)
                    sent += 64
                except (BrokenPipeError, ConnectionResetError):
                    break
        STREAMED["slow"] = sent
        STREAMED["slow_ms"] = int(1000 * (time.monotonic() - started))
        return _read_answer(sock, first)


# --- the cases -----------------------------------------------------------------------------------------
PNG_TYPE = "image/png"


DEFAULT_REASON = {400: "bad_input", 401: "unauthorized", 404: "not_found", 405: "bad_input", 413: "too_large",
                  415: "unsupported_media_type", 422: "validation", 504: "timeout"}  # fmt: skip


def _bad(id: str, send: Send, status: int, code: str, reason: str | None = None, computed: int = 0) -> Case:
    return Case(id, send, status, code, reason or DEFAULT_REASON[status], computed)


def _profile(name: str, images: int = 1, **kw: Any) -> Send:
    files = lambda: [("files", (f"{i}.png", media.png(200 + i), PNG_TYPE)) for i in range(images)]  # noqa: E731
    return request(path="/v1/profiles", data=lambda: {"name": name}, files=files, **kw)


REFUSED: list[Case] = [
    # bodies and content types
    _bad("empty-raw-body", raw(lambda: b""), 400, "bad_input"),
    _bad("empty-multipart", raw(lambda: b"--b--\r\n", "multipart/form-data; boundary=b"), 400, "bad_input"),
    _bad("empty-json-body", raw(lambda: b"", "application/json"), 422, "validation"),
    _bad("multipart-without-boundary", raw(media.png, "multipart/form-data"), 400, "bad_input"),
    _bad("no-content-type", raw(media.png, None), 415, "unsupported_media_type"),
    _bad("text-plain", raw(media.png, "text/plain"), 415, "unsupported_media_type"),
    _bad(
        "form-urlencoded",
        raw(lambda: b"a=1", "application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
    ),
    _bad("svg-content-type", raw(lambda: media.SVG, "image/svg+xml"), 415, "unsupported_media_type"),
    # not images, or not allowed formats, posing as PNG
    _bad("random-bytes-raw", raw(media.random_bytes), 415, "unsupported_media_type"),
    _bad(
        "random-bytes-multipart",
        multipart(("r.png", PNG_TYPE, media.random_bytes)),
        415,
        "unsupported_media_type",
    ),
    _bad(
        "random-bytes-json",
        as_json(lambda: {"images": [{"data": b64(media.random_bytes())}]}),
        415,
        "unsupported_media_type",
    ),
    _bad("svg-as-png", raw(lambda: media.SVG), 415, "unsupported_media_type"),
    _bad("html-as-png", raw(lambda: media.HTML), 415, "unsupported_media_type"),
    _bad("pdf-as-png", raw(lambda: media.PDF), 415, "unsupported_media_type"),
    _bad("ppm-not-allowed", raw(lambda: media.encode(media.pattern(), "PPM")), 415, "unsupported_media_type"),
    _bad("ico-not-allowed", raw(lambda: media.encode(media.pattern(), "ICO")), 415, "unsupported_media_type"),
    _bad("png-signature-only", raw(lambda: media.png()[:8]), 415, "unsupported_media_type"),
    # broken images
    _bad("truncated-png", raw(lambda: media.truncated(media.png())), 400, "bad_input"),
    _bad(
        "truncated-jpeg",
        raw(lambda: media.truncated(media.encode(media.pattern(64, 64), "JPEG"))),
        400,
        "bad_input",
    ),
    _bad("corrupt-png-data", raw(media.png_corrupt_data), 400, "bad_input"),
    _bad("png-text-chunk-bomb", raw(media.png_text_bomb), 400, "bad_input"),
    # decompression bombs: tiny files declaring huge dimensions
    _bad("bomb-png-100000x100000", raw(lambda: media.png_declaring(100_000, 100_000)), 413, "too_large"),
    _bad(
        "bomb-gif-65000x65000",
        raw(lambda: media.gif_declaring(65_000, 65_000), "image/gif"),
        413,
        "too_large",
    ),
    _bad(
        "bomb-jpeg-60000x60000",
        raw(lambda: media.jpeg_declaring(60_000, 60_000), "image/jpeg"),
        413,
        "too_large",
    ),
    _bad(
        "bomb-bmp-60000x60000",
        raw(lambda: media.bmp_declaring(60_000, 60_000), "image/bmp"),
        413,
        "too_large",
    ),
    _bad(
        "bomb-tiff-100000x100000",
        raw(lambda: media.tiff_declaring(100_000, 100_000), "image/tiff"),
        413,
        "too_large",
    ),
    _bad("header-2000x2000-over-pixel-cap", raw(lambda: media.png_declaring(2000, 2000)), 413, "too_large"),
    _bad("real-1100x1000-over-pixel-cap", raw(lambda: media.at_pixel_cap(1100)), 413, "too_large"),
    # sizes
    _bad("1x1", raw(lambda: media.png(width=1, height=1)), 400, "bad_input"),
    _bad("7x7-under-min-side", raw(lambda: media.png(width=7, height=7)), 400, "bad_input"),
    _bad("aspect-400x8", raw(lambda: media.png(width=400, height=8)), 400, "bad_input"),
    _bad("aspect-8x400", raw(lambda: media.png(width=8, height=400)), 400, "bad_input"),
    _bad(
        "good-then-truncated-multipart",
        multipart(("a.png", PNG_TYPE, media.png), ("b.png", PNG_TYPE, lambda: media.truncated(media.png()))),
        400,
        "bad_input",
    ),
    # JSON
    _bad("invalid-base64", as_json(lambda: {"images": [{"data": "!!!not base64!!!"}]}), 400, "bad_input"),
    _bad(
        "invalid-base64-data-url",
        as_json(lambda: {"images": [{"data": "data:image/png;base64,@@@"}]}),
        400,
        "bad_input",
    ),
    _bad("json-wrong-type", as_json(lambda: {"images": [{"data": 123}]}), 422, "validation"),
    _bad("json-malformed", raw(lambda: b'{"images": [', "application/json"), 422, "validation"),
    _bad("json-no-images", as_json(lambda: {"images": []}), 422, "validation"),
    _bad(
        "json-unknown-field",
        as_json(lambda: {"images": [{"data": b64(media.png())}], "x": 1}),
        422,
        "validation",
    ),
    _bad(
        "json-nested-5000-deep",
        raw(lambda: b'{"images": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
        422,
        "validation",
    ),
    _bad(
        "json-too-many-images",
        as_json(lambda: {"images": [{"data": b64(media.png(i))} for i in range(9)]}),
        413,
        "too_large",
    ),
    # multipart
    _bad(
        "multipart-9-files",
        multipart(*[(f"{i}.png", PNG_TYPE, media.png) for i in range(9)]),
        413,
        "too_large",
    ),
    _bad(
        "multipart-5000-file-parts",
        raw(lambda: parts_body(5000, files=True), "multipart/form-data; boundary=b"),
        413,
        "too_large",
    ),
    _bad(
        "multipart-3000-fields",
        raw(lambda: parts_body(3000, files=False), "multipart/form-data; boundary=b"),
        413,
        "too_large",
    ),
    _bad(
        "multipart-wrong-part-name",
        request(files=lambda: [("image", ("a.png", media.png(), PNG_TYPE))]),
        400,
        "bad_input",
    ),
    _bad(
        "multipart-files-as-plain-field",
        raw(
            lambda: b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
        ),
        400,
        "bad_input",
    ),
    _bad(
        "form-explain-maybe",
        request(
            data=lambda: {"explain": "maybe"}, files=lambda: [("files", ("a.png", media.png(), PNG_TYPE))]
        ),
        400,
        "bad_input",
    ),
    # byte cap and slow clients
    _bad("content-length-over-cap", raw(lambda: b"\0" * (CAP_BYTES + 1)), 413, "too_large"),
    _bad("chunked-over-cap-cut-while-streaming", chunked_over_cap, 413, "too_large"),
    _bad("slow-upload-past-deadline", slow_upload, 504, "timeout"),
    # query options and profile names (the schema's name pattern: 422 before any image is read)
    _bad("profile-path-traversal", raw(media.png, params={"profile": "../../etc/passwd"}), 422, "validation"),
    _bad("profile-unicode", raw(media.png, params={"profile": "café"}), 422, "validation"),
    _bad(
        "profile-fullwidth-letters", raw(media.png, params={"profile": "ｄｅｆａｕｌｔ"}), 422, "validation"
    ),
    _bad("profile-nul-byte", raw(media.png, params={"profile": "default\x00.json"}), 422, "validation"),
    _bad("profile-name-65-chars", raw(media.png, params={"profile": "a" * 65}), 422, "validation"),
    _bad("profile-name-82-chars", raw(media.png, params={"profile": "a" * 82}), 422, "validation"),
    _bad("profile-unknown", raw(media.png, params={"profile": "nosuchprofile"}), 404, "profile_not_found"),
    _bad("timeout-zero", raw(media.png, params={"timeout_s": "0"}), 422, "validation"),
    _bad("timeout-under-the-minimum", raw(media.png, params={"timeout_s": "0.5"}), 422, "validation"),
    _bad("timeout-nan", raw(media.png, params={"timeout_s": "nan"}), 422, "validation"),
    _bad("explain-maybe", raw(media.png, params={"explain": "maybe"}), 422, "validation"),
    _bad("create-profile-traversal-name", _profile("../evil"), 400, "bad_input"),
    _bad("create-profile-unicode-name", _profile("名前"), 400, "bad_input"),
    _bad("create-profile-hidden-name", _profile(".hidden"), 400, "bad_input"),
    _bad("create-profile-slash-name", _profile("a/b"), 400, "bad_input"),
    _bad("create-profile-65-char-name", _profile("p" * 65), 400, "bad_input"),
    _bad("create-profile-name-taken", _profile("default"), 409, "profile_conflict", "bad_input"),
    _bad("create-profile-3-images", _profile("tiny", images=3), 400, "bad_input", computed=3),
    # auth
    _bad("no-api-key", raw(media.png, auth=False), 401, "unauthorized"),
    _bad(
        "wrong-api-key",
        raw(media.png, auth=False, headers={"authorization": "Bearer wrong"}),
        401,
        "unauthorized",
    ),
    _bad(
        "api-key-prefix",
        raw(media.png, auth=False, headers={"authorization": f"Bearer {KEY[:-1]}"}),
        401,
        "unauthorized",
    ),
    _bad(
        "api-key-plus-suffix",
        raw(media.png, auth=False, headers={"authorization": f"Bearer {KEY}x"}),
        401,
        "unauthorized",
    ),
    _bad(
        "api-key-as-query-param",
        raw(media.png, auth=False, params={"api_key": KEY, "token": KEY}),
        401,
        "unauthorized",
    ),
    _bad(
        "api-key-basic-scheme",
        raw(media.png, auth=False, headers={"authorization": f"Basic {KEY}"}),
        401,
        "unauthorized",
    ),
    _bad("api-key-in-x-api-key", raw(media.png, auth=False, headers={"x-api-key": KEY}), 401, "unauthorized"),
    _bad("models-without-key", request("GET", "/v1/models", auth=False), 401, "unauthorized"),
    _bad("create-profile-without-key", _profile("newone", auth=False), 401, "unauthorized"),
    # routes and methods
    _bad("get-on-score", request("GET"), 405, "method_not_allowed"),
    _bad("put-on-profiles", request("PUT", "/v1/profiles"), 405, "method_not_allowed"),
    _bad("unknown-route", request("GET", "/v1/../../etc/passwd"), 404, "not_found"),
]


def _rotated_png() -> bytes:
    return media.exif_rotated("PNG", media.pattern(seed=3))


def _rotated_jpeg() -> bytes:
    return media.exif_rotated("JPEG", media.pattern(seed=4), quality=95)


def _rotated_webp() -> bytes:
    return media.exif_rotated("WEBP", media.pattern(seed=5), lossless=True)


def _gif() -> bytes:
    return media.frames("GIF")


def _tiff() -> bytes:
    return media.frames("TIFF")


def _png_mode(mode: str) -> Callable[[], bytes]:
    return lambda: media.encode(media.pattern(seed=9).convert(mode), "PNG")


def _ok(id: str, send: Send, reference: Callable[[], bytes] | None = None) -> Case:
    return Case(id, send, 200, reference=reference)


ACCEPTED: list[Case] = [
    _ok("16-bit-grayscale-png", raw(media.gray16)),
    _ok("32-bit-integer-tiff", raw(media.int32_tiff, "image/tiff")),
    _ok("32-bit-float-tiff", raw(media.float_tiff, "image/tiff")),
    _ok("cmyk-jpeg", raw(lambda: media.encode(media.pattern().convert("CMYK"), "JPEG"), "image/jpeg")),
    _ok("palette-with-transparency-png", raw(media.palette_transparent)),
    _ok("animated-gif-scores-first-frame", raw(_gif, "image/gif"), lambda: media.first_frame_png(_gif())),
    _ok("multipage-tiff-scores-first-page", raw(_tiff, "image/tiff"), lambda: media.first_frame_png(_tiff())),
    _ok(
        "exif-rotated-png-equals-upright",
        raw(_rotated_png),
        lambda: media.encode(media.pattern(seed=3), "PNG"),
    ),
    _ok(
        "exif-rotated-jpeg-equals-upright",
        raw(_rotated_jpeg, "image/jpeg"),
        lambda: media.upright_png(_rotated_jpeg()),
    ),
    _ok(
        "exif-rotated-webp-equals-upright",
        raw(_rotated_webp, "image/webp"),
        lambda: media.encode(media.pattern(seed=5), "PNG"),
    ),
    _ok("grayscale-png", raw(_png_mode("L"))),
    _ok("grayscale-alpha-png", raw(_png_mode("LA"))),
    _ok("1-bit-png", raw(_png_mode("1"))),
    _ok("rgba-png", raw(_png_mode("RGBA"))),
    _ok("webp", raw(lambda: media.encode(media.pattern(), "WEBP"), "image/webp")),
    _ok("bmp", raw(lambda: media.encode(media.pattern(), "BMP"), "image/bmp")),
    _ok("jpeg-labelled-png", raw(lambda: media.encode(media.pattern(), "JPEG"))),
    _ok("8x8-min-side", raw(lambda: media.png(width=8, height=8))),
    _ok("256x8-aspect-32", raw(lambda: media.png(width=256, height=8))),
    _ok("1024x1024-at-pixel-cap", raw(lambda: media.at_pixel_cap(1024))),
    _ok("png-without-iend", raw(lambda: media.png()[:-12])),
    _ok(
        "json-data-url-urlsafe-base64",
        as_json(
            lambda: {"images": [{"data": "data:image/png;base64," + base64.urlsafe_b64encode(GOOD).decode()}]}
        ),
        lambda: GOOD,
    ),
]


# --- the server ----------------------------------------------------------------------------------------
@dataclass
class Served:
    live: LiveServer
    good_score: float

    @property
    def url(self) -> str:
        return self.live.url


def score_of(url: str, data: bytes) -> float:
    r = httpx.post(f"{url}/v1/score", content=data, headers={"content-type": PNG_TYPE, **AUTH}, timeout=60)
    assert r.status_code == 200, r.text
    score = r.json()["results"][0]["score"]
    assert isinstance(score, float) and math.isfinite(score), r.text
    return score


@pytest.fixture(scope="module")
def server(live_server_module: Callable[..., LiveServer]) -> Served:
    live = live_server_module(
        {
            "DDM_API_KEYS": KEY,
            "DDM_ADMIN_API_KEYS": KEY,  # the one key scores and administers profiles here
            "DDM_MAX_UPLOAD_BYTES": str(CAP_BYTES),
            "DDM_MAX_IMAGE_PIXELS": str(CAP_PIXELS),
            "DDM_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
            "DDM_MAX_PROFILE_UPLOAD_BYTES": str(4 * CAP_BYTES),
            "DDM_MAX_BATCH_DELAY_MS": "1",
            "DDM_REQUEST_TIMEOUT_S": "30",
            # two trajectory steps instead of ten: the real model and path, a fifth of the compute per check
            "DDM_STEPS": "2",
        }
    )
    files = [("files", (f"ref{i}.png", media.png(100 + i), PNG_TYPE)) for i in range(12)]
    created = httpx.post(
        f"{live.url}/v1/profiles", data={"name": "default"}, files=files, headers=AUTH, timeout=120
    )
    assert created.status_code == 201, created.text
    return Served(live, score_of(live.url, GOOD))


def still_good(server: Served) -> None:
    assert score_of(server.url, GOOD) == pytest.approx(server.good_score, rel=1e-6, abs=1e-9)


# --- the tests -----------------------------------------------------------------------------------------
def test_at_least_40_distinct_cases() -> None:
    ids = [c.id for c in REFUSED + ACCEPTED]
    assert len(set(ids)) == len(ids) and len(REFUSED) >= 40


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refused_with_its_status_json_error_and_one_count(server: Served, case: Case) -> None:
    before = samples(server.url)
    answer = case.send(server.url)
    after = samples(server.url)
    assert answer.status == case.status, answer.body[:300]
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == case.code and error["message"]
    assert error["request_id"] == answer.headers["x-request-id"]
    assert b"Traceback" not in answer.body and b'File "' not in answer.body
    log = server.live.log()
    assert f"[request_id={error['request_id']}]" in log
    assert KEY not in log  # not even from ?api_key=... (the access log redacts it)
    assert moved(before, after, "anomaly_refusals_total") == {f'{{reason="{case.reason}"}}': 1.0}
    assert moved(before, after, "anomaly_images_total").get('{outcome="scored"}', 0.0) == case.computed
    if case.status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"
    if case.id == "chunked-over-cap-cut-while-streaming":
        print(f"\n{case.id}: answered after {STREAMED['chunked']} bytes sent (cap {CAP_BYTES})")
        assert STREAMED["chunked"] <= 2 * CAP_BYTES  # refused near the cap, not after reading 8 MiB
    if case.id == "slow-upload-past-deadline":
        print(
            f"\n{case.id}: answered after {STREAMED['slow_ms']} ms, {STREAMED['slow']} of 100000 bytes sent"
        )
        assert STREAMED["slow_ms"] < 5000 and STREAMED["slow"] < 100_000
    still_good(server)


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_unusual_but_valid_image_gets_a_finite_score(server: Served, case: Case) -> None:
    before = samples(server.url)
    answer = case.send(server.url)
    after = samples(server.url)
    assert answer.status == 200, answer.body[:300]
    result = answer.json()["results"][0]
    assert isinstance(result["score"], float) and math.isfinite(result["score"])
    assert isinstance(result["is_anomaly"], bool)
    assert moved(before, after, "anomaly_refusals_total") == {}
    assert moved(before, after, "anomaly_images_total") == {'{outcome="scored"}': 1.0}
    if case.reference is not None:
        assert result["score"] == pytest.approx(score_of(server.url, case.reference()), rel=1e-6, abs=1e-9)
    still_good(server)


def test_request_id_from_the_client_is_not_reflected_unless_plain(server: Served) -> None:
    for hostile in ("<script>alert(1)</script>", "a" * 65, "id with spaces", "x\u2028y"):
        headers = {**AUTH, "content-type": PNG_TYPE, "x-request-id": hostile.encode("utf-8")}
        r = httpx.post(f"{server.url}/v1/score", content=b"", timeout=30, headers=headers)
        assert r.status_code == 400
        assert r.headers["x-request-id"] != hostile and re.fullmatch(
            r"[0-9a-f]{16}", r.headers["x-request-id"]
        )
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


# --- fuzzing the OpenAPI schema ------------------------------------------------------------------------
FUZZ_EXAMPLES = {"POST /v1/score": 90, "POST /v1/profiles": 50}  # per generation mode; others: 10


def test_openapi_schema_fuzzing(server: Served) -> None:
    """schemathesis over the live schema, positive and negative data: never a 5xx, and every answer's
    status, content type, headers and body conform to the schema."""
    import schemathesis
    from schemathesis import checks
    from schemathesis.generation import GenerationMode

    def tiny_deadline_504(response: Any) -> bool:
        """The documented 504 for a deadline the client itself set near the schema's minimum (1 s): on a
        busy host one image may take longer. Deadlines below the minimum are refused with 422."""
        sent_query = parse_qs(urlsplit(str(response.request.url)).query)
        try:
            asked = float(sent_query.get("timeout_s", ["inf"])[0])
        except ValueError:
            asked = math.inf
        return response.status_code == 504 and asked < 5.0

    @schemathesis.check
    def no_server_fault(ctx: Any, response: Any, case: Any) -> None:
        """No 5xx, except a 504 the client asked for."""
        if not tiny_deadline_504(response):
            assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"

    @schemathesis.check
    def invalid_data_refused(ctx: Any, response: Any, case: Any) -> None:
        """schemathesis' negative-data check, except that 413 also counts as a rejection (a fuzzed multipart
        body with many parts is rightly refused as too large before its fields are read), as does the 504
        a tiny fuzzed timeout_s asks for."""
        if response.status_code != 413 and not tiny_deadline_504(response):
            checks.negative_data_rejection(ctx, response, case)

    schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
    chosen = [
        no_server_fault,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
        invalid_data_refused,
    ]
    # Not positive_data_acceptance: a schema-valid body may carry base64 that is no image (or no base64),
    # which is a correct 400/415, not a failure. Everything else schemathesis checks by default applies.
    # not_a_server_error is replaced by no_server_fault: fuzzed timeout_s values like 5e-324 rightly get 504.
    # negative_data_rejection is replaced by invalid_data_refused (413 is a rejection too).
    excluded = [checks.positive_data_acceptance, checks.not_a_server_error, checks.negative_data_rejection]
    before = samples(server.url)
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            calls: list[int] = []  # mutated by ``run``

            @settings(max_examples=FUZZ_EXAMPLES.get(label, 10), deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                case.call_and_validate(
                    base_url=server.url, headers=AUTH, checks=chosen, excluded_checks=excluded, timeout=60
                )
                calls.append(1)  # noqa: B023

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body): no negative cases
                assert mode is GenerationMode.NEGATIVE, label
            sent += len(calls)
    after = samples(server.url)
    server_errors = {
        k: v
        for k, v in moved(before, after, "anomaly_requests_total").items()
        if re.search(r'code="5(?!04)', k)
    }
    assert server_errors == {}
    assert sent >= 200, sent
    print(f"schemathesis: {sent} requests")
    still_good(server)
