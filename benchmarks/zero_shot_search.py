"""Zero-shot feature search: every set of ../shared/data as the normal domain in turn (docs/ACCURACY.md,
"Any normal domain").

1. ``walk``: run the shipped model once over each set's fit / dev / held splits and cache, per image, the
   per-step amplified Stein error a_k (N, K, C, H, W) float16 and the noise maps eps_k.
2. ``search``: candidate feature recipes from the cache, each fitted on every set's fit split and scored on
   the other sets' dev split (the N x N AUROC matrix), beside the zero-shot criterion computed on the normal
   set's own images only.

    python -m benchmarks.zero_shot_search walk --cache runs/zero-shot
    python -m benchmarks.zero_shot_search search --cache runs/zero-shot --json runs/zero-shot-dev.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from app.engine.methods.diffpath_v2 import amplified_error
from app.engine.scorer import Scorer
from app.engine.ssim import ssim_reference
from app.engine.trajectory import trajectory_grid, walk
from app.engine.types import MethodOptions
from app.offline.datasets import list_images

SETS = ("celeba", "cifar10", "dtd", "mnist", "imagenet")


def splits(data: Path, fit: int = 400, score: int = 300) -> dict[str, dict[str, list[Path]]]:
    """set -> fit / dev / held paths: the seeded order's first ``fit`` images, then the rest halved (dev
    first), each half capped at ``score``."""
    out = {}
    for name in SETS:
        files = list_images(data / name, seed=0)
        rest = files[fit:]
        half = min(score, len(rest) // 2)
        out[name] = {"fit": files[:fit], "dev": rest[:half], "held": rest[half : 2 * half]}
    return out


def walk_paths(scorer: Scorer, paths: list[Path], options: MethodOptions, batch: int = 50) -> dict:
    model = scorer.model
    ts = trajectory_grid(options.trajectory, len(model.alphas_cumprod), options.steps, options.t_max_fraction)
    amp, eps, x0s = [], [], []
    for start in range(0, len(paths), batch):
        prepared = [scorer.decode(p.read_bytes()) for p in paths[start : start + batch]]
        x0 = torch.stack([p.tensor for p in prepared]).to(model.device)
        reference = ssim_reference(x0)
        a_steps, n_steps = [], []
        with torch.inference_mode():
            for step in walk(model, x0, ts, options.trajectory):
                a_steps.append(amplified_error(step, reference, options).half())
                n_steps.append(step.eps_k.half())
        amp.append(torch.stack(a_steps, 1).numpy())
        eps.append(torch.stack(n_steps, 1).numpy())
        x0s.append(x0.half().numpy())
    return {"amp": np.concatenate(amp), "eps": np.concatenate(eps), "x0": np.concatenate(x0s)}


def run_walk(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    scorer = Scorer(args.model, device="cpu", torch_threads=args.threads)
    scorer.load(warmup_batch=0)
    options = MethodOptions(steps=args.steps)
    out_dir = args.cache / f"K{args.steps}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, parts in splits(args.data).items():
        for part, paths in parts.items():
            target = out_dir / f"{name}_{part}.npz"
            if target.exists() or (args.parts and part not in args.parts):
                continue
            t0 = time.perf_counter()
            np.savez(target, **walk_paths(scorer, paths, options))
            print(f"{name}_{part}: {len(paths)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("walk")
    w.add_argument("--model", type=Path, default=Path("model_store/celeba32-ref"))
    w.add_argument("--data", type=Path, default=Path("../shared/data"))
    w.add_argument("--cache", type=Path, required=True)
    w.add_argument("--steps", type=int, default=10)
    w.add_argument("--parts", nargs="*")
    w.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    return run_walk(args)


if __name__ == "__main__":
    raise SystemExit(main())
