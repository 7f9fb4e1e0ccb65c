"""Synthetic local anomalies: a normal face with a pasted foreign patch, and the patch's mask.

A patch cut from a texture (DTD) or a natural photo (CIFAR-10) at a random place, resized to a random
rectangle, and pasted at a random place inside the face image; the mask (True where pasted) is the
ground truth a heat map should find. Everything is drawn from one seeded generator, so a seed and the
same folders give the same set. Images are generated on the fly and never stored.

    from benchmarks.local_anomalies import LocalAnomalies
    for sample in LocalAnomalies(faces, patches, seed=0).samples(300):
        sample.image, sample.mask  # PIL RGB image, (H, W) bool array at the image's resolution
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Patch side as a fraction of the face image's side: from a small blemish (~1/8 of the side, enough for a
# 32 px model to see a few pixels) to about a third (a covered cheek, an eye and a brow).
MIN_SIDE_FRACTION = 0.125
MAX_SIDE_FRACTION = 0.375
MAX_ASPECT = 2.0  # patches are rectangles up to this elongation


@dataclass
class LocalAnomaly:
    image: Image.Image  # the face with the patch, RGB, the face's size
    mask: np.ndarray  # (H, W) bool, True where the patch is
    face: Path
    patch_source: Path
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the patch in the image


class LocalAnomalies:
    """Seeded generator of faces with pasted patches (``faces`` and ``patches`` are image paths)."""

    def __init__(self, faces: Sequence[Path], patches: Sequence[Path], seed: int = 0) -> None:
        if not faces or not patches:
            raise ValueError("need at least one face and one patch image")
        self.faces = list(faces)
        self.patches = list(patches)
        self.rng = np.random.default_rng(seed)

    def patch_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """A random rectangle inside a (width, height) image."""
        side = min(width, height)
        area_side = self.rng.uniform(MIN_SIDE_FRACTION, MAX_SIDE_FRACTION) * side
        aspect = np.exp(self.rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))
        w = int(np.clip(round(area_side * np.sqrt(aspect)), 2, width))
        h = int(np.clip(round(area_side / np.sqrt(aspect)), 2, height))
        left = int(self.rng.integers(0, width - w + 1))
        top = int(self.rng.integers(0, height - h + 1))
        return left, top, left + w, top + h

    def cut(self, source: Image.Image, size: tuple[int, int]) -> Image.Image:
        """A random crop of the source (at least half its shorter side), resized to ``size``."""
        sw, sh = source.size
        crop = int(self.rng.integers(max(2, min(sw, sh) // 2), min(sw, sh) + 1))
        left = int(self.rng.integers(0, sw - crop + 1))
        top = int(self.rng.integers(0, sh - crop + 1))
        return source.crop((left, top, left + crop, top + crop)).resize(size, Image.Resampling.BICUBIC)

    def make(self, face_path: Path, patch_path: Path) -> LocalAnomaly:
        face = Image.open(face_path).convert("RGB")
        source = Image.open(patch_path).convert("RGB")
        box = self.patch_box(*face.size)
        patch = self.cut(source, (box[2] - box[0], box[3] - box[1]))
        image = face.copy()
        image.paste(patch, box[:2])
        mask = np.zeros((face.size[1], face.size[0]), dtype=bool)
        mask[box[1] : box[3], box[0] : box[2]] = True
        return LocalAnomaly(image, mask, face_path, patch_path, box)

    def samples(self, n: int) -> Iterator[LocalAnomaly]:
        """``n`` anomalies; faces are used in order (cycling), patch sources drawn at random."""
        for i in range(n):
            face = self.faces[i % len(self.faces)]
            patch = self.patches[int(self.rng.integers(0, len(self.patches)))]
            yield self.make(face, patch)


def mask_at(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask at a model's resolution: a pixel is anomalous when at least half of its area is."""
    area = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(area) >= 0.5
