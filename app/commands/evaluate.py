"""``ddm-anomaly evaluate``: AUROC / AUPR / FPR@95 of every method for ID vs each OOD folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from app.commands.common import add_engine_args, load_engine, settings_from_args
from app.settings import Settings

if TYPE_CHECKING:  # the engine (torch) loads when the command runs, not to print --help
    import numpy as np

    from app.engine.engine import Engine
    from app.offline.evaluation import PairResult

log = logging.getLogger(__name__)


def _named_dir(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError("expected NAME=DIR")
    return name, Path(folder)


EVALUATE_DESCRIPTION = """\
Fit each method on normal images (--fit, default: a seeded half of the --id folder, disjoint from the ID
images scored), score the ID folder and every OOD folder, and report AUROC, AUPR (OOD positive) and FPR
at 95% TPR per pair and method. Writes JSON to --json and a ROC plot and score histograms as PNG next to
it. The trajectory methods share one model pass per image."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure detection quality: ID folder vs OOD folders, several methods",
        description=EVALUATE_DESCRIPTION,
    )
    add_engine_args(p, method=False)
    p.add_argument("--id", type=Path, help="in-distribution (normal) test folder")
    p.add_argument("--id-name", help="label of the ID set (default: folder name)")
    p.add_argument(
        "--ood",
        nargs="+",
        action="extend",
        type=_named_dir,
        metavar="NAME=DIR",
        help="OOD sets",
    )
    p.add_argument("--fit", nargs="+", action="extend", type=Path, help="folders of normal images to fit on")
    m = p.add_argument_group("cross-domain matrix (instead of --id/--ood; app/commands/evaluate_matrix.py)")
    m.add_argument(
        "--matrix",
        nargs="+",
        action="extend",
        type=_named_dir,
        metavar="SET=DIR",
        help="every set as the normal domain in turn, calibrated as `calibrate` does, scoring the others",
    )
    m.add_argument("--split", choices=("dev", "held"), default="dev", help="which half of the rest is scored")
    m.add_argument(
        "--exclude-from-mean", nargs="*", metavar="SET", help="also report the mean AUROC without these sets"
    )
    p.add_argument(
        "--methods", nargs="+", help="methods to compare (default: every shipped method; METHOD.md)"
    )
    p.add_argument("--limit", type=int, help="at most N images per scored set (seeded choice)")
    p.add_argument("--fit-limit", type=int, default=2000, help="at most M fitting images (default 2000)")
    p.add_argument("--json", required=True, type=Path, help="output JSON file")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--cache",
        type=Path,
        help="folder for per-set feature caches (.npz keyed by model, options and the exact file list): "
        "a re-run with the same sets skips the model",
    )
    p.set_defaults(func=run)


