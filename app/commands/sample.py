"""``ddm-anomaly sample``: draw a grid of DDIM samples from a diffusers model folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app.errors import InvalidInput

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw DDIM samples from a model into a grid PNG",
        description="Draw N images with DDIM (a DDIMScheduler built from the model's own scheduler "
        "config) from a diffusers model folder (unet/ + scheduler/, e.g. model_store/celeba32-ref or a "
        "training checkpoint) and save them as one grid PNG. The same seed gives the same grid.",
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="diffusers model folder")
    p.add_argument("--out", type=Path, required=True, metavar="PNG", help="grid file to write")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta; 0 = deterministic (default)")
    p.add_argument("--columns", type=int, default=8, help="images per grid row (default 8)")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour enlargement (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.bootstrap import set_torch_threads
    from app.training import ddim_sample, load_model_dir, save_grid
    from app.training.loop import resolve_device

    set_torch_threads(args.threads)
    if args.n < 1 or args.steps < 1 or args.scale < 1:
        logger.error("--n, --steps and --scale must be >= 1")
        return 2
    try:
        device = resolve_device(args.device)
        unet, scheduler = load_model_dir(args.model)
    except InvalidInput as exc:
        logger.error("%s", exc)
        return 2
    images = ddim_sample(unet.to(device), scheduler.config, n=args.n, steps=args.steps, seed=args.seed,
                         eta=args.eta)  # fmt: skip
    width, height = save_grid(images, args.out, columns=args.columns, scale=args.scale)
    print(f"wrote {args.out} ({args.n} samples, {width}x{height})")
    return 0
