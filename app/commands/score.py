"""``ddm-anomaly score``: score image files, folders and globs against a calibration profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.commands.common import add_engine_args, load_engine, profiles_dir, settings_from_args

FORMATS = ("jsonl", "csv", "table")  # app/offline/score_report.py writes them


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score image files, folders or globs",
        description=(
            "Score images offline, without the service. Per image: score (-log density of its trajectory "
            "features under the profile: the higher, the more unusual; 90%% of the shipped profile's faces "
            "score -37 to -22), the profile's threshold, is_anomaly, the percentile among the "
            "profile's normal images and a conformal p-value. A progress bar shows on a terminal. "
            "Unreadable files get an error row and the exit code is 1."
        ),
    )
    add_engine_args(p)
    p.add_argument("--profile", help="calibration profile name (default: DDM_DEFAULT_PROFILE, 'default')")
    p.add_argument(
        "--format", choices=FORMATS, default="jsonl", help="jsonl (one JSON object a line), csv or table"
    )
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders; '**' in globs")
    p.add_argument("--heatmaps", type=Path, metavar="DIR", help="save each image with its heat map here")
    p.add_argument("--features", action="store_true", help="also print the feature vector (jsonl)")
    p.add_argument("images", nargs="+", help="image files, folders of images, or glob patterns ('*.png')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from app.bootstrap import apply_thread_policy
    from app.engine.calibration.store import ProfileStore
    from app.errors import InvalidInput
    from app.offline.datasets import expand_images
    from app.offline.score_report import OverlayWriter, ReportWriter, verdict_row

    paths = expand_images(args.images, args.recursive)
    settings = settings_from_args(args)
    apply_thread_policy(settings)
    engine = load_engine(settings)
    store = ProfileStore(profiles_dir(settings), engine.info.model_id, engine.options)
    profile = store.get(args.profile or settings.default_profile)
    writer = ReportWriter(args.format, sys.stdout)
    overlays = OverlayWriter(args.heatmaps, profile) if args.heatmaps else None
    failed = flagged = 0
    # disable=None: a bar on a terminal only, never in a pipe or a log file
    with tqdm(total=len(paths), unit="image", desc="scoring", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            prepared, names = [], []
            for path in chunk:
                try:
                    prepared.append(engine.decode(path.read_bytes()))
                    names.append(path)
                except (InvalidInput, OSError) as exc:
                    failed += 1
                    writer.row({"image": str(path), "error": str(exc)})
            stats = engine.image_stats(prepared)
            for path, p, s, v in zip(names, prepared, stats, profile.verdicts(stats), strict=True):
                row = {**verdict_row(str(path), v), "profile": profile.name, "model_id": engine.info.model_id}
                if args.features and args.format == "jsonl":
                    row["features"] = s.features.tolist()
                if overlays is not None:
                    row["heatmap"] = str(overlays.save(path, p, s, v))
                flagged += v.is_anomaly
                writer.row(row)
            bar.update(len(chunk))
    writer.close()
    print(
        f"{len(paths) - failed} scored, {flagged} anomalies at profile {profile.name!r}, {failed} unreadable",
        file=sys.stderr,
    )
    return 1 if failed else 0
