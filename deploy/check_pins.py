"""Fail unless every distribution installed in this Python environment is pinned, at its installed version.

    python check_pins.py CONSTRAINTS_FILE... [--ignore NAME]...

The image build runs it in /opt/venv after installing with `-c constraints/<flavour>.txt -c
requirements.lock` (see the Dockerfile): pip constraints pin only what they name, so a distribution that
none of the files names would float to whatever is newest on the day of the build. This turns "the image is
reproducible" into a build failure that names the missing pin. Standard library only (it runs before
anything else is known to be installed); local version labels (torch's +cpu / +cu130) are ignored, as in
requirements.lock.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(paths: list[Path]) -> dict[str, str]:
    """name -> version from pip requirement/constraint files that hold only exact `name==version` lines."""
    pins: dict[str, str] = {}
    for path in paths:
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep or not version.strip() or ";" in line or "[" in name:
                raise SystemExit(f"{path}:{number}: not an exact pin: {raw!r}")
            key = canonical(name.strip())
            if key in pins and pins[key] != version.strip():
                raise SystemExit(
                    f"{path}:{number}: {name.strip()} pinned twice ({pins[key]}, {version.strip()})"
                )
            pins[key] = version.strip()
    return pins


def problems(pins: dict[str, str], installed: dict[str, str], ignore: set[str]) -> list[str]:
    found = []
    for name, version in sorted(installed.items()):
        if name in ignore:
            continue
        public = version.split("+", 1)[0]
        if name not in pins:
            found.append(f"{name}=={public} is installed but pinned nowhere")
        elif pins[name] != public:
            found.append(f"{name}=={public} is installed but pinned at {pins[name]}")
    return found


def installed_distributions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("files", nargs="+", type=Path, help="constraint files holding exact pins")
    parser.add_argument("--ignore", action="append", default=[], help="a distribution allowed unpinned")
    args = parser.parse_args(argv)
    pins = read_pins(args.files)
    found = problems(pins, installed_distributions(), {canonical(n) for n in args.ignore})
    for line in found:
        print(f"check_pins: {line}", file=sys.stderr)
    if found:
        names = ", ".join(str(f) for f in args.files)
        print(f"check_pins: {len(found)} unpinned or drifted; pin them in one of: {names}", file=sys.stderr)
        return 1
    print(f"check_pins: all {len(installed_distributions())} installed distributions are pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
