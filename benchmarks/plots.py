"""Plots for docs/PERFORMANCE.md from the benchmark JSON files (one or more runs of each).

    python benchmarks/plots.py --engine results/engine_1t.json results/engine_2t.json \
        --service results/service_1t.json results/service_2t.json
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


def engine_plot(reports: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for report, color in zip(reports, ("C0", "C1", "C2", "C3"), strict=False):
        rows = report["engine"]
        batches = [r["batch"] for r in rows]
        threads = f"{report['torch_threads']} thread{'s' if report['torch_threads'] > 1 else ''}"
        threads += f", {report.get('runtime', 'torch')}"  # reports before runtimes existed were torch
        ax.plot(batches, [r["images_per_s"] for r in rows], "o-", color=color, label=f"engine, {threads}")
        naive = report["naive"]["images_per_s"]
        ax.axhline(naive, color=color, ls=":", lw=1, label=f"naive peer, {threads} ({naive:.1f})")
        peak_ips = report["peak_gflops"] * 1e9 / report["flops"]["per_image"]
        ax.axhline(peak_ips, color=color, ls="-.", lw=1, label=f"at matmul peak, {threads} ({peak_ips:.0f})")
    batches = sorted({r["batch"] for report in reports for r in report["engine"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    top = max(r["peak_gflops"] * 1e9 / r["flops"]["per_image"] for r in reports)
    ax.set_ylim(0, top * 1.45)  # room for the legend above the curves
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"images/s (K={reports[0]['steps']})")
    ax.set_title(f"{reports[0]['model'].split('@')[0]} engine, {reports[0]['device']} float32")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def service_settings(reports: list[dict]) -> list[dict]:
    """Every server setting of the runs: a run is one setting (older files) or holds a list of them."""
    return [setting for report in reports for setting in report.get("settings", [report])]


def service_plot(reports: list[dict], out: Path) -> None:
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(8.5, 3.5), dpi=100)
    colors = iter(f"C{i}" for i in range(10))
    engines: set[float] = set()
    settings = service_settings(reports)
    for setting in settings:
        env = setting["server_env"]
        label = f"{env.get('DDM_TORCH_THREADS', 'default')} thr"
        if int(env.get("DDM_MODEL_INSTANCES", "1")) > 1:
            label += f" x {env['DDM_MODEL_INSTANCES']} inst"
        if setting.get("name", "default") != "default":  # --setting NAME=...: the run's own name for it
            label = f"{setting['name']} ({label})"
        runs = [("batching", setting["levels"])]
        if setting.get("compare"):
            runs.append(("max batch 1", setting["compare"]["levels"]))
        for name, levels in runs:
            color = next(colors)
            clients = [lv["concurrency"] for lv in levels]
            lat.plot(
                clients, [lv["latency_s"]["p99"] for lv in levels], "^-", color=color,
                label=f"{name}, {label} p99",
            )  # fmt: skip
            thr.plot(
                clients,
                [lv["throughput_img_s"] for lv in levels],
                "o-",
                color=color,
                label=f"{name}, {label}",
            )
        engine = setting.get("summary", {}).get("engine_img_s")
        if engine and engine not in engines:
            engines.add(engine)
            thr.axhline(engine, color="grey", ls=":", lw=1)
            runtime = env.get("DDM_RUNTIME", "")
            thr.annotate(f"engine offline (best) {runtime}".strip(), (clients[-1], engine), fontsize=6,
                         va="bottom", ha="right")  # fmt: skip
    clients = [lv["concurrency"] for lv in settings[0]["levels"]]
    for ax in (lat, thr):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent single-image clients")
        ax.grid(alpha=0.3)
    lat.set_ylabel("p99 latency, s")
    thr.set_ylabel("images/s")
    thr.set_ylim(0, thr.get_ylim()[1] * 1.1)  # room for the engine line's label
    # one legend for both panels (same colour = same setting), below them: inside, it covered the curves
    handles, labels = thr.get_legend_handles_labels()
    rows = -(-len(labels) // 2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, min(0.5, 0.06 * rows + 0.02), 1, 1))
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, nargs="*", default=[])
    p.add_argument("--service", type=Path, nargs="*", default=[])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine:
        engine_plot([json.loads(f.read_text()) for f in args.engine], args.out / "perf_engine_throughput.png")
    if args.service:
        service_plot([json.loads(f.read_text()) for f in args.service], args.out / "perf_service_latency.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
