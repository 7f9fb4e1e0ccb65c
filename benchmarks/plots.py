"""Plots for docs/PERFORMANCE.md from the benchmark JSON files.

python benchmarks/plots.py --engine benchmarks/results/engine.json --service benchmarks/results/service.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"


def engine_plot(report: dict, out: Path) -> None:
    rows = report["engine"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(batches, [r["images_per_s"] for r in rows], "o-", label="engine (Scorer.run)")
    ax.plot(batches, [r["bare_unet_images_per_s"] for r in rows], "s--", label="bare UNet, K passes")
    naive = report["naive"]["images_per_s"]
    ax.axhline(naive, color="grey", ls=":", label=f"naive peer ({naive:.2f} img/s)")
    peak_ips = report["peak_gflops"] * 1e9 / report["flops"]["per_image"]
    ax.axhline(peak_ips, color="red", ls="-.", lw=1, label=f"matmul peak ({peak_ips:.1f} img/s)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"images/s (K={report['steps']})")
    ax.set_title(f"{report['model'].split('@')[0]}, {report['device']}, {report['torch_threads']} thread(s)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def service_plot(report: dict, out: Path) -> None:
    runs = [("batching on", report["levels"])]
    if report.get("compare"):
        runs.append(("max batch 1", report["compare"]["levels"]))
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    for (name, levels), color in zip(runs, ("C0", "C1"), strict=False):
        clients = [lv["concurrency"] for lv in levels]
        lat.plot(clients, [lv["latency_s"]["p50"] for lv in levels], "o-", color=color, label=f"{name} p50")
        lat.plot(clients, [lv["latency_s"]["p99"] for lv in levels], "^--", color=color, label=f"{name} p99")
        thr.plot(clients, [lv["throughput_img_s"] for lv in levels], "o-", color=color, label=name)
    engine = report.get("summary", {}).get("engine_img_s")
    if engine:
        thr.axhline(engine, color="grey", ls=":", label=f"engine offline ({engine:.1f})")
    for ax in (lat, thr):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lat.set_ylabel("latency, s")
    thr.set_ylabel("images/s")
    thr.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--engine", type=Path)
    p.add_argument("--service", type=Path)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine:
        engine_plot(json.loads(args.engine.read_text()), args.out / "perf_engine_throughput.png")
    if args.service:
        service_plot(json.loads(args.service.read_text()), args.out / "perf_service_latency.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