def split_id_and_fit(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """ID test images and fitting images, never overlapping."""
    from app.offline.datasets import list_images

    if args.fit:
        fit = [p for folder in args.fit for p in list_images(folder, seed=0)]
        fit_set = {p.resolve() for p in fit}
        ids = [p for p in list_images(args.id, seed=1) if p.resolve() not in fit_set]
    else:
        shuffled = list_images(args.id, seed=0)
        half = len(shuffled) // 2
        fit, ids = shuffled[:half], shuffled[half:]
    return ids[: args.limit] if args.limit else ids, fit[: args.fit_limit]


def cache_file(
    folder: Path | None, engine: Engine, settings: Settings, methods: list[str], paths: list[Path]
) -> Path | None:
    from app.bootstrap import options_from_settings

    if folder is None:
        return None
    key = {
        "model": engine.info.model_id,
        "options": [options_from_settings(settings, m).feature_key() for m in methods],
        "files": [str(p.resolve()) for p in paths],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return folder / f"features-{digest}.npz"


def run(args: argparse.Namespace) -> int:
    if args.matrix:
        from app.commands.evaluate_matrix import run_matrix

        return run_matrix(args)
    if args.id is None or not args.ood:
        raise SystemExit("evaluate: --id and --ood are required (or --matrix SET=DIR ...)")
    from app.bootstrap import apply_thread_policy, options_from_settings
    from app.engine.methods import METHODS, names
    from app.offline.datasets import list_images
    from app.offline.evaluation import format_table, plot_roc_and_histograms

    args.methods = args.methods or list(METHODS)
    if unknown := sorted(set(args.methods) - set(names())):
        raise SystemExit(
            f"evaluate: unknown method(s) {', '.join(unknown)}; registered: {', '.join(names())}"
        )
    settings = settings_from_args(args)
    apply_thread_policy(settings)
    engine = load_engine(settings, options_from_settings(settings, args.methods[0]))
    id_name = args.id_name or args.id.name
    id_paths, fit_paths = split_id_and_fit(args)
    if not fit_paths or not id_paths:
        raise SystemExit("evaluate: no fitting or no ID images")
    sets = {"__fit__": fit_paths, id_name: id_paths}
    for name, folder in args.ood:
        sets[name] = list_images(folder, args.limit, seed=0 if args.limit else None)

    started = time.perf_counter()
    features, n_images = set_features(args, engine, settings, sets)
    seconds = time.perf_counter() - started
    scores, results, thresholds = compare_methods(args, engine, settings, features, id_name)

    print(format_table(results))
    per_image = seconds / max(n_images, 1)
    print(
        f"\n{n_images} images in {seconds:.1f} s ({per_image * 1000:.1f} ms/image for all methods together)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "results": [r.to_dict() for r in results],
        "model_id": engine.info.model_id,
        "options": {m: options_from_settings(settings, m).to_dict() for m in args.methods},
        "n_fit": len(features[args.methods[0]]["__fit__"]),
        "seconds": seconds,
        "seconds_per_image": per_image,
        "device": engine.info.device,
    }
    args.json.write_text(json.dumps(report, indent=2))
    if not args.no_plots:
        for path in plot_roc_and_histograms(scores, id_name, args.json.with_suffix(""), thresholds):
            print(f"wrote {path}")
    return 0


def set_features(
    args: argparse.Namespace, engine: Engine, settings: Settings, sets: dict[str, list[Path]]
) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """{method: {set name: feature matrix}} for every set (from the --cache when it has the set), and the
    number of images the model computed."""
    import numpy as np

    from app.offline.datasets import feature_matrix, folder_statistics

    n_images = 0
    features: dict[str, dict[str, np.ndarray]] = {m: {} for m in args.methods}
    for name, paths in sets.items():
        cache = cache_file(args.cache, engine, settings, args.methods, paths)
        if cache is not None and cache.is_file():
            with np.load(cache, allow_pickle=False) as data:
                for m in args.methods:
                    features[m][name] = data[m]
            continue
        kept, stats = folder_statistics(engine, paths, args.methods, args.batch_size, desc=name)
        n_images += len(kept)
        for m in args.methods:
            features[m][name] = feature_matrix(stats[m])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **{m: features[m][name] for m in args.methods})  # type: ignore[arg-type]
    return features, n_images


def compare_methods(
    args: argparse.Namespace,
    engine: Engine,
    settings: Settings,
    features: dict[str, dict[str, np.ndarray]],
    id_name: str,
) -> tuple[dict[str, dict[str, np.ndarray]], list[PairResult], dict[str, tuple[float, float]]]:
    """Each method fitted on the fitting set: its scores of every scored set, ID vs each OOD set, and its
    profile's deciding (false-positive rate, threshold)."""
    from app.bootstrap import options_from_settings
    from app.engine.calibration.fit import fit_profile
    from app.offline.evaluation import PairResult, detection_metrics

    scores: dict[str, dict[str, np.ndarray]] = {m: {} for m in args.methods}
    results: list[PairResult] = []
    thresholds: dict[str, tuple[float, float]] = {}
    for m in args.methods:
        options = options_from_settings(settings, m)
        profile = fit_profile(
            f"eval-{m}", features[m]["__fit__"], model_id=engine.info.model_id, options=options
        )
        thresholds[m] = (profile.default_fpr, profile.threshold)
        for name in features[m]:
            if name != "__fit__":
                scores[m][name] = profile.score(features[m][name])
        for name, _ in args.ood:
            auroc, aupr, fpr95 = detection_metrics(scores[m][id_name], scores[m][name])
            results.append(
                PairResult(
                    m, id_name, name, auroc, aupr, fpr95, len(scores[m][id_name]), len(scores[m][name])
                )
            )
    return scores, results, thresholds
