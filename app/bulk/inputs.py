"""What ``score-dataset`` reads: INPUT (a folder, a glob, a text file of paths, or a Parquet/CSV column of
paths) -> a sorted list of absolute paths. Plain Python and pyarrow: nothing here needs Ray."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

import pyarrow.parquet as pq

from app.errors import InvalidInput
from app.offline.datasets import IMAGE_SUFFIXES

GLOB_CHARS = frozenset("*?[")


def list_inputs(spec: str | Path, column: str = "path") -> list[str]:
    """The image paths ``spec`` names, each once, as absolute paths (the workers of a cluster do not share the
    driver's working directory; a cluster reads them from a volume mounted at the same place).

    - a folder: every image file below it (by suffix, recursively);
    - a pattern with ``*``, ``?`` or ``[`` (``**`` recurses): the files it matches;
    - a ``.parquet`` or ``.csv`` file: its ``column`` of paths;
    - any other file: one path per line (blank lines and ``#`` comments skipped).
    Relative paths in a list are relative to the current directory, as the ``score`` command reads them."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        found = [str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif GLOB_CHARS & set(text) and not path.exists():
        found = [p for p in glob.glob(text, recursive=True) if os.path.isfile(p)]
    elif path.is_file():
        found = _listed(path, column)
    else:
        raise InvalidInput(f"{text}: no such folder, file or matching pattern")
    return sorted({os.path.abspath(p) for p in found})


def _listed(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise InvalidInput(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    elif suffix == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if column not in (reader.fieldnames or []):
                raise InvalidInput(
                    f"{path}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})"
                )
            values = [row[column] for row in reader]
    else:
        lines = (line.strip() for line in path.read_text().splitlines())
        values = [line for line in lines if line and not line.startswith("#")]
    return [str(v) for v in values if v]
