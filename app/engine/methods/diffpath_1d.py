"""diffpath-1d (DiffPath-1D): one value per image, the root of the summed squared rate of change of the
noise path (read from diffpath-6d's sums, so both share them); a 1-D kernel density."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from app.engine.calibration.density import KernelDensity1D
from app.engine.methods.base import BatchStats, PathMethod
from app.engine.methods.diffpath_6d import NOISE_PATH, NoisePathSums

if TYPE_CHECKING:
    from app.engine.types import ImageStats, MethodOptions


class DiffPath1D(PathMethod[NoisePathSums]):
    name = "diffpath-1d"
    density = KernelDensity1D
    walk_key = NOISE_PATH

    def start_walk(self, x0: torch.Tensor, options: MethodOptions) -> NoisePathSums:
        return NoisePathSums(x0, options)

    def features(self, sums: NoisePathSums, timesteps: list[int], options: MethodOptions) -> BatchStats:
        return sums.result(timesteps, options.aggregation, one_d=True)

    def image_features(self, stats: ImageStats, options: MethodOptions) -> np.ndarray:
        return stats.features  # one value whatever the aggregation


METHOD = DiffPath1D()
