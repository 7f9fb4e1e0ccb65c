"""Load generator for the running service: N concurrent single-image clients, a fixed number of requests.

    # against a server you started (its profile must exist):
    python benchmarks/service_load.py --url http://127.0.0.1:8000 --profile default -c 1 8 32 -n 64

    # or let it start `python -m app serve` itself (temporary profiles folder, a 'bench' profile fitted
    # from 12 reference images through POST /v1/profiles), e.g. with batching off:
    python benchmarks/service_load.py --serve --env DDM_MAX_BATCH_SIZE=1 -c 1 8 32 -n 64 --json out.json

    # issue 8's comparison in one run: batching on vs off (levels alternate between the two servers), and
    # the engine alone at the server's batch size (service/engine ratio, p99 vs one full batch):
    python benchmarks/service_load.py --serve --env DDM_TORCH_THREADS=1 --compare DDM_MAX_BATCH_SIZE=1 \
        --engine-reference -c 1 8 16 32 64 -n 64 --per-client 2 --json benchmarks/results/service.json

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
import statistics
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


def engine_reference(env: dict[str, str], folder: Path, count: int, rounds: int) -> dict[str, Any]:
    """The engine alone (``Scorer.run``, no HTTP) at the server's batch size and thread count: images/s and
    seconds per full batch, ``rounds`` timings (the caller interleaves them with the load levels)."""
    import torch

    from app.engine.scorer import Scorer

    threads = env.get("DDM_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    scorer = Scorer(
        ROOT / env.get("DDM_MODEL_DIR", "model_store/celeba32-ref"), device=env.get("DDM_DEVICE", "auto")
    )
    scorer.load(warmup_batch=2)
    paths = sorted(folder.glob("*.png"))[:count]
    batch = [scorer.decode(p.read_bytes()) for p in paths]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        scorer.run(batch)
        times.append(time.perf_counter() - start)
    return {"batch": len(batch), "threads": torch.get_num_threads(), "batch_s": times}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's ratios from a run with a comparison server and/or an engine reference."""
    main_levels = {lv["concurrency"]: lv for lv in result["levels"]}
    out: dict[str, Any] = {}
    saturation = max((lv["throughput_img_s"] or 0) for lv in main_levels.values())
    out["saturation_img_s"] = saturation
    if result.get("compare"):
        other = {lv["concurrency"]: lv for lv in result["compare"]["levels"]}
        out["throughput_ratio_vs_compare"] = {
            c: round(main_levels[c]["throughput_img_s"] / other[c]["throughput_img_s"], 2)
            for c in main_levels
            if c in other and other[c]["throughput_img_s"]
        }
    if result.get("engine"):
        ref = result["engine"]
        batch_s = statistics.median(ref["batch_s"])
        out["engine_batch"] = ref["batch"]
        out["engine_full_batch_s"] = round(batch_s, 3)
        out["engine_img_s"] = round(ref["batch"] / batch_s, 2)
        out["saturation_over_engine"] = round(saturation / out["engine_img_s"], 2)
        if 8 in main_levels and main_levels[8]["latency_s"]["p99"] is not None:
            out["p99_at_8_over_full_batch"] = round(main_levels[8]["latency_s"]["p99"] / batch_s, 2)
    return out


def print_levels(title: str, levels: list[dict[str, Any]]) -> None:
    print(title)
    print(
        f"{'clients':>7} {'ok':>5} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6}  statuses"
    )
    for level in levels:
        lat = level["latency_s"]
        print(f"{level['concurrency']:>7} {level['ok']:>5} {level['throughput_img_s'] or 0:>7.2f} "
              f"{lat['p50'] or 0:>7.3f} {lat['p95'] or 0:>7.3f} {lat['p99'] or 0:>7.3f} "
              f"{level['mean_batch_size'] or 0:>6.2f}  {level['statuses']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running service")
    parser.add_argument("--serve", action="store_true", help="start `python -m app serve` for the run")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="server env (with --serve)")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="K=V",
        help="with --serve: also start a second server with these env overrides (e.g. DDM_MAX_BATCH_SIZE=1) "
        "and alternate the levels between the two",
    )  # fmt: skip
    parser.add_argument(
        "--engine-reference", action="store_true",
        help="time Scorer.run alone at the server's batch size and threads, between the levels",
    )  # fmt: skip
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("-n", "--requests", type=int, default=64, help="requests per level")
    parser.add_argument(
        "--per-client", type=int, default=0, help="at least this many requests per client at each level"
    )
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
    if args.compare and not args.serve:
        parser.error("--compare needs --serve")
    paths = sorted(args.images.glob("*.png"))
    if len(paths) < args.count + 12:
        parser.error(f"need at least {args.count + 12} PNG images in {args.images}")
    images = [p.read_bytes() for p in paths[: args.count]]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    env = dict(item.split("=", 1) for item in args.env)
    compare_env = {**env, **dict(item.split("=", 1) for item in args.compare)} if args.compare else None
    batch_size = int(env.get("DDM_MAX_BATCH_SIZE", "32"))

    processes: list[subprocess.Popen[bytes]] = []
    servers: list[tuple[str, str]] = []  # (url, profile) of the main server, then the comparison server
    levels: list[list[dict[str, Any]]] = []
    engine: dict[str, Any] | None = None
    try:
        for server_env in [env, compare_env] if args.serve else []:
            if server_env is None:
                continue
            workdir = Path(tempfile.mkdtemp(prefix="service-load-"))
            process, url = start_server(server_env, workdir)
            processes.append(process)
            profile = args.profile or "bench"
            reference = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths[-12:]]
            created = httpx.post(f"{url}/v1/profiles", data={"name": profile}, files=reference, timeout=300)
            created.raise_for_status()
            servers.append((url, profile))
        if not args.serve:
            servers.append((args.url, args.profile or "default"))
        info = [httpx.get(f"{url}/readyz", timeout=10).json() for url, _ in servers]
        if args.engine_reference:  # the servers are idle now: nothing else of ours runs
            engine = engine_reference(env, args.images, batch_size, rounds=2)
        for url, profile in servers:
            if args.warmup:
                asyncio.run(run_level(url, images, 1, args.warmup, profile, headers))
        levels = [[] for _ in servers]
        for c in args.concurrency:  # alternate servers level by level: drifting load hits both alike
            n = max(args.requests, args.per_client * c)
            for i, (url, profile) in enumerate(servers):
                levels[i].append(asyncio.run(run_level(url, images, c, n, profile, headers)))
        if engine is not None:
            engine["batch_s"] += engine_reference(env, args.images, batch_size, rounds=2)["batch_s"]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(120)
    result: dict[str, Any] = {
        "url": servers[0][0], "profile": servers[0][1], "server_env": env, "server": info[0],
        "levels": levels[0], "load_average_after": os.getloadavg(),
    }  # fmt: skip
    if compare_env is not None:
        result["compare"] = {"server_env": compare_env, "server": info[1], "levels": levels[1]}
    if engine is not None:
        result["engine"] = engine
    result["summary"] = summarise(result)
    print_levels(f"server env {env}", levels[0])
    if compare_env is not None:
        print_levels(f"comparison server env {compare_env}", levels[1])
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
