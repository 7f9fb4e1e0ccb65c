"""Load generator for the running service: N concurrent single-image clients, a fixed number of requests.

    # against a server you started (its profile must exist):
    python benchmarks/service_load.py --url http://127.0.0.1:8000 --profile default -c 1 8 32 -n 64

    # or let it start `python -m app serve` itself (temporary profiles folder, a 'bench' profile fitted
    # from 12 reference images through POST /v1/profiles), e.g. with batching off:
    python benchmarks/service_load.py --serve --env DDM_MAX_BATCH_SIZE=1 -c 1 8 32 -n 64 --json out.json

For each concurrency level: throughput (images/s over the level's wall time), latency p50/p95/p99 of the
successful requests, counts by status, and the mean executed batch size from /metrics (difference of
``anomaly_batch_size`` sum/count before and after the level). Prints a table; ``--json`` writes all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "celeba"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def scrape(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def run_level(
    url: str, images: list[bytes], concurrency: int, requests: int, profile: str, headers: dict[str, str]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers, limits=limits) as http:
        before = (await http.get("/metrics")).text
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        next_index = 0

        async def client() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                files = [("files", (f"{i}.png", images[i % len(images)], "image/png"))]
                t0 = time.perf_counter()
                response = await http.post("/v1/score", params={"profile": profile}, files=files)
                elapsed = time.perf_counter() - t0
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(elapsed)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = (await http.get("/metrics")).text
    batches = scrape(after, "anomaly_batch_size_count") - scrape(before, "anomaly_batch_size_count")
    batched = scrape(after, "anomaly_batch_size_sum") - scrape(before, "anomaly_batch_size_sum")
    ok = statuses.get(200, 0)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall, 3),
        "throughput_img_s": round(ok / wall, 2) if wall > 0 else None,
        "latency_s": {
            f"p{q}": (round(v, 3) if (v := percentile(latencies, q)) is not None else None)
            for q in (50, 95, 99)
        },
        "mean_batch_size": round(batched / batches, 2) if batches else None,
        "batches": int(batches),
    }


def start_server(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {
        **os.environ,
        "DDM_HOST": "127.0.0.1",
        "DDM_PORT": str(port),
        "DDM_PROFILES_DIR": str(workdir / "profiles"),
        "DDM_ALLOW_OPEN_PROFILE_CREATION": "true",
        **env,
    }
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=full_env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit(f"server exited during start-up; see {workdir / 'server.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("server not ready after 300 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running service")
    parser.add_argument("--serve", action="store_true", help="start `python -m app serve` for the run")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="server env (with --serve)")
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("-n", "--requests", type=int, default=64, help="requests per level")
    parser.add_argument(
        "--profile", default=None, help="profile to score against (default: 'bench' / 'default')"
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of PNG test images")
    parser.add_argument("--count", type=int, default=64, help="distinct images to cycle through")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests before the first level")
    parser.add_argument("--api-key", default=os.environ.get("DDM_BENCH_API_KEY"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if bool(args.url) == bool(args.serve):
        parser.error("give exactly one of --url and --serve")
    paths = sorted(args.images.glob("*.png"))
    if len(paths) < args.count + 12:
        parser.error(f"need at least {args.count + 12} PNG images in {args.images}")
    images = [p.read_bytes() for p in paths[: args.count]]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    env = dict(item.split("=", 1) for item in args.env)

    process = None
    workdir = Path(tempfile.mkdtemp(prefix="service-load-"))
    try:
        if args.serve:
            process, url = start_server(env, workdir)
            profile = args.profile or "bench"
            reference = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths[-12:]]
            created = httpx.post(f"{url}/v1/profiles", data={"name": profile}, files=reference, timeout=300)
            created.raise_for_status()
        else:
            url, profile = args.url, args.profile or "default"
        server_info = httpx.get(f"{url}/readyz", timeout=10).json()
        if args.warmup:
            asyncio.run(run_level(url, images, 1, args.warmup, profile, headers))
        levels = [
            asyncio.run(run_level(url, images, c, args.requests, profile, headers)) for c in args.concurrency
        ]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(120)
    result = {"url": url, "profile": profile, "server_env": env, "server": server_info, "levels": levels}
    print(
        f"{'clients':>7} {'ok':>5} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6}  statuses"
    )
    for level in levels:
        lat = level["latency_s"]
        print(f"{level['concurrency']:>7} {level['ok']:>5} {level['throughput_img_s'] or 0:>7.2f} "
              f"{lat['p50'] or 0:>7.3f} {lat['p95'] or 0:>7.3f} {lat['p99'] or 0:>7.3f} "
              f"{level['mean_batch_size'] or 0:>6.2f}  {level['statuses']}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
