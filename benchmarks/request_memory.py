"""Peak memory of a live server under concurrent maximal requests, per endpoint family.

    python -m benchmarks.request_memory --json benchmarks/results/request_memory/2026-12-07-cpu.json

Starts ``python -m app serve`` (the shipped model, one torch thread, a free port) once per scenario, so
that each peak (``VmHWM`` of the server process) is that scenario's own. A scenario sends ``--clients``
requests at once, each the largest body of its family that is accepted (every byte parsed, every image
decoded at full size and scored): just under its body cap, holding 4096×4096 images (the per-image pixel
cap; four of them are exactly the per-request pixel budget ``DDM_MAX_REQUEST_PIXELS``):

- ``json`` / ``multipart``: ``POST /v1/score``, four photo-like JPEGs as base64 JSON or ``files`` parts;
- ``deep``: ``POST /v1/score``, four 16-bit grayscale PNGs (small files, the costliest mode to convert);
- ``v2-json`` / ``v2-binary``: ``POST /v2/models/{name}/infer``, the JPEGs as base64 BYTES or in the binary
  tensor extension;
- ``v2-parameters-flood``: a /v2 body of 1.6 M ``parameters`` keys (refused with 413: what it costs first);
- ``profile-open``: ``POST /v1/profiles`` anonymously (open creation: the scoring cap), three 4096² JPEGs
  and seven thumbnails (ten, the fewest a profile takes; a fourth large image would pass the pixel budget);
- ``profile-admin``: ``POST /v1/profiles`` with an admin key, a JSON body just under the admin cap.

Reported: resident memory when idle (after one small warm-up request), the peak while the requests run,
the resident memory once they are answered, the answers' statuses (0: the connection closed before an
answer was read, as for a creation refused before its body was read) and the slowest latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.service_load import spawn_server

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = ROOT / "model_store" / "celeba32-ref" / "profiles" / "default.json"
UPLOAD_CAP = 20 * 1024 * 1024
SIDE = 4096
IMAGES = 4
BOUNDARY = "request-memory-boundary"
PROFILE_CAP = 64 * 1024 * 1024  # DDM_MAX_PROFILE_UPLOAD_BYTES (admin keys)
V2_INFER = "/v2/models/celeba32-ref/infer"
SCENARIOS = (
    "json",
    "multipart",
    "deep",
    "v2-json",
    "v2-binary",
    "v2-parameters-flood",
    "profile-open",
    "profile-admin",
)
NOISE = 12.0  # grey levels of noise: enough detail that four images at high quality fill the body cap


def photo_jpeg(seed: int, target_bytes: int) -> bytes:
    """A photo-like 4096² JPEG (gradients, soft shapes, sensor-like noise) at the highest quality within
    ``target_bytes`` (found by bisection)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:512, 0:512].astype(np.float32) / 512
    base = np.stack([255 * x, 255 * y, 127 * (x + y)], -1)
    for _ in range(12):
        cx, cy, r = rng.random(3)
        base += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + 0.05 * r))[..., None] * rng.uniform(
            -90, 90, 3
        )
    smooth = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize(
        (SIDE, SIDE), Image.Resampling.BICUBIC
    )
    noisy = (
        np.asarray(smooth, dtype=np.float32) + rng.standard_normal((SIDE, SIDE, 3), dtype=np.float32) * NOISE
    )
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    def encode(quality: int) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return out.getvalue()

    low, high = 5, 101  # encode(low) fits; find the highest quality that does
    best = encode(low)
    assert len(best) <= target_bytes, "no quality fits the target size"
    while high - low > 1:
        middle = (low + high) // 2
        data = encode(middle)
        if len(data) <= target_bytes:
            low, best = middle, data
        else:
            high = middle
    return best


@dataclass
class Scenario:
    body: bytes
    content_type: str
    path: str = "/v1/score"
    headers: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)  # the server's, besides the defaults


