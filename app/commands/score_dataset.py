"""``ddm-anomaly score-dataset``: score a whole data set on Ray Data into a Parquet folder (app/bulk)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from app.commands.common import add_engine_args, settings_from_args
from app.errors import DDMError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score-dataset",
        help="score a whole data set on Ray (local, or a cluster)",
        description=(
            "Score every image INPUT names on Ray Data: files are decoded as the service decodes uploads "
            "(CPU tasks), scored by an actor pool that loads the model once per actor, judged with the "
            "profile, and written as rows of a Parquet folder OUT (path, score, threshold(s), is_anomaly, "
            "p_value, percentile, model_id, profile, options, error, node). A file that cannot be read or "
            "decoded becomes a row with its error. Without --address or RAY_ADDRESS a local Ray runs on this "
            "machine's CPUs. Needs the bulk extra: pip install 'ddm-anomaly[bulk]'. Prints a JSON summary."
        ),
    )
    p.add_argument(
        "input",
        help="a folder (its image files, recursively), a glob pattern, a text file of paths (one a line), "
        "or a .parquet / .csv file with a column of paths (--column)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="the Parquet folder to write (e.g. scores.parquet)"
    )
    p.add_argument("--profile", help="calibration profile name (default: DDM_DEFAULT_PROFILE, 'default')")
    p.add_argument(
        "--column", default="path", help="the column of paths in a Parquet/CSV INPUT (default path)"
    )
    p.add_argument("--resume", action="store_true", help="add to OUT, scoring only the paths not in it yet")
    ray_group = p.add_argument_group("Ray")
    ray_group.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    ray_group.add_argument(
        "--concurrency", type=int, help="scoring actors (default: one per GPU share, else one per node)"
    )
    ray_group.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    ray_group.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray_group.add_argument(
        "--part-rows", type=int, default=4096, help="rows per Parquet part, written atomically (default 4096)"
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from app.bulk import BulkOptions, score_dataset
    except ModuleNotFoundError as exc:
        if exc.name not in ("ray", "pyarrow", "pandas"):
            raise
        log.error("score-dataset needs Ray Data: pip install 'ddm-anomaly[bulk]' (missing %s)", exc.name)
        return 2
    options = BulkOptions(
        profile=args.profile,
        column=args.column,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        part_rows=args.part_rows,
        resume=args.resume,
        address=args.address,
    )
    try:
        summary = score_dataset(args.input, args.out, settings_from_args(args), options)
    except DDMError as exc:  # a bad INPUT, OUT, profile or model: said before any image is scored
        log.error("score-dataset: %s", exc)
        return 2
    print(json.dumps(dataclasses.asdict(summary)))
    return 0
