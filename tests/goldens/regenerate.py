"""Rewrite the golden files after a change that is *meant* to move the engine's numbers.

    python -m tests.goldens.regenerate            # or: make goldens
    python -m tests.goldens.regenerate --check    # compare only, write nothing (exit 1 on a difference)

Run it only when a change is supposed to move numbers (a new default, a refitted profile, a fixed bug), say so
in the commit message, and let the JSON diff show the move in review. A change that is meant to keep the
shipped model's numbers (a refactor, a new loader, a faster kernel) must pass tests/test_goldens.py as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.goldens import compute


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with every list of numbers on one line (one image's feature vector = one line of the diff)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}  {json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [f"{pad}  {dumps(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value)


def largest_change(old: Any, new: Any, path: str = "") -> list[tuple[float, str]]:
    """(relative change, where) for every number that moved, for the summary printed after a rewrite."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                out.append((float("inf"), f"{path}/{key} {'added' if key in new else 'removed'}"))
            else:
                out += largest_change(old[key], new[key], f"{path}/{key}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [(float("inf"), f"{path} length {len(old)} -> {len(new)}")]
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += largest_change(a, b, f"{path}[{i}]")
        return out
    if isinstance(old, bool | str) or isinstance(new, bool | str) or old is None or new is None:
        return [] if old == new else [(float("inf"), f"{path}: {old!r} -> {new!r}")]
    if old == new:
        return []
    rel = abs(new - old) / max(abs(old), 1e-12)
    return [(float(rel), f"{path}: {old!r} -> {new!r}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare with the stored files, write nothing")
    parser.add_argument("--only", choices=["engine", "calibration"], help="regenerate one file only")
    args = parser.parse_args(argv)
    jobs: list[tuple[Path, Any]] = []
    if args.only in (None, "calibration"):
        stored = compute.CALIBRATION_FILE
        # the fixed input array stays what it is once written: only the fitted numbers are recomputed
        features = np.asarray(json.loads(stored.read_text())["features"], float) if stored.is_file() else None
        jobs.append((stored, lambda: compute.calibration_goldens(features)))
    if args.only in (None, "engine"):
        jobs.append((compute.ENGINE_FILE, compute.engine_goldens))
    moved = False
    for path, make in jobs:
        new = make()
        old = json.loads(path.read_text()) if path.is_file() else {}
        changes = sorted(largest_change(old, new), reverse=True)
        moved |= bool(changes)
        print(f"{path.relative_to(compute.REPO)}: {len(changes)} values differ from the stored file")
        for rel, where in changes[:10]:
            print(f"  rel {rel:.2e}  {where}")
        if not args.check:
            path.write_text(dumps(new) + "\n")
    return 1 if args.check and moved else 0


if __name__ == "__main__":
    sys.exit(main())
