"""score-dataset (Ray Data, local) against the in-process engine on the same images, in the same run.

Each round runs both, in alternating order, each in a fresh process: the **engine** does what
``ddm-anomaly score`` does (decode each file with the service's decoder, ``Engine.image_stats`` on batches,
the profile's verdicts) in one process; **score-dataset** runs ``app.bulk.score_dataset`` on a local Ray
(decode tasks, one scoring actor, Parquet parts). images/s counts from the model load to the last row (the
engine's load and ONNX export; the driver's check, the actor's start and load), with a running Ray; Ray's
own start is reported apart. Memory: peak RSS of the engine process, and of the Ray driver, each scoring
actor, the decode workers and Ray's daemons (sampled from /proc every 0.2 s). Scores of both are compared.

    python -m benchmarks.bulk_bench --images 2000 --rounds 2 --json benchmarks/results/bulk/DATE-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DDM_TEST_DATA", REPO.parent / "shared" / "data"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images, half CelebA and half CIFAR-10")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default=str(REPO / "model_store" / "celeba32-ref"))
    p.add_argument("--threads", type=int, help="DDM_TORCH_THREADS for both (default: each process's own)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--one", choices=("engine", "ray"), help=argparse.SUPPRESS)  # a child run
    p.add_argument("--list", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        result = run_engine(args) if args.one == "engine" else run_ray(args)
        print(json.dumps(result))
        return 0
    return orchestrate(args)


def orchestrate(args: argparse.Namespace) -> int:
    half = args.images // 2
    paths = [str(p) for s, n in (("celeba", half), ("cifar10", args.images - half))
             for p in sorted((DATA / s).glob("*.png"))[:n]]  # fmt: skip
    if len(paths) != args.images:
        raise SystemExit(f"found {len(paths)} of {args.images} images under {DATA}")
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(tmp) / "paths.txt"
        listed.write_text("\n".join(paths) + "\n")
        for r in range(args.rounds):
            runs: dict[str, Any] = {}
            for kind in ("engine", "ray") if r % 2 == 0 else ("ray", "engine"):
                out = Path(tmp) / f"{kind}-{r}"
                command = [sys.executable, "-m", "benchmarks.bulk_bench", "--one", kind, "--list",
                           str(listed), "--out", str(out), "--batch-size", str(args.batch_size),
                           "--model", args.model]  # fmt: skip
                if args.threads:
                    command += ["--threads", str(args.threads)]
                load = os.getloadavg()[0]
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
                runs[kind] = {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load}
                print(f"round {r + 1} {kind}: {runs[kind]['images_per_s']:.2f} images/s", file=sys.stderr)
            runs["ratio"] = runs["ray"]["images_per_s"] / runs["engine"]["images_per_s"]
            runs["max_abs_score_diff"] = score_diff(Path(tmp), r)
            rounds.append(runs)
            print(f"round {r + 1}: ratio {runs['ratio']:.3f}, max |dscore| {runs['max_abs_score_diff']:.2e}")
    report = {
        "measured": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.bulk_bench " + " ".join(sys.argv[1:]),
        "conditions": {
            "cpus": os.cpu_count(),
            "images": args.images,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "load_before": os.getloadavg(),
        },
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
    }
    print(json.dumps({k: report[k] for k in ("ratio_median", "conditions")}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def score_diff(tmp: Path, r: int) -> float:
    import pandas as pd

    engine = json.loads((tmp / f"engine-{r}" / "scores.json").read_text())
    rows = pd.read_parquet(tmp / f"ray-{r}")
    assert len(rows) == len(engine) and rows["error"].isna().all()
    return max(abs(row.score - engine[row.path]) for row in rows.itertuples())


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    from app.bootstrap import apply_thread_policy
    from app.commands.common import load_engine
    from app.engine.calibration.store import ProfileStore
    from app.settings import Settings

    paths = args.list.read_text().split()
    settings = Settings(model_dir=args.model, torch_threads=args.threads)  # type: ignore[call-arg]
    apply_thread_policy(settings)
    start = time.perf_counter()
    engine = load_engine(settings)
    profile = ProfileStore(settings.profiles_folder, engine.info.model_id, engine.options).get("default")
    loaded = time.perf_counter()
    scores: dict[str, float | None] = {}
    for first in range(0, len(paths), args.batch_size):
        chunk = paths[first : first + args.batch_size]
        prepared = [engine.decode(Path(p).read_bytes()) for p in chunk]
        for path, verdict in zip(chunk, profile.verdicts(engine.image_stats(prepared)), strict=True):
            scores[path] = verdict.score
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True)
    (args.out / "scores.json").write_text(json.dumps(scores))
    return {
        "images": len(paths),
        "seconds": seconds,
        "load_seconds": loaded - start,
        "images_per_s": len(paths) / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_ray(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from app.bulk import BulkOptions, score_dataset
    from app.settings import Settings

    sampler = RssSampler(os.getpid())
    sampler.start()
    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    settings = Settings(model_dir=args.model, torch_threads=args.threads)  # type: ignore[call-arg]
    summary = score_dataset(args.list, args.out, settings, BulkOptions(batch_size=args.batch_size))
    seconds = time.perf_counter() - started
    ray.shutdown()
    sampler.stop()
    return {
        "images": summary.rows,
        "seconds": seconds,
        "ray_start_seconds": started - start,
        "images_per_s": summary.rows / seconds,
        "actors": summary.actors,
        "parts": summary.parts,
        "peak_rss_mb": sampler.peaks(),
    }


class RssSampler(threading.Thread):
    """Peak resident memory of a process and its descendants, by process title (Ray names its workers
    ``ray::<what they run>``), read from /proc."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak: dict[int, tuple[str, float]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            for pid, title, rss in self.sample():
                if rss > self.peak.get(pid, ("", 0.0))[1]:
                    self.peak[pid] = (title, rss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def sample(self) -> list[tuple[int, str, float]]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        found = []
        for pid in parents:
            ancestor = pid
            while ancestor not in (0, 1, self.root) and ancestor in parents:
                ancestor = parents[ancestor]
            if ancestor != self.root:
                continue
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            rss = next(
                (float(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS")),
                0.0,
            )
            found.append((pid, "driver" if pid == self.root else title, rss))
        return found

    def peaks(self) -> dict[str, float]:
        """The largest peak per title (e.g. each scoring actor, the decode workers, raylet)."""
        out: dict[str, float] = {}
        for title, rss in self.peak.values():
            name = os.path.basename(title.split()[0]) if not title.startswith("ray::") else title
            out[name] = round(max(out.get(name, 0.0), rss), 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    raise SystemExit(main())
