"""``ddm-anomaly calibrate``: fit a calibration profile on a folder of normal images."""

from __future__ import annotations

import argparse
import json
import sys

from app.commands.common import add_engine_args, load_engine, profiles_dir, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a calibration profile on normal images",
        description=(
            "Run every image of --images through the model, choose the profile's features from these images "
            "alone (--aggregation auto, the default; or name one), fit the density on them, and store the "
            "profile (JSON, next to the model in <model>/profiles/NAME.json). Thresholds are set so that the "
            "given false-positive rates hold on new normal images (cross-fitted)."
        ),
    )
    add_engine_args(p)
    p.add_argument("--name", required=True, help="profile name (letters, digits, '_', '-')")
    p.add_argument("--images", required=True, nargs="+", help="folder(s) of normal images")
    p.add_argument("--limit", type=int, help="at most N images per folder (seeded random choice)")
    p.add_argument(
        "--fpr",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 0.1],
        help="false-positive rates to store thresholds for",
    )
    p.add_argument(
        "--default-fpr", type=float, default=0.05, help="the rate whose threshold gives is_anomaly"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing profile of that name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.bootstrap import apply_thread_policy
    from app.engine.calibration.choice import calibrate_profile
    from app.engine.calibration.store import ProfileStore, validate_profile_name
    from app.offline.datasets import folder_statistics, list_images

    validate_profile_name(args.name)
    settings = settings_from_args(args)
    apply_thread_policy(settings)
    engine = load_engine(settings)
    paths = [
        p for folder in args.images for p in list_images(folder, args.limit, seed=0 if args.limit else None)
    ]
    kept, stats = folder_statistics(engine, paths, batch_size=args.batch_size, desc="calibrating")
    profile = calibrate_profile(
        args.name,
        stats[engine.options.method],
        engine.options,
        settings.aggregation,
        model_id=engine.info.model_id,
        fprs=tuple(args.fpr),
        default_fpr=args.default_fpr,
        source=", ".join(f"{folder}" for folder in args.images) + f" ({len(kept)} images)",
    )
    store = ProfileStore(profiles_dir(settings), engine.info.model_id, engine.options)
    path = store.save(profile, overwrite=args.overwrite)
    for warning in profile.warnings():  # also in the summary's "warnings"
        print(f"warning: {warning}", file=sys.stderr)
    json.dump({"profile": str(path), **profile.summary()}, sys.stdout)
    sys.stdout.write("\n")
    return 0
