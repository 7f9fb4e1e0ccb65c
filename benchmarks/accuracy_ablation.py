"""Ablation of METHOD.md's options on ../shared/data: which defaults detect best.

Feature-changing options that share a trajectory (SSIM weighting form, lambda, SSIM target, sigma scaling,
and the aggregation of the per-step sums: six sums or per-step energies) are computed from ONE walk per
batch with one accumulator per variant; K, the time range and the trajectory mode need their own walks;
density options (mixture size, covariance) are refitted on cached features.

    python benchmarks/accuracy_ablation.py --data ../shared/data --fit-limit 500 --limit 300 --json out.json
    python benchmarks/accuracy_ablation.py --walks 10:1.0:ddim 10:0.5:ddim 20:1.0:ddim --json out.json
    python benchmarks/accuracy_ablation.py --walks 10:1.0:ddim 10:1.0:diffpath --json out.json  # trajectories
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from app.bootstrap import set_engine_threads
from app.engine.calibration.fit import fit_profile
from app.engine.engine import Engine
from app.engine.methods import density_reg
from app.engine.methods.diffpath_v2 import amplified_error
from app.engine.methods.path_sums import PathAccumulator, stein_error
from app.engine.ssim import ssim_map
from app.engine.trajectory import content_noise, trajectory_grid, walk
from app.engine.types import MethodOptions
from app.offline.datasets import list_images
from app.offline.evaluation import detection_metrics

OOD_SETS = ("cifar10", "mnist", "dtd", "imagenet")

# name -> options (only feature-side fields differ within one walk group)
WALK_VARIANTS: dict[str, MethodOptions] = {
    "v2 amplify l=1 (default)": MethodOptions(),
    "v2 amplify l=0.5": MethodOptions(ssim_lambda=0.5),
    "v2 amplify l=3": MethodOptions(ssim_lambda=3.0),
    "v2 dissimilarity only": MethodOptions(ssim_weighting="dissimilarity"),
    "v2 no SSIM (Stein error only)": MethodOptions(ssim_weighting="none"),
    "v2 SSIM on noise": MethodOptions(ssim_target="noise"),
    "v2 amplify + sigma scaling": MethodOptions(sigma_scaling=True),
    "6d (DiffPath)": MethodOptions(method="diffpath-6d"),
}


AGGREGATIONS = ("sum", "per-step", "per-step-centre")


def walk_features(
    engine: Engine, paths: list[Path], steps: int, t_max: float, trajectory: str, batch: int = 64
) -> dict[tuple[str, str], np.ndarray]:
    """{(variant name, aggregation): (N, D) features} from one trajectory walk per batch."""
    model = engine.model
    out: dict[tuple[str, str], list[np.ndarray]] = {(n, a): [] for n in WALK_VARIANTS for a in AGGREGATIONS}
    for start in range(0, len(paths), batch):
        prepared = [engine.decode(p.read_bytes()) for p in paths[start : start + batch]]
        x0 = torch.stack([p.tensor for p in prepared]).to(model.device)
        ts = trajectory_grid(trajectory, len(model.alphas_cumprod), steps, t_max)
        noise = content_noise([p.digest for p in prepared], tuple(x0.shape[1:]), x0.device)
        accs = {name: PathAccumulator(steps, regions=True) for name in WALK_VARIANTS}
        with torch.inference_mode():
            for step in walk(model, x0, ts, trajectory, noise if trajectory == "forward" else None):
                image_ssim = ssim_map(x0, step.xhat0)  # shared by the image-SSIM variants
                for name, opts in WALK_VARIANTS.items():
                    if opts.method == "diffpath-6d":
                        accs[name].add(step.eps_k, stein_error(step, opts))
                        continue
                    if opts.ssim_target == "image" and opts.ssim_weighting != "none":
                        e = stein_error(step, opts)
                        d = 1.0 - image_ssim
                        a = e * (d if opts.ssim_weighting == "dissimilarity" else 1.0 + opts.ssim_lambda * d)
                    else:
                        a = amplified_error(step, x0, opts)
                    accs[name].add(a, a)
        for name, acc in accs.items():
            for aggregation in AGGREGATIONS:
                out[name, aggregation].append(acc.result(ts, aggregation).features.double().numpy())
    return {key: np.concatenate(v) for key, v in out.items()}


def evaluate(features: dict[str, np.ndarray], options: MethodOptions) -> dict[str, float]:
    profile = fit_profile("ablation", features["fit"], model_id="m", options=options, fprs=(0.05,))
    id_scores = profile.score(features["id"])
    return {ood: detection_metrics(id_scores, profile.score(features[ood]))[0] for ood in OOD_SETS}


def fit_size_rows(
    per_set: dict[str, dict[tuple[str, str], np.ndarray]], steps: int, sizes: list[int]
) -> list[dict]:
    """How many normal images the density needs: the default variant refitted on seeded subsets."""
    rows = []
    variant = next(v for v in WALK_VARIANTS if v.endswith("(default)"))
    # the six sums with their default regularisation; per-step with the old 1e-4 and with its default;
    # the centre/border energies (the default) with theirs
    for aggregation, reg in (
        ("sum", None),
        ("per-step", 1e-4),
        ("per-step", None),
        ("per-step-centre", None),
    ):
        base = WALK_VARIANTS[variant]
        opts = replace(base, steps=steps, aggregation=aggregation, covariance_reg=reg)  # type: ignore[arg-type]
        fit_all = per_set["fit"][variant, aggregation]
        for n in sizes:
            runs = []
            for seed in range(3):
                subset = np.random.default_rng(seed).permutation(len(fit_all))[:n]
                feats = {name: per_set[name][variant, aggregation] for name in per_set}
                runs.append(evaluate({**feats, "fit": fit_all[subset]}, opts))
            aurocs = {ood: float(np.mean([r[ood] for r in runs])) for ood in OOD_SETS}
            row = {"steps": steps, "variant": variant, "aggregation": aggregation, "fit_size": n, **aurocs}
            row["covariance_reg"] = density_reg(opts)
            row["mean"] = float(np.mean(list(aurocs.values())))
            rows.append(row)
            print(
                f"fit on {n:<5} {aggregation:<9} reg {density_reg(opts):<6} "
                + " ".join(f"{aurocs[s]:.3f}" for s in OOD_SETS)
                + f"  mean {row['mean']:.3f}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("model_store/celeba32-ref"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--fit-limit", type=int, default=500)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument(
        "--walks",
        nargs="+",
        default=["10:1.0:ddim", "5:1.0:ddim", "20:1.0:ddim"],
        help="trajectories as K:t_max_fraction:mode (mode ddim, diffpath or forward); the first gets the "
        "density grid",
    )
    ap.add_argument(
        "--fit-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also refit the default variant on this many fitting images (3 seeded subsets each)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    # the scoring commands' thread policy (app/bootstrap.py): torch on one thread beside ONNX Runtime's pool
    set_engine_threads("cpu", "auto", "auto", args.threads)
    engine = Engine(args.model, device="cpu", torch_threads=args.threads)
    engine.load(warmup_batch=0)
    celeba = list_images(args.data / "celeba", seed=0)
    sets = {
        "fit": celeba[: args.fit_limit],
        "id": celeba[len(celeba) // 2 :][: args.limit],
        **{ood: list_images(args.data / ood, args.limit, seed=0) for ood in OOD_SETS},
    }
    walks = [(int(k), float(t), mode) for k, t, mode in (w.split(":") for w in args.walks)]
    rows = []
    for steps, t_max, trajectory in walks:
        t0 = time.perf_counter()
        per_set = {n: walk_features(engine, paths, steps, t_max, trajectory) for n, paths in sets.items()}
        for (variant, aggregation), _ in per_set["fit"].items():
            feats = {name: per_set[name][variant, aggregation] for name in sets}
            opts = replace(
                WALK_VARIANTS[variant],
                steps=steps,
                t_max_fraction=t_max,
                trajectory=trajectory,  # type: ignore[arg-type]
                aggregation=aggregation,  # type: ignore[arg-type]
            )
            density_grid = [("full, BIC<=8", opts)]
            if (steps, t_max, trajectory) == walks[0] and variant.endswith("(default)"):
                density_grid += [
                    ("full, 1 comp", replace(opts, mixture_max_components=1)),
                    ("diag, BIC<=8", replace(opts, covariance_type="diag")),
                    ("full, BIC<=16", replace(opts, mixture_max_components=16)),
                    ("full, reg 1e-4", replace(opts, covariance_reg=1e-4)),
                    ("full, reg 0.1", replace(opts, covariance_reg=0.1)),
                ]
            for density, o in density_grid:
                aurocs = evaluate(feats, o)
                row = {
                    "covariance_reg": density_reg(o),
                    "steps": steps,
                    "t_max_fraction": t_max,
                    "trajectory": trajectory,
                    "variant": variant,
                    "aggregation": aggregation,
                    "density": density,
                    **aurocs,
                }
                row["mean"] = float(np.mean([aurocs[s] for s in OOD_SETS]))
                rows.append(row)
                print(
                    f"K={steps:<3} t<={t_max:<4} {trajectory:<7} {variant:<29} "
                    f"{aggregation:<9} {density:<12} "
                    + " ".join(f"{aurocs[s]:.3f}" for s in OOD_SETS)
                    + f"  mean {row['mean']:.3f}",
                    flush=True,
                )
        print(f"  (walk K={steps} t<={t_max} {trajectory}: {time.perf_counter() - t0:.0f} s)", flush=True)
        if (steps, t_max, trajectory) == walks[0]:
            rows += fit_size_rows(per_set, steps, args.fit_sizes)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"sets": {k: len(v) for k, v in sets.items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
