"""Command-line flags generated from ``Settings.model_fields``: one vocabulary for choices, types and help.

``add_setting_flags(parser, ("device", "runtime", ...))`` adds ``--device`` etc. with the field's Literal
choices, its type and its description (plus the ``DDM_*`` name); ``overrides(args, names)`` returns the
flags that were given, ready for ``Settings(**...)``. A flag's destination is the field name unless
``renames`` maps it to an older flag spelling (``--model`` for ``model_dir``)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.settings import Settings


def choices(field: str) -> tuple[str, ...] | None:
    """The values a setting allows: a Literal's values, else None. ``method`` names a plug-in of the method
    registry, which loads torch: Settings checks it (naming the registered ones), so ``--help`` stays fast."""
    annotation = Settings.model_fields[field].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(typing.get_args(annotation))
    return None


def _value_type(field: str) -> Any:
    annotation = Settings.model_fields[field].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (int, float, Path) else None


def add_setting_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Iterable[str],
    renames: dict[str, str] | None = None,
) -> None:
    for name in names:
        info = Settings.model_fields[name]
        flag = (renames or {}).get(name, name.replace("_", "-"))
        help_text = f"{info.description + '; ' if info.description else ''}DDM_{name.upper()}"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text.replace("%", "%%")}
        if (allowed := choices(name)) is not None:
            kwargs["choices"] = allowed
        elif (value_type := _value_type(name)) is not None:
            kwargs["type"] = value_type
            if value_type is Path:
                kwargs["metavar"] = "DIR"
        parser.add_argument(f"--{flag}", **kwargs)


def overrides(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The settings given as flags (absent or None ones leave the environment's value)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
