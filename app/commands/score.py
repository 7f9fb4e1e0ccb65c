"""``ddm-anomaly score``: score image files against a calibration profile, one JSON line per image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.bootstrap import apply_thread_policy
from app.commands.common import add_engine_args, load_scorer, profiles_dir, settings_from_args
from app.engine.calibration.store import ProfileStore
from app.errors import InvalidInput


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score image files",
        description=(
            "Score images offline, without the service. Prints one JSON line per image: score (-log density "
            "of its trajectory features under the profile), the profile's threshold, is_anomaly, the "
            "percentile among the profile's normal images and a conformal p-value. Unreadable files get an "
            "'error' line and the exit code is 1."
        ),
    )
    add_engine_args(p)
    p.add_argument("--profile", help="calibration profile name (default: DDM_DEFAULT_PROFILE, 'default')")
    p.add_argument("--features", action="store_true", help="also print the feature vector")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    apply_thread_policy(settings)
    scorer = load_scorer(settings)
    store = ProfileStore(profiles_dir(settings), scorer.info.model_id, scorer.options)
    profile = store.get(args.profile or settings.default_profile)
    failed = False
    for start in range(0, len(args.images), args.batch_size):
        chunk = args.images[start : start + args.batch_size]
        prepared, names = [], []
        for path in chunk:
            try:
                prepared.append(scorer.decode(path.read_bytes()))
                names.append(path)
            except (InvalidInput, OSError) as exc:
                failed = True
                print(json.dumps({"image": str(path), "error": str(exc)}))
        stats = scorer.run(prepared)
        for path, s, v in zip(names, stats, profile.verdicts(stats), strict=True):
            line = {
                "image": str(path),
                "score": v.score,
                "threshold": v.threshold,
                "is_anomaly": v.is_anomaly,
                "percentile": round(v.percentile, 3),
                "p_value": v.p_value,
                "profile": profile.name,
                "model_id": scorer.info.model_id,
            }
            if args.features:
                line["features"] = s.features.tolist()
            print(json.dumps(line))
        sys.stdout.flush()
    return 1 if failed else 0
