"""Zero-shot feature search: every set of ../shared/data as the normal domain in turn (docs/ACCURACY.md,
"Any normal domain").

1. ``walk``: run the shipped model once over each set's fit / dev / held splits and cache, per image, the
   per-step amplified Stein error a_k (N, K, C, H, W) float16 and the noise maps eps_k.
2. ``search``: candidate energy features computed from the cache (docs/ACCURACY.md, "Any normal domain",
   what was tried), each fitted on every set's fit split (a Gaussian mixture, or ``--density`` knn/lw) and
   scored on every set's dev split: the N x N AUROC matrix and the 12-pair mean without MNIST. The shipped
   aggregations, the embedding expert among them, are measured by ``ddm-anomaly evaluate --matrix``.

    python -m benchmarks.zero_shot_search walk --cache runs/zero-shot --parts fit dev
    python -m benchmarks.zero_shot_search search --cache runs/zero-shot --candidates cb col cb+sp eps+cb \
        low4+ps --json runs/zero-shot-dev.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from app.engine.engine import Engine
from app.engine.methods.diffpath_v2 import amplified_error
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


def walk_paths(engine: Engine, paths: list[Path], options: MethodOptions, batch: int = 50) -> dict:
    model = engine.model
    ts = trajectory_grid(options.trajectory, len(model.alphas_cumprod), options.steps, options.t_max_fraction)
    amp, eps, x0s = [], [], []
    for start in range(0, len(paths), batch):
        prepared = [engine.decode(p.read_bytes()) for p in paths[start : start + batch]]
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
    engine = Engine(args.model, device="cpu", torch_threads=args.threads)
    engine.load(warmup_batch=0)
    options = MethodOptions(steps=args.steps)
    out_dir = args.cache / f"K{args.steps}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, parts in splits(args.data).items():
        for part, paths in parts.items():
            target = out_dir / f"{name}_{part}.npz"
            if target.exists() or (args.parts and part not in args.parts):
                continue
            t0 = time.perf_counter()
            np.savez(target, **walk_paths(engine, paths, options))
            print(f"{name}_{part}: {len(paths)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def candidate_features(cached: dict[str, np.ndarray], name: str) -> np.ndarray:
    """(N, D) features of candidate ``name`` ("+"-joined parts) from a cached split's maps."""
    a = torch.from_numpy(cached["amp"].astype(np.float32))  # (N, K, C, H, W)
    e = torch.from_numpy(cached["eps"].astype(np.float32))
    n, k, c, h, w = a.shape
    da, de = (a[:, 1:] - a[:, :-1]) * k, (e[:, 1:] - e[:, :-1]) * k

    def grid(q: torch.Tensor) -> torch.Tensor:  # (N, S, C, 4, 4) energies
        return q.pow(2).reshape(n, q.shape[1], c, 4, h // 4, 4, w // 4).sum(dim=(4, 6))

    def log(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(1e-12).log()

    def centre_border(g: torch.Tensor) -> torch.Tensor:
        centre = g[..., 1:3, 1:3].sum(dim=(2, 3, 4))
        return torch.stack([centre, g.sum(dim=(2, 3, 4)) - centre], -1).flatten(1)

    def low_share(q: torch.Tensor) -> torch.Tensor:  # energy of the 4 x 4 average-pooled map, as a share
        pooled = torch.nn.functional.avg_pool2d(q.flatten(0, 1), 4).pow(2).sum(dim=(1, 2, 3)) * 16
        return log(pooled.reshape(n, -1) / q.pow(2).sum(dim=(2, 3, 4)))

    parts = {
        "ps": lambda: log(torch.cat([a.pow(2).sum(dim=(2, 3, 4)), da.pow(2).sum(dim=(2, 3, 4))], 1)),
        "cb": lambda: log(torch.cat([centre_border(grid(a)), centre_border(grid(da))], 1)),
        "col": lambda: log(
            torch.cat([grid(a).sum(dim=(3, 4)).flatten(1), grid(da).sum(dim=(3, 4)).flatten(1)], 1)
        ),
        "sp": lambda: torch.cat([log(grid(q).sum(2)).flatten(2).std(-1) for q in (a, da)], 1),
        "csp": lambda: torch.cat([log(grid(q).sum(dim=(3, 4))).std(-1) for q in (a, da)], 1),
        "eps": lambda: log(torch.cat([e.pow(2).sum(dim=(2, 3, 4)), de.pow(2).sum(dim=(2, 3, 4))], 1)),
        "kurt": lambda: log(a.pow(4).mean(dim=(2, 3, 4)) / a.pow(2).mean(dim=(2, 3, 4)).pow(2)),
        "low4": lambda: low_share(a),
    }
    return torch.cat([parts[p]() for p in name.split("+")], 1).double().numpy()


def run_search(args: argparse.Namespace) -> int:
    import json

    from sklearn.covariance import LedoitWolf
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    from app.engine.calibration.density import GaussianMixtureDensity

    def detector(fit: np.ndarray):  # anomaly score function fitted on normal features
        if args.density == "gmm":
            gmm = GaussianMixtureDensity.fit(fit, reg_covar=0.1)
            return lambda x: -gmm.log_density(x)
        scale = StandardScaler().fit(fit)
        if args.density == "lw":
            lw = LedoitWolf().fit(scale.transform(fit))
            return lambda x: lw.mahalanobis(scale.transform(x))
        nn = NearestNeighbors(n_neighbors=5).fit(scale.transform(fit))
        return lambda x: nn.kneighbors(scale.transform(x))[0].mean(1)

    folder = args.cache / f"K{args.steps}"
    cached = {(s, p): dict(np.load(folder / f"{s}_{p}.npz")) for s in SETS for p in ("fit", "dev")}
    report = {}
    for name in args.candidates:
        matrix = {}
        for normal in SETS:
            score = detector(candidate_features(cached[normal, "fit"], name))
            scores = {s: score(candidate_features(cached[s, "dev"], name)) for s in SETS}
            for other in SETS:
                if other != normal:
                    y = np.r_[np.zeros(len(scores[normal])), np.ones(len(scores[other]))]
                    matrix[f"{normal}->{other}"] = float(
                        roc_auc_score(y, np.r_[scores[normal], scores[other]])
                    )
        twelve = [v for key, v in matrix.items() if "mnist" not in key]
        report[name] = {"matrix": matrix, "mean_auroc": float(np.mean(list(matrix.values()))),
                        "mean_auroc_without_mnist": float(np.mean(twelve))}  # fmt: skip
        print(
            f"{name:>16}: 20 pairs {report[name]['mean_auroc']:.3f}, 12 pairs {np.mean(twelve):.3f}",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"density": args.density, "candidates": report}, indent=2))
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
    s = sub.add_parser("search")
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument(
        "--candidates", nargs="+", default=["cb", "ps", "col", "cb+sp", "cb+csp", "cb+eps", "ps+kurt"]
    )
    s.add_argument("--density", choices=("gmm", "lw", "knn"), default="gmm")
    s.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    return run_walk(args) if args.command == "walk" else run_search(args)


if __name__ == "__main__":
    raise SystemExit(main())
