"""Flags shared by the commands that load a model; they override the matching Settings fields."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.commands.setting_flags import add_setting_flags, overrides
from app.settings import Settings

if TYPE_CHECKING:  # the engine (torch) loads when a command runs, not to print --help
    from app.engine.engine import Engine
    from app.engine.types import MethodOptions

# Settings the model-loading commands take as flags (choices, types and help from Settings)
ENGINE_FLAGS = ("device", "dtype", "runtime", "method", "steps", "aggregation", "trajectory")


def add_engine_args(parser: argparse.ArgumentParser, method: bool = True) -> None:
    g = parser.add_argument_group("model and method (default: DDM_* settings)")
    g.add_argument("--model", type=Path, help="diffusers model folder (unet/ + scheduler/)")
    add_setting_flags(g, ENGINE_FLAGS if method else tuple(f for f in ENGINE_FLAGS if f != "method"))
    g.add_argument("--batch-size", type=int, default=64, help="images per model batch (default 64)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags = {"model_dir": getattr(args, "model", None), "torch_threads": getattr(args, "threads", None)}
    given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    return Settings(**given, **overrides(args, ENGINE_FLAGS))


def load_engine(settings: Settings, options: MethodOptions | None = None, warmup: bool = False) -> Engine:
    from app.bootstrap import engine_from_settings

    engine = engine_from_settings(settings, options)
    engine.load(warmup_batch=2 if warmup else 0)
    return engine


def profiles_dir(settings: Settings) -> Path:
    return settings.profiles_folder
