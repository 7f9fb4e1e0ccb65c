"""A real Prometheus scrapes a real `ddm-anomaly serve` on 127.0.0.1: after a few scoring requests, a
PromQL query through Prometheus' HTTP API returns exactly that request count, and every query of the
provisioned Grafana dashboard evaluates to a non-empty result (traffic covers every panel: normal and
anomalous verdicts, a refusal, and a 500 from the test-only fault hook, so the 5xx ratio has a series)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import require_tool
from tests.test_deploy_monitoring import dashboard_queries, grafana_to_promql

pytestmark = [pytest.mark.live, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 3
FAULT_SIZE = (13, 17)
PROFILE_IMAGES = 12  # calibration needs at least 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def png_bytes(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A 32x32 RGB PNG: a smooth gradient plus seeded noise, different for every seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.3, 1.0, size=(1, 1, 3))
    pixels = np.clip(ramp + rng.normal(0, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until(check: Any, timeout: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{tail}")


@pytest.fixture
def live_service(tmp_path: Path) -> Iterator[str]:
    """`python -m app serve` on a free port of 127.0.0.1, CPU, shipped model, profiles in a temporary folder
    (open profile creation); yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDM_")}
    env.update(
        DDM_MODEL_DIR=str(ROOT / "model_store" / "celeba32-ref"),
        DDM_DEVICE="cpu",
        DDM_TORCH_THREADS="1",
        DDM_DRAIN_TIMEOUT_S="5",
        DDM_PROFILES_DIR=str(tmp_path / "profiles"),
        DDM_ALLOW_OPEN_PROFILE_CREATION="true",
        # tests/faults.py through the test entry point: a batch holding a 13x17 image fails with a 500
        DDM_TEST_FAULTS=f"fail={FAULT_SIZE[0]}x{FAULT_SIZE[1]}",
    )
    # the committed CelebA profile copied as "celeba" (served and counted under its file name): the golden
    # MNIST digit is an anomaly under it
    (tmp_path / "profiles").mkdir()
    celeba = (ROOT / "model_store" / "celeba32-ref" / "profiles" / "default.json").read_text()
    (tmp_path / "profiles" / "celeba.json").write_text(celeba)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_server", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, (
                f"server exited with {process.returncode}\n{log.read_text()[-3000:]}"
            )
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200

        wait_until(ready, 120, "/readyz", log)
        yield base
    finally:
        stop(process, timeout=20)


@pytest.fixture
def prometheus(tmp_path: Path, live_service: str) -> Iterator[str]:
    """Debian's Prometheus scraping the live service every second; yields its base URL."""
    binary = require_tool("prometheus", hint="Debian package `prometheus`; .ci/run installs it")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ddm-anomaly",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [live_service.removeprefix("http://")]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 30, "Prometheus", log)
        # a first scrape before any traffic: counters that move later then have a before and an after (a
        # counter first seen at 1 has no rate, and its dashboard panel would stay empty)
        wait_until(lambda: query(base, 'up{job="ddm-anomaly"} == 1'), 60, "Prometheus' first scrape", log)
        yield base
    finally:
        stop(process, timeout=10)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_the_request_count(live_service: str, prometheus: str) -> None:
    # A calibration profile first (the operator's step after deploying; counted on /v1/profiles).
    files = [("files", (f"normal{i}.png", png_bytes(100 + i), "image/png")) for i in range(PROFILE_IMAGES)]
    response = httpx.post(f"{live_service}/v1/profiles", data={"name": "default"}, files=files, timeout=120)
    assert response.status_code == 201, response.text
    for i in range(REQUESTS):
        files = {"files": (f"face{i}.png", png_bytes(i), "image/png")}
        response = httpx.post(f"{live_service}/v1/score", files=files, timeout=60)
        assert response.status_code == 200, response.text

    # the rest of the traffic the dashboard shows: an anomaly, a refusal and an engine failure (500)
    digit = (ROOT / "tests" / "goldens" / "images" / "mnist_000000.png").read_bytes()
    response = httpx.post(f"{live_service}/v1/score", params={"profile": "celeba"}, timeout=60,
                          files={"files": ("digit.png", digit, "image/png")})  # fmt: skip
    assert response.status_code == 200 and response.json()["results"][0]["is_anomaly"], response.text
    refused = httpx.post(f"{live_service}/v1/score", content=b"not an image", timeout=60,
                         headers={"content-type": "image/png"})  # fmt: skip
    assert refused.status_code == 415, refused.text
    failing = {"files": ("fault.png", png_bytes(7, FAULT_SIZE), "image/png")}
    assert httpx.post(f"{live_service}/v1/score", files=failing, timeout=60).status_code == 500
    sent = REQUESTS + 3

    promql = 'sum(anomaly_requests_total{endpoint="/v1/score"})'

    def counted() -> float | None:
        result = query(prometheus, promql)
        return float(result[0]["value"][1]) if result else None

    deadline = time.monotonic() + 30
    value = None
    while time.monotonic() < deadline and value != sent:
        value = counted()
        time.sleep(0.5)
    assert value == sent, f"{promql} = {value}, expected {sent}"
    (up,) = query(prometheus, 'up{job="ddm-anomaly"}')
    assert up["value"][1] == "1"

    # Every dashboard query evaluates against the real series (syntax, functions, label matchers) and
    # shows something: an empty result is a panel with a misspelt metric or label (rates need two scrapes
    # after the traffic, so each gets a bounded wait).
    # All queries are polled together under one bound: waiting for each in turn could let a 1m rate of
    # the single refusal or 500 age out before its panel's turn on a slow host.
    pending = {title: grafana_to_promql(expr) for title, expr in dashboard_queries().items()}
    deadline = time.monotonic() + 45
    while pending and time.monotonic() < deadline:
        pending = {title: expr for title, expr in pending.items() if not query(prometheus, expr)}
        if pending:
            time.sleep(0.5)
    empty = [f"{title}: {expr}" for title, expr in pending.items()]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    ready = query(prometheus, "max(anomaly_ready)")
    assert ready and ready[0]["value"][1] == "1"
    verdicts = query(prometheus, 'sum(anomaly_verdicts_total{profile="default"})')
    assert verdicts and float(verdicts[0]["value"][1]) == REQUESTS, query(
        prometheus, "sum by (profile, verdict) (anomaly_verdicts_total)"
    )
    (flagged,) = query(prometheus, 'sum(anomaly_verdicts_total{profile="celeba",verdict="anomaly"})')
    assert flagged["value"][1] == "1"
