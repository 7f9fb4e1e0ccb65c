"""Which UNet block describes an image best for the embedding expert (docs/METHOD.md, "Embedding expert";
docs/ACCURACY.md, "Any normal domain"): every set of the data folder as the normal domain in turn.

1. ``walk``: run the shipped model over each set's fit / dev / held splits (``zero_shot_search.splits``)
   and cache, per image and per step 1..5 of K = 10, the output of several UNet blocks average-pooled to
   4 x 4 and each channel's spread over the image (float16).
2. ``search``: each candidate is the energy expert (a Gaussian mixture on ``per-step-centre``, from
   ``zero_shot_search``'s cache) plus one embedding expert ``BLOCK/STEPS/KIND:DENSITY``, e.g.
   ``u0/2,4/mean:lw``; experts are scaled by the median and IQR of their cross-fitted scores and summed,
   as ``ExpertsDensity`` does. Prints the 12-pair mean without MNIST and the pairs, and each set's
   generalisation gap at the fitting size (docs/METHOD.md, "Choosing features") with ``--gaps``.

    python -m benchmarks.zero_shot_search walk --cache runs/zero-shot --parts fit dev held
    python -m benchmarks.embedding_search walk --cache runs/zero-shot
    python -m benchmarks.embedding_search search --cache runs/zero-shot --split dev \
        u1/2,4/mean:lw u0/2,4/mean:lw u0/2,4/std:lw mid/2,4/mean:lw --gaps
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.zero_shot_search import SETS, candidate_features, splits

BLOCKS = {"d1": ("down_blocks", 1), "d2": ("down_blocks", 2), "mid": ("mid_block", None),
          "u0": ("up_blocks", 0), "u1": ("up_blocks", 1), "u2": ("up_blocks", 2)}  # fmt: skip
STEPS = (1, 2, 3, 4, 5)  # of K = 10: the low-noise half, where the image is still mostly signal


def run_walk(args: argparse.Namespace) -> int:
    from app.engine.engine import Engine
    from app.engine.trajectory import trajectory_grid, walk

    torch.set_num_threads(args.threads)
    engine = Engine(args.model, device="cpu", runtime="torch", torch_threads=args.threads)
    engine.load(warmup_batch=0)
    model, grabbed = engine.model, {}
    for name, (attr, index) in BLOCKS.items():
        block = getattr(model.unet, attr) if index is None else getattr(model.unet, attr)[index]

        def keep(_m: object, _i: object, out: object, name: str = name) -> None:
            o = (out[0] if isinstance(out, tuple) else out).float()  # type: ignore[index]
            pooled = torch.nn.functional.adaptive_avg_pool2d(o, 4)
            grabbed.setdefault(name, []).append((pooled.half(), o.std(dim=(2, 3)).half()))

        block.register_forward_hook(keep)
    ts = trajectory_grid("ddim", len(model.alphas_cumprod), 10, 1.0)
    out = args.cache / "blocks"
    out.mkdir(parents=True, exist_ok=True)
    for set_name, parts in splits(args.data).items():
        for part, paths in parts.items():
            target, t0, kept = out / f"{set_name}_{part}.npz", time.perf_counter(), {}
            if target.exists():
                continue
            for start in range(0, len(paths), 50):
                x0 = torch.stack([engine.decode(p.read_bytes()).tensor for p in paths[start : start + 50]])
                grabbed.clear()
                with torch.inference_mode():
                    for _ in walk(model, x0, ts, "ddim"):
                        pass
                for name, per_step in grabbed.items():
                    kept.setdefault(f"{name}_pool", []).append(
                        torch.stack([per_step[s][0] for s in STEPS], 1)
                    )
                    kept.setdefault(f"{name}_std", []).append(torch.stack([per_step[s][1] for s in STEPS], 1))
            np.savez(target, **{k: torch.cat(v).numpy() for k, v in kept.items()})
            print(f"{set_name}_{part}: {len(paths)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def block_features(cache: Path, set_name: str, part: str, spec: str) -> np.ndarray:
    """``BLOCK/STEPS/KIND``: KIND mean (spatial mean), std (spread), q2 (2 x 2 quadrant means)."""
    block, steps, kind = spec.split("/")
    data = np.load(cache / "blocks" / f"{set_name}_{part}.npz")
    chosen = [STEPS.index(int(s)) for s in steps.split(",")]
    pool = data[f"{block}_pool"][:, chosen].astype(np.float64)  # (N, S, C, 4, 4)
    n = len(pool)
    if kind == "mean":
        return pool.mean(axis=(3, 4)).reshape(n, -1)
    if kind == "std":
        return data[f"{block}_std"][:, chosen].astype(np.float64).reshape(n, -1)
    if kind == "q2":
        return pool.reshape(*pool.shape[:3], 2, 2, 2, 2).mean(axis=(4, 6)).reshape(n, -1)
    raise ValueError(f"unknown kind {kind!r}")


def run_search(args: argparse.Namespace) -> int:
    from sklearn.metrics import roc_auc_score

    from app.engine.calibration.density import ExpertsDensity, cross_fitted_scores
    from app.engine.calibration.fit import density_kwargs_for
    from app.engine.types import MethodOptions

    shipped = MethodOptions(
        aggregation="per-step-centre+embedding"
    )  # the experts and settings calibrate uses

    def features(set_name: str, part: str, spec: str) -> np.ndarray:
        cached = dict(np.load(args.cache / "K10" / f"{set_name}_{part}.npz"))
        energies = candidate_features(cached, "cb")
        return np.concatenate([energies, block_features(args.cache, set_name, part, spec)], 1)

    for candidate in args.candidates:
        spec, density = candidate.split(":")
        if density != "lw":
            raise SystemExit("only lw (the shipped embedding expert's density) is searched here")
        aurocs, gaps = {}, {}
        for normal in SETS:
            fit = features(normal, "fit", spec)
            kwargs = density_kwargs_for(shipped, fit)
            experts = ExpertsDensity.fit(fit, **kwargs)
            scores = {s: -experts.log_density(features(s, args.split, spec)) for s in SETS}
            for other in SETS:
                if other != normal:
                    y = np.r_[np.zeros(len(scores[normal])), np.ones(len(scores[other]))]
                    aurocs[(normal, other)] = roc_auc_score(y, np.r_[scores[normal], scores[other]])
            if args.gaps:
                held = cross_fitted_scores(fit, ExpertsDensity, kwargs)
                q25, q75 = np.percentile(held, [25, 75])
                gaps[normal] = (np.median(held) - np.median(-experts.log_density(fit))) / (q75 - q25)
        twelve = [v for (a, b), v in aurocs.items() if "mnist" not in (a, b)]
        pairs = " ".join(f"{a[:3]}>{b[:3]} {v:.3f}" for (a, b), v in aurocs.items() if "mnist" not in (a, b))
        print(f"{candidate}: 12-pair mean {np.mean(twelve):.3f} | {pairs}", flush=True)
        if gaps:
            print("  gaps: " + " ".join(f"{s} {g:.2f}" for s, g in gaps.items()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("walk")
    w.add_argument("--model", type=Path, default=Path("model_store/celeba32-ref"))
    w.add_argument("--data", type=Path, default=Path("../shared/data"))
    w.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("search")
    s.add_argument("candidates", nargs="+", help="BLOCK/STEPS/KIND:lw, e.g. u0/2,4/mean:lw")
    s.add_argument("--split", choices=("dev", "held"), default="dev")
    s.add_argument("--gaps", action="store_true", help="also each set's generalisation gap")
    for q in (w, s):
        q.add_argument("--cache", type=Path, default=Path("runs/zero-shot"))
    args = p.parse_args(argv)
    return run_walk(args) if args.command == "walk" else run_search(args)


if __name__ == "__main__":
    raise SystemExit(main())
