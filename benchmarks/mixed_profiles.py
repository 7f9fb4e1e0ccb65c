"""Cost of a batch whose images belong to profiles with different features, beside a one-profile batch.

One walk per batch computes everything every aggregation reads (docs/METHOD.md, "Features"); each profile
then derives its own features on the host. This measures both on the same loaded engine, the same images,
rounds interleaved so that load from other processes hits both alike, and prints the ratio.

    python -m benchmarks.mixed_profiles --json runs/mixed-profiles.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from app.bootstrap import set_torch_threads
from app.engine.calibration.choice import calibrate_profile
from app.engine.calibration.profile import Profile
from app.engine.engine import Engine
from app.offline.datasets import list_images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("model_store/celeba32-ref"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    # the richest features by default: the texture profile then reads everything the walk keeps
    ap.add_argument("--texture-aggregation", default="per-step-centre+embedding+spread")
    args = ap.parse_args(argv)
    set_torch_threads(args.threads)
    engine = Engine(args.model, device="cpu", torch_threads=args.threads)
    engine.load(warmup_batch=2)
    faces = Profile.load(args.model / "profiles" / "default.json")
    reference = [engine.decode(p.read_bytes()) for p in list_images(args.data / "dtd", 100, seed=1)]
    textures = calibrate_profile(
        "textures",
        engine.image_stats(reference),
        engine.options,
        args.texture_aggregation,
        model_id=engine.info.model_id,
    )
    half = args.batch // 2
    paths = list_images(args.data / "celeba", half, seed=2) + list_images(args.data / "dtd", half, seed=2)
    batch = [engine.decode(p.read_bytes()) for p in paths]
    plans = {
        "one profile": lambda stats: faces.verdicts(stats),
        "two profiles (features differ)": lambda stats: (
            faces.verdicts(stats[:half]) + textures.verdicts(stats[half:])
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in plans}
    order = list(plans)
    for round_ in range(args.rounds):
        # alternate which plan goes first: the first of a round pays for whatever the host did before
        for name in order if round_ % 2 == 0 else order[::-1]:
            judge = plans[name]
            t0 = time.perf_counter()
            judge(engine.image_stats(batch))
            times[name].append((time.perf_counter() - t0) / len(batch))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    base = medians["one profile"]
    result = {
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "runtime": engine.info.runtime,
        "texture_profile": textures.options.aggregation,
        "ms_per_image": {n: 1000 * m for n, m in medians.items()},
        "ratio_to_one_profile": {n: m / base for n, m in medians.items()},
        "all_ms_per_image": {n: [1000 * v for v in t] for n, t in times.items()},
    }
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
