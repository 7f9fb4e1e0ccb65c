"""Folders of images -> prepared batches -> statistics, with decoding overlapped with model work."""

from __future__ import annotations

import glob
import logging
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.engine.engine import Engine
from app.engine.preprocessing import PreparedImage
from app.engine.types import ImageStats
from app.errors import InvalidInput

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: str | Path, limit: int | None = None, seed: int | None = None) -> list[Path]:
    """Image files of a folder, sorted by name; ``seed`` shuffles before ``limit`` takes the first N."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if seed is not None:
        random.Random(seed).shuffle(files)
    return files[:limit] if limit else files


def expand_images(specs: Sequence[str], recursive: bool = False) -> list[Path]:
    """Files, folders (their images; with ``recursive``, every sub-folder's too) and glob patterns (``**``
    crosses folders when ``recursive``) -> image files in the order given, each once. A name that matches
    nothing is kept, so the caller reports it as unreadable instead of silently scoring fewer images."""
    out: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            matches = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif not path.exists() and any(ch in spec for ch in "*?["):
            found_glob = glob.glob(spec, recursive=recursive)
            matches = sorted(Path(p) for p in found_glob if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            matches = [p for p in matches if p.is_file()] or [path]
        else:
            matches = [path]
        out.update(dict.fromkeys(matches))
    return list(out)


def _prepared_batches(
    engine: Engine, paths: Sequence[Path], batch_size: int
) -> Iterator[tuple[list[int], list[PreparedImage]]]:
    """Decode the next batch in a thread while the model works on the current one."""

    def decode(chunk: Sequence[tuple[int, Path]]) -> tuple[list[int], list[PreparedImage]]:
        idx, images = [], []
        for i, path in chunk:
            try:
                images.append(engine.decode(path.read_bytes()))
                idx.append(i)
            except InvalidInput as exc:
                log.warning("skipping %s: %s", path, exc)
        return idx, images

    indexed = list(enumerate(paths))
    chunks = [indexed[i : i + batch_size] for i in range(0, len(indexed), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode, chunks[0]) if chunks else None
        for n in range(len(chunks)):
            assert pending is not None
            ready = pending.result()
            pending = pool.submit(decode, chunks[n + 1]) if n + 1 < len(chunks) else None
            yield ready


def folder_statistics(
    engine: Engine,
    paths: Sequence[Path],
    methods: Sequence[str] | None = None,
    batch_size: int = 64,
    desc: str = "scoring",
    progress: bool = True,
) -> tuple[list[Path], dict[str, list[ImageStats]]]:
    """Statistics of every readable image, for each method; returns the paths actually scored."""
    methods = list(methods or [engine.options.method])
    kept: list[Path] = []
    out: dict[str, list[ImageStats]] = {m: [] for m in methods}
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for idx, images in _prepared_batches(engine, paths, batch_size):
            if images:
                stats = engine.image_stats_by_method(images, methods)
                for m in methods:
                    out[m].extend(stats[m])
                kept.extend(paths[i] for i in idx)
            bar.update(len(idx))
    return kept, out


def feature_matrix(stats: Sequence[ImageStats]) -> np.ndarray:
    return np.stack([s.features for s in stats]) if stats else np.zeros((0, 0))
