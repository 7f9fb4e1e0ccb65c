"""Peak memory of a live server under concurrent maximal requests.

    python -m benchmarks.request_memory --json benchmarks/results/request_memory/2026-12-02-cpu.json

Starts ``python -m app serve`` (the shipped model, one torch thread, a free port) once
per scenario, so that each peak (``VmHWM`` of the server process) is that scenario's own. A scenario sends
``--clients`` requests at once, each a maximal body that is accepted: just under the 20 MiB body cap
(``DDM_MAX_UPLOAD_BYTES``), holding four 4096×4096 JPEGs (the per-image pixel cap, and together exactly
the per-request pixel budget ``DDM_MAX_REQUEST_PIXELS``), so every byte is parsed, every image decoded
at full size and scored:

- ``json``: ``{"images": [{"data": <base64>}, ...]}`` (base64 makes each image a third larger on the wire);
- ``multipart``: four ``files`` parts.

Reported: resident memory when idle (after one small warm-up request), the peak while the requests run,
the resident memory once they are answered, the answers' statuses and the slowest latency.
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
import subprocess
import sys
import tempfile
import threading
import time
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


def bodies() -> dict[str, tuple[bytes, str]]:
    """(body, content type) per scenario, each just under the body cap."""
    margin = 64 * 1024
    raw = [photo_jpeg(i, (UPLOAD_CAP - margin) // IMAGES) for i in range(IMAGES)]
    parts = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(raw)
    )
    multipart = parts + f"--{BOUNDARY}--\r\n".encode()
    small = [photo_jpeg(i, (UPLOAD_CAP - margin) * 3 // 4 // IMAGES) for i in range(IMAGES)]
    as_json = json.dumps({"images": [{"data": base64.b64encode(d).decode()} for d in small]}).encode()
    out = {
        "json": (as_json, "application/json"),
        "multipart": (multipart, f"multipart/form-data; boundary={BOUNDARY}"),
    }
    for name, (body, _) in out.items():
        assert len(body) <= UPLOAD_CAP, (name, len(body))
    return out


def start_server(settings: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    profiles = workdir / "profiles"
    profiles.mkdir(exist_ok=True)
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


async def send_all(url: str, body: bytes, content_type: str, clients: int) -> list[tuple[int, float]]:
    async def one(client: httpx.AsyncClient) -> tuple[int, float]:
        t0 = time.monotonic()
        r = await client.post(f"{url}/v1/score", content=body, headers={"content-type": content_type})
        return r.status_code, time.monotonic() - t0

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients)) as client:
        return list(await asyncio.gather(*(one(client) for _ in range(clients))))


def scenario(
    name: str, body: bytes, content_type: str, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    process, url = start_server(dict(s.split("=", 1) for s in args.setting), workdir)
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
        answers = asyncio.run(send_all(url, body, content_type, args.clients))
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
            "body_bytes": len(body),
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
    p.add_argument("--scenarios", nargs="+", default=["json", "multipart"], choices=["json", "multipart"])
    p.add_argument("--setting", action="append", default=[], metavar="DDM_X=VALUE", help="server setting")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    made = bodies()
    with tempfile.TemporaryDirectory(prefix="request-memory-") as tmp:
        rows = [scenario(name, *made[name], args, Path(tmp)) for name in args.scenarios]
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
