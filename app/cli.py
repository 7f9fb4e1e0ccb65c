"""``ddm-anomaly`` command line: one subcommand per module in ``app.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from app import __version__

# Each module defines ``register(subparsers)`` which adds its parser and sets ``func`` (args -> exit code).
COMMAND_MODULES = (
    "app.commands.serve",
    "app.commands.score",
    "app.commands.score_dataset",
    "app.commands.calibrate",
    "app.commands.evaluate",
    "app.commands.train",
    "app.commands.sample",
    "app.commands.import_",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddm-anomaly",
        description="Zero-shot image anomaly scoring along a diffusion model's denoising trajectory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a command not written yet
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if not _user_error(exc):
            raise
        # a wrong path, setting or profile is the user's to fix: one line saying what, no traceback
        print(f"ddm-anomaly {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _user_error(exc: Exception) -> bool:
    from pydantic import ValidationError

    from app.errors import DDMError

    if isinstance(exc, DDMError | ValidationError | FileNotFoundError):
        return True
    loading = sys.modules.get("app.engine.model.loading")  # imported by whichever command loads a model
    return loading is not None and isinstance(exc, loading.ModelLoadError)
