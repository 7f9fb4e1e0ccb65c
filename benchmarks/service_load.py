"""Load generator for the running service: N concurrent single-image clients, a fixed number of requests.

    # against a server you started (its profile must exist):
    python benchmarks/service_load.py --url http://127.0.0.1:8000 --profile default -c 1 8 32 -n 64

    # or let it start `python -m app serve` itself (temporary profiles folder, a 'bench' profile fitted
    # from 12 reference images through POST /v1/profiles), e.g. with batching off:
    python benchmarks/service_load.py --serve --env DDM_MAX_BATCH_SIZE=1 -c 1 8 32 -n 64 --json out.json

    # docs/PERFORMANCE.md's comparison in one run: batching on vs off (levels alternate between servers), and
    # the engine alone (service/engine ratio, p99 vs one full batch):
    python benchmarks/service_load.py --serve --env DDM_TORCH_THREADS=1 --compare DDM_MAX_BATCH_SIZE=1 \
        --engine-reference -c 1 8 16 32 64 -n 64 --per-client 2 --json benchmarks/results/service.json

    # several server settings in the same run, each with its batching-off twin (levels alternate over all
    # servers), against the best of several engine set-ups (threads x concurrent Engine.image_stats calls):
    python benchmarks/service_load.py --serve --compare DDM_MAX_BATCH_SIZE=1 \
        --setting 2t=DDM_TORCH_THREADS=2 --setting 1t=DDM_TORCH_THREADS=1 \
        --setting 1t-x2=DDM_TORCH_THREADS=1,DDM_MODEL_INSTANCES=2 \
        --engine-reference --engine-runs 2x1 1x2 -c 1 8 16 32 64 -n 64 --per-client 2 --json out.json

For each concurrency level: throughput (images/s over the level's wall time), latency p50/p95/p99 of the
successful requests, counts by status, the mean executed batch size from /metrics (difference of
``anomaly_batch_size`` sum/count before and after the level), the CPU the load generator and (with
``--serve``) the server used, in cores, the cores busy on the whole host (anyone's work) and the 1-minute
load average as the level started. Prints a table; ``--json`` writes all of it.

The load generator shares the host with the server, so it is kept light: each image's multipart body is
encoded once (by httpx) and re-sent as raw bytes; one asyncio process drives every client.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Body:
    """One image's ``POST /v1/score`` multipart body, encoded once."""

    content: bytes
    content_type: str


def encode_bodies(images: list[bytes]) -> list[Body]:
    bodies = []
    for i, data in enumerate(images):
        request = httpx.Request("POST", "http://bench/", files=[("files", (f"{i}.png", data, "image/png"))])
        bodies.append(Body(request.read(), request.headers["content-type"]))
    return bodies


