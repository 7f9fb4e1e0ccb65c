"""Search for features that use what the trajectory already computes (docs/ACCURACY.md), measured honestly.

Stages, so that the model runs once and every candidate feature is evaluated from a cache:

1. ``walk``: run the shipped model (default options, K steps) over a development split and a held-back
   split of ``../shared/data`` and store, per image, the per-step Stein error maps e_k, the SSIM
   dissimilarity maps 1 - S_k (the amplified error is a_k = e_k * (1 + (1 - S_k))) and the noise maps
   eps_k, (N, K, C, H, W) float16, plus the engine's own per-step features as a check (``--flip`` walks
   mirrored images; not used: at twice the cost it is outside the budget).
2. ``search`` (benchmarks/feature_candidates.py): candidate features from the cache (spatial, colour and
   frequency pooling of the per-step energies), densities (the engine's GMM, Ledoit-Wolf Gaussian, PCA
   whitening, kNN distance) fitted on the fit split, AUROC per OOD set with Hanley-McNeil standard errors
   on the dev split; ``--compare A B`` adds the paired-bootstrap difference of two candidates; ``--final``
   scores the held-back split instead (for the chosen candidates only).
3. ``cost``: engine milliseconds per image of two aggregations, interleaved rounds on one loaded model.

A control set, ``dev_id_jpeg`` / ``held_id_jpeg``: the same faces made as the CIFAR-10 copies were (32 px,
JPEG quality 75, bicubic back to 64 px). A feature that flags these detects how an image was made rather
than what it shows; the search reports the share flagged at the 5% threshold and CIFAR-10 vs these faces.

Splits (seeded, identity-aware): 28 CelebA identities (~840 images) are held back and never used for any
choice; of the other CelebA images (``list_images(seed=0)`` order, as accuracy_ablation.py) the first 600
fit the densities and 400 from the second half are the dev normals. OOD sets: the first 400 of
``list_images(seed=0)`` are dev, the next 300 held back.

    python -m benchmarks.feature_search walk --cache CACHE --steps 10
    python -m benchmarks.feature_search search --cache CACHE --steps 10 --json out.json
    python -m benchmarks.feature_search search --cache CACHE --steps 10 --final --only "per-step (today)" \
        "centre/border" --densities gmm --compare "per-step (today)" "centre/border" --json out.json
    python -m benchmarks.feature_search cost --cache CACHE --json out.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.engine.engine import Engine
from app.engine.methods.diffpath_v2 import amplified_error
from app.engine.methods.path_sums import PathAccumulator, stein_error
from app.engine.ssim import ssim_map, ssim_reference
from app.engine.trajectory import trajectory_grid, walk
from app.engine.types import MethodOptions
from app.offline.datasets import list_images

OOD_SETS = ("cifar10", "mnist", "dtd", "imagenet")
HELD_IDENTITIES = 28


def splits(
    data: Path, fit_limit: int = 600, dev_limit: int = 400, held_limit: int = 400
) -> dict[str, list[Path]]:
    """name -> image paths: fit, dev_id, held_id, <ood>_dev, <ood>_held."""
    celeba = list_images(data / "celeba", seed=0)
    with open(data / "celeba" / "index.csv") as fh:
        identity = {row["file"]: row["label"] for row in csv.DictReader(fh)}
    ids = sorted(set(identity.values()))
    held_ids = set(random.Random(17).sample(ids, HELD_IDENTITIES))
    held = [p for p in celeba if identity[p.name] in held_ids]
    rest = [p for p in celeba if identity[p.name] not in held_ids]
    out = {
        "fit": rest[:fit_limit],
        "dev_id": rest[len(rest) // 2 :][:dev_limit],
        "held_id": held[:held_limit],
    }
    # control: the dev faces through CIFAR-10's pipeline (32 px, JPEG quality 75, bicubic back to 64 px)
    out["dev_id_jpeg"], out["held_id_jpeg"] = out["dev_id"], out["held_id"]
    for ood in OOD_SETS:
        files = list_images(data / ood, seed=0)
        out[f"{ood}_dev"] = files[:400]
        out[f"{ood}_held"] = files[400:700]
    return out


def like_cifar(path: Path) -> Image.Image:
    """A face as CIFAR-10 copies were made: 32 px, JPEG quality 75, bicubic up to 64 px."""
    small = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)


def walk_set(
    engine: Engine, paths: list[Path], options: MethodOptions, flip: bool, jpeg: bool = False, batch: int = 50
) -> dict:
    model = engine.model
    ts = trajectory_grid(options.trajectory, len(model.alphas_cumprod), options.steps, options.t_max_fraction)
    err, dis, eps, feats, x0s = [], [], [], [], []
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        if jpeg:
            prepared = [engine.prepare(like_cifar(p)) for p in chunk]
        else:
            prepared = [engine.decode(p.read_bytes()) for p in chunk]
        x0 = torch.stack([p.tensor for p in prepared]).to(model.device)
        if flip:
            x0 = x0.flip(-1)
        reference = ssim_reference(x0)
        acc = PathAccumulator(options.steps)
        e_steps, d_steps, n_steps = [], [], []
        with torch.inference_mode():
            for step in walk(model, x0, ts, options.trajectory):
                a = amplified_error(step, reference, options)  # exactly what the engine computes
                acc.add(a, a)
                e_steps.append(stein_error(step, options).half())
                d_steps.append((1.0 - ssim_map(x0, step.xhat0)).half())
                n_steps.append(step.eps_k.half())
        err.append(torch.stack(e_steps, 1).numpy())
        dis.append(torch.stack(d_steps, 1).numpy())
        eps.append(torch.stack(n_steps, 1).numpy())
        feats.append(acc.result(ts, "per-step").features.double().numpy())
        x0s.append(x0.half().numpy())
    return {
        "err": np.concatenate(err),
        "dis": np.concatenate(dis),
        "eps": np.concatenate(eps),
        "engine_features": np.concatenate(feats),
        "x0": np.concatenate(x0s),
    }


def run_walk(args: argparse.Namespace) -> int:
    engine = Engine(args.model, device="cpu", torch_threads=args.threads)
    engine.load(warmup_batch=0)
    options = MethodOptions(steps=args.steps)
    out_dir = args.cache / (f"K{args.steps}" + ("-flip" if args.flip else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = splits(args.data)
    names = args.sets or list(sets)
    (out_dir / "files.json").write_text(json.dumps({n: [p.name for p in v] for n, v in sets.items()}))
    for name in names:
        target = out_dir / f"{name}.npz"
        if target.exists():
            continue
        t0 = time.perf_counter()
        arrays = walk_set(engine, sets[name], options, args.flip, jpeg=name.endswith("_jpeg"))
        np.savez(target, **arrays)
        dt = time.perf_counter() - t0
        print(f"K={args.steps} flip={args.flip} {name}: {len(sets[name])} images in {dt:.0f} s", flush=True)
    return 0


def run_cost(args: argparse.Namespace) -> int:
    """Engine cost per image of today's default and the candidate aggregation, side by side: the same loaded
    model, the same batch, rounds interleaved so that load from other processes hits both alike; also checks
    that the engine's per-step-centre features are the ones the search measured from the cache."""
    from benchmarks.feature_candidates import Candidate, candidate_features, load, path_maps

    torch.set_num_threads(args.threads)
    engine = Engine(args.model, device="cpu", runtime=args.runtime)
    engine.load(warmup_batch=2)
    paths = splits(args.data)["fit"][: args.batch]
    batch = [engine.decode(p.read_bytes()) for p in paths]
    contenders = {a: MethodOptions(steps=args.steps, aggregation=a) for a in args.aggregations}  # type: ignore[arg-type]
    times: dict[str, list[float]] = {a: [] for a in contenders}
    features: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, options in contenders.items():
            engine.options = options
            t0 = time.perf_counter()
            stats = engine.image_stats(batch)
            times[name].append((time.perf_counter() - t0) / len(batch))
            features[name] = np.stack([s.features for s in stats])
    cache = args.cache / f"K{args.steps}" / "fit.npz"
    check = {}
    if cache.exists() and "per-step-centre" in features:
        maps = path_maps(load(args.cache / f"K{args.steps}", "fit"), args.steps)
        cached = candidate_features({k: v[: args.batch] for k, v in maps.items()}, Candidate(place="cb"))
        check["max_abs_diff_engine_vs_cache"] = float(np.abs(features["per-step-centre"] - cached).max())
    medians = {a: float(np.median(t)) for a, t in times.items()}
    base = medians[args.aggregations[0]]
    result = {
        "steps": args.steps,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "runtime": engine.info.runtime,
        "ms_per_image": {a: 1000 * m for a, m in medians.items()},
        "ratio_to_first": {a: m / base for a, m in medians.items()},
        "all_ms_per_image": {a: [1000 * v for v in t] for a, t in times.items()},
        **check,
    }
    print(json.dumps(result, indent=2), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("walk", help="run the model once and cache the per-step maps")
    w.add_argument("--model", type=Path, default=Path("model_store/celeba32-ref"))
    w.add_argument("--data", type=Path, default=Path("../shared/data"))
    w.add_argument("--cache", type=Path, required=True)
    w.add_argument("--steps", type=int, default=10)
    w.add_argument("--flip", action="store_true", help="walk the horizontally flipped images")
    w.add_argument("--sets", nargs="*", help="only these sets (default: all)")
    w.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("search", help="evaluate candidate features from the cache")
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--final", action="store_true", help="score the held-back split (not for choices)")
    s.add_argument("--only", nargs="*", help="only these candidates")
    s.add_argument("--densities", nargs="+", default=["gmm", "lw", "pca", "knn"])
    s.add_argument(
        "--compare", nargs=2, metavar=("BASE", "NEW"), help="paired bootstrap of two candidates (gmm)"
    )
    s.add_argument("--json", type=Path, required=True)
    c = sub.add_parser("cost", help="engine cost per image, default vs candidate, interleaved")
    c.add_argument("--model", type=Path, default=Path("model_store/celeba32-ref"))
    c.add_argument("--data", type=Path, default=Path("../shared/data"))
    c.add_argument("--cache", type=Path, default=Path("/nonexistent"))
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--aggregations", nargs="+", default=["per-step", "per-step-centre"])
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--rounds", type=int, default=7)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--runtime", default="auto")
    c.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.command == "walk":
        return run_walk(args)
    if args.command == "cost":
        return run_cost(args)
    from benchmarks.feature_candidates import run_search

    return run_search(args)


if __name__ == "__main__":
    raise SystemExit(main())
