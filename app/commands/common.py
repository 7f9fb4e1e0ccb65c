"""Flags shared by the commands that load a model; they override the matching Settings fields."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.engine.model.runtimes import RUNTIMES
from app.engine.scorer import Scorer
from app.engine.types import METHODS, MethodOptions
from app.service.scoring import engine_from_settings
from app.settings import Settings


def add_engine_args(parser: argparse.ArgumentParser, method: bool = True) -> None:
    g = parser.add_argument_group("model and method (default: DDM_* settings)")
    g.add_argument("--model", type=Path, help="diffusers model folder (unet/ + scheduler/)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="what computes the UNet (default auto: onnxruntime on CPU, torch on CUDA)",
    )
    if method:
        g.add_argument("--method", choices=METHODS, help="scoring method (default diffpath-v2)")
    g.add_argument("--steps", type=int, help="trajectory steps K (UNet evaluations per image)")
    g.add_argument(
        "--aggregation", choices=["per-step", "sum"], help="path features: per-step energies or the six sums"
    )
    g.add_argument(
        "--trajectory",
        choices=["ddim", "diffpath", "forward"],
        help="path the features are read along (default ddim; diffpath = DiffPath's own loop)",
    )
    g.add_argument("--batch-size", type=int, default=64, help="images per model batch (default 64)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        "model_dir": getattr(args, "model", None),
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
        "runtime": getattr(args, "runtime", None),
        "method": getattr(args, "method", None),
        "steps": getattr(args, "steps", None),
        "aggregation": getattr(args, "aggregation", None),
        "trajectory": getattr(args, "trajectory", None),
        "torch_threads": getattr(args, "threads", None),
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def load_scorer(settings: Settings, options: MethodOptions | None = None, warmup: bool = False) -> Scorer:
    scorer = engine_from_settings(settings, options)
    scorer.load(warmup_batch=2 if warmup else 0)
    return scorer


def profiles_dir(settings: Settings) -> Path:
    return settings.profiles_dir or settings.model_dir / "profiles"