@dataclass
class Server:
    setting: str
    role: str  # "main" (the setting's env) or "compare" (plus the --compare overrides)
    env: dict[str, str]
    url: str
    profile: str
    process: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    levels: list[dict[str, Any]] = field(default_factory=list)

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the server process so far (Linux), None for a remote server."""
        if self.process is None:
            return None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole host so far, from /proc/stat (Linux), summed over cores."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / tick, sum(values[:8]) / tick


async def run_level(
    server: Server, bodies: list[Body], concurrency: int, requests: int, headers: dict[str, str]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=headers, limits=limits) as http:
        before = (await http.get("/metrics")).text
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        next_index = 0
        params = {"profile": server.profile}

        async def client() -> None:
            nonlocal next_index
            while next_index < requests:
                body = bodies[next_index % len(bodies)]
                next_index += 1
                t0 = time.perf_counter()
                response = await http.post(
                    "/v1/score", params=params, content=body.content,
                    headers={"content-type": body.content_type},
                )  # fmt: skip
                elapsed = time.perf_counter() - t0
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(elapsed)

        load_average = os.getloadavg()[0]
        server_cpu, client_cpu, host = server.cpu_s(), time.process_time(), host_cpu()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        server_cpu_end = server.cpu_s()
        host_end = host_cpu()
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
        "load_average_1m": round(load_average, 2),
        "client_cores": round(client_cpu / wall, 2) if wall > 0 else None,
        "server_cores": (
            round((server_cpu_end - server_cpu) / wall, 2)
            if server_cpu is not None and server_cpu_end is not None and wall > 0
            else None
        ),
        # every process on the host: what is left beyond server + client is someone else's work
        "host_busy_cores": (
            round((host_end[0] - host[0]) / wall, 2) if host is not None and host_end is not None else None
        ),
    }


def start_server(
    setting: str, role: str, env: dict[str, str], reference: list[Path], profile: str | None
) -> Server:
    """Start ``python -m app serve`` with ``env``, wait for /readyz, fit its profile from ``reference``."""
    workdir = Path(tempfile.mkdtemp(prefix="service-load-"))
    process, url = spawn_server(env, workdir)
    name = profile or "bench"
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in reference]
    httpx.post(f"{url}/v1/profiles", data={"name": name}, files=files, timeout=300).raise_for_status()
    return Server(setting, role, env, url, name, process)


def spawn_server(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
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
    log_path = workdir / f"server-{port}.log"  # one per server when a folder holds several
    with log_path.open("wb") as log:  # the server writes to its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=full_env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit(f"server exited during start-up; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("server not ready after 300 s")


class EngineReference:
    """The engine alone (``Engine.image_stats`` on one batch, no HTTP) in set-ups ``threads x instances``:
    ``instances`` threads each run the same batch at the same time on the one model, with ``threads``
    intra-op threads (the service's DDM_TORCH_THREADS x DDM_MODEL_INSTANCES, without the service), in the
    UNet runtime the env names (DDM_RUNTIME). Each thread count loads its own Engine: an exported runtime
    sizes its thread pool when it is built. The caller interleaves ``measure`` with the load levels, while
    the servers are idle."""

    def __init__(self, env: dict[str, str], folder: Path, batch: int, runs: list[tuple[int, int]]) -> None:
        from app.engine.engine import Engine
        from app.settings import Settings

        self.runtime = env.get("DDM_RUNTIME", Settings.model_fields["runtime"].default)
        self.engines = {}
        for threads in dict.fromkeys(t for t, _ in runs):
            engine = Engine(
                ROOT / env.get("DDM_MODEL_DIR", "model_store/celeba32-ref"),
                device=env.get("DDM_DEVICE", "auto"),
                runtime=self.runtime,
                torch_threads=threads,
            )
            engine.load(warmup_batch=2)
            self.engines[threads] = engine
        paths = sorted(folder.glob("*.png"))[:batch]
        first = next(iter(self.engines.values()))
        self.batch = [first.decode(p.read_bytes()) for p in paths]
        self.runs = [{"threads": t, "instances": n, "batch": len(self.batch), "wall_s": []} for t, n in runs]

    def measure(self, rounds: int) -> None:
        import torch

        from app.engine.model.runtimes import torch_threads_beside

        for run in self.runs:
            engine = self.engines[run["threads"]]
            # as the service's start-up sets it (app/bootstrap.py): torch on one thread beside an exported
            # runtime's pool
            torch.set_num_threads(torch_threads_beside(engine.model.runtime, run["threads"]))
            with ThreadPoolExecutor(run["instances"]) as pool:
                for i in range(rounds + 1):  # the first round warms this thread count and pool
                    start = time.perf_counter()
                    list(pool.map(lambda _, s=engine: s.image_stats(self.batch), range(run["instances"])))
                    if i:
                        run["wall_s"].append(time.perf_counter() - start)

    def report(self) -> dict[str, Any]:
        for run in self.runs:
            wall = statistics.median(run["wall_s"])
            run["img_s"] = round(run["instances"] * run["batch"] / wall, 2)
            run["batch_s"] = round(wall, 3)  # one full batch on each instance
        best = max(self.runs, key=lambda r: r["img_s"])
        return {
            "runtime": self.runtime,
            "runs": self.runs,
            "img_s": best["img_s"],
            "best": f"{best['threads']}x{best['instances']}",
            "batch": best["batch"],
            "full_batch_s": min(r["batch_s"] for r in self.runs),  # the strictest "one full batch"
        }


def runtime_of(env: dict[str, str]) -> str:
    from app.settings import Settings

    return env.get("DDM_RUNTIME", Settings.model_fields["runtime"].default)


def summarise(setting: dict[str, Any], engine: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's ratios for one setting, against its comparison server and the best engine figure."""
    main_levels = {lv["concurrency"]: lv for lv in setting["levels"]}
    out: dict[str, Any] = {}
    saturation = max((lv["throughput_img_s"] or 0) for lv in main_levels.values())
    out["saturation_img_s"] = saturation
    one = main_levels.get(1, {}).get("throughput_img_s")
    if one:
        out["throughput_ratio_vs_one_client"] = {
            c: round((lv["throughput_img_s"] or 0) / one, 2) for c, lv in main_levels.items()
        }
    if setting.get("compare"):
        other = {lv["concurrency"]: lv for lv in setting["compare"]["levels"]}
        out["throughput_ratio_vs_compare"] = {
            c: round((main_levels[c]["throughput_img_s"] or 0) / other[c]["throughput_img_s"], 2)
            for c in main_levels
            if c in other and other[c]["throughput_img_s"]
        }
    if engine:
        out["engine_img_s"] = engine["img_s"]
        out["engine_full_batch_s"] = engine["full_batch_s"]
        out["saturation_over_engine"] = round(saturation / engine["img_s"], 2)
        if 8 in main_levels and main_levels[8]["latency_s"]["p99"] is not None:
            p99 = main_levels[8]["latency_s"]["p99"]
            out["p99_at_8_over_full_batch"] = round(p99 / engine["full_batch_s"], 2)
    return out


def print_levels(title: str, levels: list[dict[str, Any]]) -> None:
    print(title)
    print(f"{'clients':>7} {'ok':>5} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6} "
          f"{'load':>5} {'client':>6} {'server':>6} {'host':>5}  statuses")  # fmt: skip
    for level in levels:
        lat = level["latency_s"]
        print(f"{level['concurrency']:>7} {level['ok']:>5} {level['throughput_img_s'] or 0:>7.2f} "
              f"{lat['p50'] or 0:>7.3f} {lat['p95'] or 0:>7.3f} {lat['p99'] or 0:>7.3f} "
              f"{level['mean_batch_size'] or 0:>6.2f} {level['load_average_1m']:>5.2f} "
              f"{level['client_cores'] or 0:>6.2f} {level['server_cores'] or 0:>6.2f} "
              f"{level['host_busy_cores'] or 0:>5.2f}  "
              f"{level['statuses']}")  # fmt: skip


def parse_env(text: str) -> dict[str, str]:
    """``K=V,K=V`` (or one ``K=V``) as a dict."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running service")
    parser.add_argument("--serve", action="store_true", help="start `python -m app serve` for the run")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="server env (with --serve)")
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=K=V[,K=V...]",
        help="with --serve: one server per setting, its env overrides on top of --env (default: one setting, "
        "--env alone)",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="append", default=[], metavar="K=V",
        help="with --serve: also start, for each setting, a second server with these env overrides (e.g. "
        "DDM_MAX_BATCH_SIZE=1); the levels alternate over all servers",
    )  # fmt: skip
    parser.add_argument(
        "--engine-reference", action="store_true",
        help="time Engine.image_stats alone (see --engine-runs) before and after the levels",
    )  # fmt: skip
    parser.add_argument(
        "--engine-runs", nargs="+", default=[f"{os.cpu_count() or 1}x1"], metavar="THREADSxINSTANCES",
        help="engine set-ups to time; the best one is the reference (default: all cores x 1)",
    )  # fmt: skip
    parser.add_argument("--engine-batch", type=int, default=32, help="images per engine batch")
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
    if (args.compare or args.setting) and not args.serve:
        parser.error("--compare and --setting need --serve")
    paths = sorted(args.images.glob("*.png"))
    if len(paths) < args.count + 12:
        parser.error(f"need at least {args.count + 12} PNG images in {args.images}")
    bodies = encode_bodies([p.read_bytes() for p in paths[: args.count]])
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    env = parse_env(",".join(args.env))
    settings = [
        (name, {**env, **parse_env(spec)}) for name, _, spec in (s.partition("=") for s in args.setting)
    ]
    compare = parse_env(",".join(args.compare))
    runs = [(int(t), int(n)) for t, n in (r.lower().split("x", 1) for r in args.engine_runs)]

    servers: list[Server] = []
    engines: dict[str, EngineReference] = {}  # one per UNet runtime the settings use
    try:
        if args.serve:
            for name, setting_env in settings or [("default", env)]:
                servers.append(start_server(name, "main", setting_env, paths[-12:], args.profile))
                if compare:
                    servers.append(
                        start_server(name, "compare", {**setting_env, **compare}, paths[-12:], args.profile)
                    )
        else:
            servers.append(Server("remote", "main", {}, args.url, args.profile or "default"))
        for server in servers:
            server.info = httpx.get(f"{server.url}/readyz", timeout=10).json()
        if args.engine_reference:  # the servers are idle now: nothing else of ours runs
            for setting_env in {runtime_of(s.env): s.env for s in servers}.values():
                engines[runtime_of(setting_env)] = EngineReference(
                    setting_env, args.images, args.engine_batch, runs
                )
            for engine in engines.values():
                engine.measure(rounds=2)
        for server in servers:
            if args.warmup:
                asyncio.run(run_level(server, bodies, 1, args.warmup, headers))
        for c in args.concurrency:  # alternate servers level by level: drifting load hits all alike
            n = max(args.requests, args.per_client * c)
            for server in servers:
                server.levels.append(asyncio.run(run_level(server, bodies, c, n, headers)))
                print(f"{server.setting}/{server.role} clients {c}: "
                      f"{server.levels[-1]['throughput_img_s']} img/s", flush=True)  # fmt: skip
        for engine in engines.values():
            engine.measure(rounds=2)
    finally:
        for server in servers:
            if server.process is not None:
                server.process.send_signal(signal.SIGTERM)
        for server in servers:
            if server.process is not None:
                server.process.wait(120)
    engine_reports = {runtime: engine.report() for runtime, engine in engines.items()}
    results = []
    for server in servers:
        if server.role != "main":
            continue
        setting: dict[str, Any] = {
            "name": server.setting, "url": server.url, "profile": server.profile, "server_env": server.env,
            "server": server.info, "levels": server.levels,
        }  # fmt: skip
        twin = next((s for s in servers if s.setting == server.setting and s.role == "compare"), None)
        if twin is not None:
            setting["compare"] = {"server_env": twin.env, "server": twin.info, "levels": twin.levels}
        setting["summary"] = summarise(setting, engine_reports.get(runtime_of(server.env)))
        results.append(setting)
        print_levels(f"\n{server.setting}: server env {server.env}", server.levels)
        if twin is not None:
            print_levels(f"{server.setting}: comparison server env {twin.env}", twin.levels)
        print(json.dumps(setting["summary"], indent=2))
    result: dict[str, Any] = {"settings": results, "load_average_after": os.getloadavg()}
    if engine_reports:
        result["engines"] = engine_reports  # by UNet runtime
        for runtime, report in engine_reports.items():
            print(f"engine ({runtime}):", json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
