"""How much reduced precision (bf16 / fp16) and the other UNet runtimes move features and anomaly scores
against torch float32.

    python benchmarks/precision_check.py --json benchmarks/results/precision_cpu.json      # torch bf16 on CPU
    python benchmarks/precision_check.py --contenders torch:bfloat16 onnxruntime:float32 \
        --json benchmarks/results/precision_runtimes.json
    python benchmarks/precision_check.py --device cuda --contenders torch:bfloat16 torch:float16 --json ...

A profile is fitted on torch float32 features of ``--reference`` normal images; then held-out normal images
and ``--ood`` images are scored from torch float32 features and from each contender's (runtime:dtype).
Reported: feature differences in units of each feature's spread over the images, |score difference| (median,
95th percentile, max) in score units and as a fraction of the calibration scores' interquartile range, how
many verdicts flip at the profile's 5% threshold, and AUROC (normal vs OOD) for each dtype. Not a test; the
numbers go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.calibration.fit import fit_profile
from app.engine.engine import Engine
from app.engine.model.runtimes import build_runtime

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def features(engine: Engine, paths: list[Path], batch: int) -> np.ndarray:
    images = [engine.decode(p.read_bytes()) for p in paths]
    out = [
        s.features for i in range(0, len(images), batch) for s in engine.image_stats(images[i : i + batch])
    ]
    return np.stack(out)


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """P(score of an anomaly > score of a normal image), ties counted half."""
    greater = (anomalous[:, None] > normal[None, :]).mean()
    ties = (anomalous[:, None] == normal[None, :]).mean()
    return float(greater + 0.5 * ties)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "model_store" / "celeba32-ref")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--contenders",
        nargs="+",
        default=["torch:bfloat16"],
        help="runtime:dtype pairs compared with torch:float32",
    )
    p.add_argument("--normal", type=Path, default=DATA / "celeba")
    p.add_argument("--ood", type=Path, default=DATA / "cifar10")
    p.add_argument("--reference", type=int, default=200, help="normal images the profile is fitted on")
    p.add_argument("--test", type=int, default=100, help="held-out normal and OOD images scored")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    normal = sorted(args.normal.glob("*.png"))
    ood = sorted(args.ood.glob("*.png"))[: args.test]
    if len(normal) < args.reference + args.test or not ood:
        p.error("not enough images")
    reference, held_out = normal[: args.reference], normal[args.reference : args.reference + args.test]

    engine = Engine(args.model, device=args.device, dtype="float32", runtime="torch")
    engine.load(warmup_batch=0)
    fp32 = {name: features(engine, paths, args.batch) for name, paths in
            (("reference", reference), ("normal", held_out), ("ood", ood))}  # fmt: skip
    profile = fit_profile(
        "precision", fp32["reference"], model_id=engine.info.model_id, options=engine.options
    )
    cal = profile.calibration_scores
    iqr = float(np.subtract(*np.percentile(cal, [75, 25])))
    base_scores = {k: profile.score(fp32[k]) for k in ("normal", "ood")}
    result: dict[str, Any] = {
        "model": engine.info.model_id,
        "device": args.device,
        "images": {"reference": len(reference), "normal": len(held_out), "ood": len(ood)},
        "ood_set": args.ood.name,
        "calibration_iqr": iqr,
        "float32": {"auroc": auroc(base_scores["normal"], base_scores["ood"])},
    }
    model = engine.model
    for name in args.contenders:
        runtime, dtype = name.split(":")
        model.runtime = build_runtime(runtime, model.unet, model.device, DTYPES[dtype], threads=args.threads)
        reduced = {
            k: features(engine, paths, args.batch) for k, paths in (("normal", held_out), ("ood", ood))
        }
        both = np.concatenate([reduced["normal"], reduced["ood"]])
        base = np.concatenate([fp32["normal"], fp32["ood"]])
        spread = np.maximum(base.std(axis=0, keepdims=True), 1e-12)  # features in image-std units
        scores = {k: profile.score(reduced[k]) for k in reduced}
        diff = np.abs(np.concatenate([scores[k] - base_scores[k] for k in scores]))
        flips = sum(int(((scores[k] > profile.threshold) != (base_scores[k] > profile.threshold)).sum())
                    for k in scores)  # fmt: skip
        result[name] = {
            "feature_max_diff_over_image_std": np.max(np.abs(both - base) / spread, axis=0).tolist(),
            "feature_median_diff_over_image_std": np.median(np.abs(both - base) / spread, axis=0).tolist(),
            "score_abs_diff": {f"p{q}": float(np.percentile(diff, q)) for q in (50, 95, 100)},
            "score_abs_diff_over_iqr_p95": float(np.percentile(diff, 95) / iqr),
            "verdict_flips": flips,
            "scored": len(diff),
            "auroc": auroc(scores["normal"], scores["ood"]),
        }  # fmt: skip
    json.dump(result, sys.stdout, indent=2)
    print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