def multipart(files: list[tuple[str, bytes, str]], name: str | None = None) -> tuple[bytes, str]:
    field = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n' if name else ""
    parts = field.encode() + b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data, kind in files
    )
    return parts + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def thumbnail(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def deep_png(seed: int) -> bytes:
    """A 4096² 16-bit grayscale PNG (mode I;16): small on the wire, the costliest mode to convert."""
    ramp = ((np.arange(SIDE * SIDE, dtype=np.uint32) + seed * 977) % 65536).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(ramp.reshape(SIDE, SIDE)).save(out, format="PNG")
    return out.getvalue()


def bodies(names: list[str]) -> dict[str, Scenario]:
    """The body of each scenario: the largest one the server accepts (or, for a flood, refuses last)."""
    margin = 64 * 1024
    raw = [photo_jpeg(i, (UPLOAD_CAP - margin) // IMAGES) for i in range(IMAGES)]
    small = [photo_jpeg(i, (UPLOAD_CAP - margin) * 3 // 4 // IMAGES) for i in range(IMAGES)]
    b64 = [base64.b64encode(d).decode() for d in small]
    thumbs = [thumbnail(10 + i) for i in range(7)]  # with three large images: the 10 a profile needs
    out: dict[str, Scenario] = {}
    for name in names:
        if name == "json":
            out[name] = Scenario(
                json.dumps({"images": [{"data": d} for d in b64]}).encode(), "application/json"
            )
        elif name == "multipart":
            out[name] = Scenario(*multipart([(f"{i}.jpg", d, "image/jpeg") for i, d in enumerate(raw)]))
        elif name == "deep":
            out[name] = Scenario(*multipart([(f"{i}.png", deep_png(i), "image/png") for i in range(IMAGES)]))
        elif name == "v2-json":
            tensor = {"name": "images", "shape": [IMAGES], "datatype": "BYTES", "data": b64}
            out[name] = Scenario(json.dumps({"inputs": [tensor]}).encode(), "application/json", V2_INFER)
        elif name == "v2-binary":
            blob = b"".join(struct.pack("<I", len(d)) + d for d in raw)
            tensor = {"name": "images", "shape": [IMAGES], "datatype": "BYTES"}
            tensor["parameters"] = {"binary_data_size": len(blob)}
            header = json.dumps({"inputs": [tensor]}).encode()
            headers = {"inference-header-content-length": str(len(header))}
            out[name] = Scenario(header + blob, "application/octet-stream", V2_INFER, headers)
        elif name == "v2-parameters-flood":  # refused (413); what the server holds before it refuses
            keys = ",".join(f'"k{i}":0' for i in range(1_600_000))
            out[name] = Scenario(
                f'{{"parameters": {{{keys}}}, "inputs": []}}'.encode(), "application/json", V2_INFER
            )
        elif name == "profile-open":
            # three: with the thumbnails, four 4096² images would pass the pixel budget of a chunk
            big = [photo_jpeg(30 + i, (UPLOAD_CAP - margin) // 3) for i in range(3)]
            files = [(f"{i}.jpg", d, "image/jpeg") for i, d in enumerate(big + thumbs)]
            body, kind = multipart(files, name="open")
            settings = {"DDM_ALLOW_OPEN_PROFILE_CREATION": "true"}
            out[name] = Scenario(body, kind, "/v1/profiles", settings=settings)
        elif name == "profile-admin":
            # three: with the thumbnails, four 4096² images would pass the pixel budget of a chunk
            big = [photo_jpeg(20 + i, (PROFILE_CAP - margin) * 3 // 4 // 3) for i in range(3)]
            images = [{"data": base64.b64encode(d).decode()} for d in big + thumbs]
            body = json.dumps({"name": "admin", "images": images}).encode()
            auth = {"authorization": "Bearer memory-admin"}
            out[name] = Scenario(
                body, "application/json", "/v1/profiles", auth, {"DDM_ADMIN_API_KEYS": "memory-admin"}
            )
    for name, scenario in out.items():
        cap = PROFILE_CAP if name == "profile-admin" else UPLOAD_CAP
        assert len(scenario.body) <= cap, (name, len(scenario.body))
    return out


def start_server(settings: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    profiles = workdir / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEFAULT_PROFILE, profiles / "default.json")
    env = {
        "DDM_TORCH_THREADS": "1",
        "DDM_LOG_LEVEL": "warning",
        "DDM_REQUEST_TIMEOUT_S": "600",  # every request is computed: the peak of the whole work is measured
        **settings,
    }
    return spawn_server(env, workdir)


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since start) of a process, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


async def send_all(url: str, scenario: Scenario, clients: int) -> list[tuple[int, float]]:
    headers = {"content-type": scenario.content_type, **scenario.headers}

    async def one(client: httpx.AsyncClient) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            r = await client.post(f"{url}{scenario.path}", content=scenario.body, headers=headers)
        except httpx.TransportError:  # refused before its body was read: the connection closed under it
            return 0, time.monotonic() - t0
        return r.status_code, time.monotonic() - t0

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients)) as client:
        return list(await asyncio.gather(*(one(client) for _ in range(clients))))


def measure(name: str, scenario: Scenario, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    settings = {**scenario.settings, **dict(s.split("=", 1) for s in args.setting)}
    process, url = start_server(settings, workdir)
    try:
        warm = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 150)).save(warm, "PNG")
        answer = httpx.post(
            f"{url}/v1/score", content=warm.getvalue(), headers={"content-type": "image/png"}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        time.sleep(1.0)
        idle = memory_mib(process.pid)
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(memory_mib(process.pid)["VmRSS"])
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        answers = asyncio.run(send_all(url, scenario, args.clients))
        seconds = time.monotonic() - t0
        done.set()
        sampler.join()
        peak = memory_mib(process.pid)["VmHWM"]
        time.sleep(2.0)
        after = memory_mib(process.pid)["VmRSS"]
        statuses: dict[str, int] = {}
        for status, _ in answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        row = {
            "scenario": name,
            "clients": args.clients,
            "path": scenario.path,
            "body_bytes": len(scenario.body),
            "images_per_request": IMAGES,
            "rss_idle_mib": round(idle["VmRSS"], 1),
            "peak_mib": round(peak, 1),
            "peak_over_idle_mib": round(peak - idle["VmRSS"], 1),
            "peak_over_idle_per_request_mib": round((peak - idle["VmRSS"]) / args.clients, 1),
            "rss_after_mib": round(after, 1),
            "sampled_max_rss_mib": round(max(samples, default=0.0), 1),
            "statuses": statuses,
            "slowest_s": round(max(s for _, s in answers), 1),
            "seconds": round(seconds, 1),
        }
        print(json.dumps(row), flush=True)
        return row
    finally:
        process.terminate()
        process.wait(120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="requests sent at once per scenario")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--setting", action="append", default=[], metavar="DDM_X=VALUE", help="server setting")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    made = bodies(args.scenarios)
    with tempfile.TemporaryDirectory(prefix="request-memory-") as tmp:
        rows = [measure(name, made[name], args, Path(tmp) / name) for name in args.scenarios]
    result = {
        "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.request_memory "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "conditions": "server: shipped model, DDM_TORCH_THREADS=1, default decode threads (2), "
        "DDM_REQUEST_TIMEOUT_S=600 so that every request is computed; a fresh server per scenario; "
        "host shared with other work",
        "settings": args.setting,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
