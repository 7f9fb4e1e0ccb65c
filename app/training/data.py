"""Training images: decode once into an in-memory uint8 cache, then draw shuffled, flipped batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.errors import InvalidInput

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


@dataclass(frozen=True)
class ImageCache:
    """All training images, decoded: ``pixels`` is uint8 [N, 3, R, R]; ``counts`` maps each folder (as given)
    to how many of its images were used."""

    pixels: torch.Tensor
    counts: dict[str, int]

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def list_images(folder: Path) -> list[Path]:
    """PNG/JPEG files under ``folder`` (recursively), in a stable sorted order."""
    if not folder.is_dir():
        raise InvalidInput(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_square(path: Path, resolution: int) -> np.ndarray:
    """RGB, largest centred square, PIL bicubic (antialiased) resize; returns uint8 [R, R, 3]."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.uint8)


def load_image_folders(folders: Sequence[Path], resolution: int) -> ImageCache:
    """Decode every image of every folder once. Raises ``InvalidInput`` for a missing/empty folder or an
    unreadable image (a training set should be clean; better to stop than to train on a silent subset)."""
    arrays: list[np.ndarray] = []
    counts: dict[str, int] = {}
    for folder in folders:
        files = list_images(Path(folder))
        if not files:
            raise InvalidInput(f"no PNG/JPEG images in {folder}")
        for path in files:
            try:
                arrays.append(load_square(path, resolution))
            except OSError as exc:
                raise InvalidInput(f"cannot decode {path}: {exc}") from exc
        counts[str(folder)] = len(files)
        logger.info("loaded %d images from %s", len(files), folder)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageCache(pixels=pixels, counts=counts)


class BatchSampler:
    """Epoch-wise shuffled indices from a seeded CPU generator; a batch may straddle two epochs.

    Its state (generator, permutation, position) is saved in checkpoints so a resumed run draws the same
    batches it would have drawn without the interruption."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError("need at least one image and a batch size >= 1")
        self.n = n
        self.batch_size = batch_size
        self.generator = generator
        self.epoch = 0
        self._perm = torch.randperm(n, generator=generator)
        self._pos = 0

    def next_indices(self) -> torch.Tensor:
        """int64 [batch_size] indices into the cache."""
        parts: list[torch.Tensor] = []
        need = self.batch_size
        while need > 0:
            if self._pos >= self.n:
                self._perm = torch.randperm(self.n, generator=self.generator)
                self._pos = 0
                self.epoch += 1
            take = min(need, self.n - self._pos)
            parts.append(self._perm[self._pos : self._pos + take])
            self._pos += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self._perm.clone(), "pos": self._pos, "epoch": self.epoch, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            # The data changed between invocations: start a fresh epoch rather than index out of range.
            logger.warning("image count changed (%d -> %d); starting a new epoch", state["n"], self.n)
            return
        self._perm = state["perm"].clone()
        self._pos = int(state["pos"])
        self.epoch = int(state["epoch"])


def to_model_input(pixels: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, R, R] + bool [B] (mirror these) -> float32 in [-1, 1]."""
    x = pixels.float().div_(127.5).sub_(1.0)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
