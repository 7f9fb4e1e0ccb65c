"""The HTTP half of deploy/image-smoke.sh: checks a running ddm-anomaly service from the outside.

    python image_smoke_check.py score    BASE_URL   # README's example request: face.png + digit.png
    python image_smoke_check.py metrics  BASE_URL   # /metrics: ready, the scoring request counted
    python image_smoke_check.py inflight BASE_URL   # a larger request; prints IN-FLIGHT while it runs,
                                                    # then expects its full answer (SIGTERM drains it)

image-smoke.sh runs it with the image's own Python (`docker run -i ... python - MODE URL < this file`), so
it needs nothing on the host but Docker; tests/test_deploy_docker.py runs it against a local server. The
two images are made here: face.png is one of the shipped model's samples (a 64 px tile of
$DDM_MODEL_DIR/samples.png), digit.png a white "7" on black, which the CelebA model must flag (MNIST
AUROC 1.000 in docs/ACCURACY.md). Exit status 0 = passed; every failure says what was expected.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

SAMPLES = Path(os.environ.get("DDM_MODEL_DIR", "model_store/celeba32-ref")) / "samples.png"
FACE_TILE = (1, 1)  # column, row of the 8x2 grid of 64 px samples: a face the default profile scores low
# DDM_MAX_IMAGES_PER_REQUEST's default: long enough to be in flight on a CPU (the tests use fewer).
INFLIGHT_IMAGES = int(os.environ.get("SMOKE_INFLIGHT_IMAGES", "64"))


class SmokeFailure(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def face_png() -> bytes:
    column, row = FACE_TILE
    with Image.open(SAMPLES) as grid:
        tile = grid.convert("RGB").crop((column * 64, row * 64, column * 64 + 64, row * 64 + 64))
    return png(tile)


def digit_png() -> bytes:
    digit = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(digit).line([(7, 6), (21, 6), (12, 23)], fill=255, width=3)
    return png(digit)


def check_score_answer(answer: dict, names: list[str]) -> dict[str, dict]:
    """The README's example answer: one result per file, in order, each scored against the default profile."""
    results = answer.get("results")
    expect(isinstance(results, list) and len(results) == len(names), f"{len(names)} results: {answer}")
    by_id = {r.get("id"): r for r in results}
    expect([r.get("id") for r in results] == names, f"results in request order {names}: {answer}")
    for name, result in by_id.items():
        score, threshold = result.get("score"), result.get("threshold")
        expect(isinstance(score, (int, float)) and math.isfinite(score), f"{name}: a finite score: {result}")
        expect(
            isinstance(threshold, (int, float)) and math.isfinite(threshold), f"{name}: a threshold: {result}"
        )
        expect(isinstance(result.get("is_anomaly"), bool), f"{name}: a verdict: {result}")
    expect(
        answer.get("profile", {}).get("name") == "default", f"the default profile: {answer.get('profile')}"
    )
    expect(bool(answer.get("model", {}).get("id")), f"the model's id: {answer.get('model')}")
    return by_id


def score(base: str) -> str:
    files = [
        ("files", ("face.png", face_png(), "image/png")),
        ("files", ("digit.png", digit_png(), "image/png")),
    ]
    response = httpx.post(f"{base}/v1/score", files=files, timeout=120)
    expect(response.status_code == 200, f"POST /v1/score: 200, got {response.status_code}: {response.text}")
    answer = response.json()
    results = check_score_answer(answer, ["face.png", "digit.png"])
    face, digit = results["face.png"], results["digit.png"]
    expect(digit["is_anomaly"] is True, f"the digit flagged as anomalous: {digit}")
    expect(face["score"] < digit["score"], f"the face scored below the digit: {face} vs {digit}")
    model = answer["model"]
    return (
        f"scored: face {face['score']:.2f} (anomaly: {face['is_anomaly']}), digit {digit['score']:.2f} "
        f"(anomaly: {digit['is_anomaly']}), threshold {digit['threshold']:.2f}; model {model['id']} on "
        f"{model.get('device')} ({model.get('dtype')}, {model.get('runtime')})"
    )


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one metric in a Prometheus text exposition: (labels, value)."""
    found = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        metric, _, labels = series.partition("{")
        if metric == name:
            found.append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)), float(value)))
    return found


def metrics(base: str) -> str:
    response = httpx.get(f"{base}/metrics", timeout=30)
    expect(response.status_code == 200, f"GET /metrics: 200, got {response.status_code}")
    text = response.text
    expect([v for _, v in samples(text, "anomaly_ready")] == [1.0], "anomaly_ready 1 (model loaded and warm)")
    scored = sum(
        v for labels, v in samples(text, "anomaly_requests_total")
        if labels.get("endpoint") == "/v1/score" and labels.get("code") == "200"
    )  # fmt: skip
    expect(scored >= 1, 'anomaly_requests_total{endpoint="/v1/score",code="200"} counts the scoring request')
    images = {labels.get("outcome"): v for labels, v in samples(text, "anomaly_images_total")}
    expect(images.get("scored", 0) >= 2, f"anomaly_images_total{{outcome=scored}} >= 2: {images}")
    infos = [labels for labels, _ in samples(text, "anomaly_model_info")]
    expect(len(infos) == 1, f"one anomaly_model_info series naming the loaded model: {infos}")
    info = infos[0]
    return (
        f"metrics: {scored:.0f} scoring request(s), {images['scored']:.0f} image(s) scored; model_info {info}"
    )


def inflight(base: str) -> str:
    """Sends one large request and says IN-FLIGHT (stdout, flushed) once the service reports it in flight, so
    the caller can send SIGTERM; the request must still get its full answer (the drain)."""
    files = [("files", (f"face{i}.png", face_png(), "image/png")) for i in range(INFLIGHT_IMAGES)]
    outcome: dict[str, object] = {}

    def send() -> None:
        try:
            outcome["response"] = httpx.post(f"{base}/v1/score", files=files, timeout=300)
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while sender.is_alive() and time.monotonic() < deadline:
        # anomaly_inflight_requests counts this /metrics request too: 2 or more = the scoring request is in.
        try:
            text = httpx.get(f"{base}/metrics", timeout=10).text
        except httpx.HTTPError:
            break
        if sum(v for _, v in samples(text, "anomaly_inflight_requests")) >= 2:
            break
        time.sleep(0.05)
    print("IN-FLIGHT", flush=True)
    sender.join(timeout=300)
    expect("error" not in outcome, f"the in-flight request answered, not {outcome.get('error')!r}")
    response = outcome.get("response")
    expect(isinstance(response, httpx.Response), "the in-flight request finished within 300 s")
    assert isinstance(response, httpx.Response)
    expect(
        response.status_code == 200, f"in-flight request: 200, got {response.status_code}: {response.text}"
    )
    check_score_answer(response.json(), [f"face{i}.png" for i in range(INFLIGHT_IMAGES)])
    return f"in-flight request of {INFLIGHT_IMAGES} images answered in full (200)"


MODES = {"score": score, "metrics": metrics, "inflight": inflight}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MODES:
        print(__doc__, file=sys.stderr)
        return 2
    mode, base = argv[0], argv[1].rstrip("/")
    try:
        print(MODES[mode](base), flush=True)
    except (SmokeFailure, httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        print(f"FAILED ({mode}): {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
