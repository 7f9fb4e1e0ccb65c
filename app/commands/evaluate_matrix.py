"""``ddm-anomaly evaluate --matrix SET=DIR ...``: every set as the normal domain in turn.

Each set's images (seeded order) split into a fitting part (the first ``--fit-limit``) and the rest, halved:
the first half is the ``dev`` split, the second the ``held`` split (each capped at ``--limit``). For each
set as normal, a profile is calibrated on its fitting images exactly as ``calibrate`` does (features chosen
from those images alone unless ``--aggregation`` names them) and scores the chosen split of every set:
AUROC, AUPR and FPR95 of each other set against the normal set's own split. Writes the N x N table as JSON
and a heat map PNG beside it. Each image is walked once; ``--cache`` keeps the walks for a re-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.bootstrap import apply_thread_policy
from app.commands.common import load_engine, settings_from_args
from app.engine.calibration.choice import calibrate_profile
from app.engine.engine import Engine
from app.engine.model.runtimes import EMBEDDING
from app.engine.types import ImageStats
from app.offline.datasets import folder_statistics, list_images
from app.offline.evaluation import detection_metrics, plot_matrix

# ImageStats fields kept in the cache (numpy arrays; None fields are left out)
CACHED = (
    "features",
    "step_sums",
    "delta_sums",
    "timesteps",
    "heatmap",
    "step_grid",
    "delta_grid",
    "embeddings",
)


def matrix_split(
    folder: Path, fit_limit: int, limit: int | None, split: str
) -> tuple[list[Path], list[Path]]:
    """(fitting images, scored images) of one set: seeded order, the first ``fit_limit`` fit, the rest
    halved into dev then held (each at most ``limit``)."""
    files = list_images(folder, seed=0)
    rest = files[fit_limit:]
    half = len(rest) // 2 if limit is None else min(limit, len(rest) // 2)
    scored = rest[:half] if split == "dev" else rest[half : 2 * half]
    return files[:fit_limit], scored


def walked(
    engine: Engine, paths: list[Path], cache: Path | None, batch_size: int, desc: str
) -> list[ImageStats]:
    """The engine's statistics of ``paths`` (from ``cache`` when it has exactly these files)."""
    walk = {"model": engine.info.model_id, "walk": engine.options.walk_key(), "embedding": EMBEDDING}
    key = json.dumps({**walk,
                      "files": [str(p.resolve()) for p in paths]}, sort_keys=True)  # fmt: skip
    target = None if cache is None else cache / f"walk-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    if target is not None and target.is_file():
        with np.load(target, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        n = len(arrays["features"])
        return [
            ImageStats(**{k: (v if k == "timesteps" else v[i]) for k, v in arrays.items()}) for i in range(n)
        ]
    _, stats = folder_statistics(engine, paths, batch_size=batch_size, desc=desc)
    out = stats[engine.options.method]
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            name: (out[0].timesteps if name == "timesteps" else np.stack([getattr(s, name) for s in out]))
            for name in CACHED
            if out and getattr(out[0], name) is not None
        }
        np.savez(target, **arrays)  # type: ignore[arg-type]
    return out


def run_matrix(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    apply_thread_policy(settings)
    engine = load_engine(settings)
    started = time.perf_counter()
    fit, scored = {}, {}
    for name, folder in args.matrix:
        fit_paths, scored_paths = matrix_split(folder, args.fit_limit, args.limit, args.split)
        fit[name] = walked(engine, fit_paths, args.cache, args.batch_size, f"{name} fit")
        scored[name] = walked(engine, scored_paths, args.cache, args.batch_size, f"{name} {args.split}")
    names = list(fit)
    rows: dict[str, dict[str, Any]] = {}
    for normal in names:
        profile = calibrate_profile(
            normal, fit[normal], engine.options, settings.aggregation, model_id=engine.info.model_id
        )
        scores = {s: profile.score(profile.features(scored[s])) for s in names}
        cells = {}
        for other in names:
            if other != normal:
                auroc, aupr, fpr95 = detection_metrics(scores[normal], scores[other])
                cells[other] = {"auroc": auroc, "aupr": aupr, "fpr95": fpr95, "n": len(scores[other])}
        rows[normal] = {
            "options": profile.options.to_dict(),
            "selection": profile.selection,
            "n_fit": len(fit[normal]),
            "n_normal": len(scores[normal]),
            "scored": cells,
        }
        print(f"{normal:>12} ({profile.options.aggregation}): "
              + "  ".join(f"{o} {c['auroc']:.3f}" for o, c in cells.items()), flush=True)  # fmt: skip
    report = {
        "model_id": engine.info.model_id,
        "split": args.split,
        "aggregation_setting": settings.aggregation,
        "rows": rows,
        "summary": summarise(rows, args.exclude_from_mean),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(report["summary"], indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    if not args.no_plots:
        print(f"wrote {plot_matrix(rows, args.json.with_suffix('.png'))}")
    return 0


def summarise(rows: dict[str, dict[str, Any]], exclude: list[str] | None) -> dict[str, Any]:
    """Mean AUROC of every pair, of the pairs without the ``exclude`` sets, and per normal set."""
    pairs = [(n, o, c["auroc"]) for n, row in rows.items() for o, c in row["scored"].items()]
    kept = [a for n, o, a in pairs if not ({n, o} & set(exclude or []))]
    return {
        "mean_auroc": float(np.mean([a for *_, a in pairs])),
        "pairs": len(pairs),
        f"mean_auroc_without_{'_'.join(exclude or [])}": float(np.mean(kept)) if kept else None,
        "pairs_without": len(kept),
        "row_mean": {
            n: float(np.mean([c["auroc"] for c in row["scored"].values()])) for n, row in rows.items()
        },
        "min_pair": min(pairs, key=lambda p: p[2]),
    }
