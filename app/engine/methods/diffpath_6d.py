"""diffpath-6d (DiffPath's statistics): the noise path eps_k itself and its rate of change, summed along
the walk; a Gaussian mixture over its features. Heat map: mean |Stein error|."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from app.engine.calibration.density import GaussianMixtureDensity
from app.engine.methods.base import BatchStats, PathMethod
from app.engine.methods.path_sums import PathAccumulator, path_covariance_reg, stein_error

if TYPE_CHECKING:
    from app.engine.trajectory import TrajectoryStep
    from app.engine.types import MethodOptions

NOISE_PATH = "noise-path"  # the walk key of every method that reads these sums (diffpath-1d too)


class NoisePathSums(PathAccumulator):
    """Power sums of eps_k and of its rate of change."""

    def __init__(self, x0: torch.Tensor, options: MethodOptions) -> None:
        super().__init__(options.steps)
        self.options = options

    def add_step(self, step: TrajectoryStep) -> None:
        self.add(step.eps_k, stein_error(step, self.options), step.abar)
        self.keep_embedding(step.embedding)


class DiffPath6D(PathMethod[NoisePathSums]):
    name = "diffpath-6d"
    density = GaussianMixtureDensity
    aggregated = True
    walk_key = NOISE_PATH

    def start_walk(self, x0: torch.Tensor, options: MethodOptions) -> NoisePathSums:
        return NoisePathSums(x0, options)

    def features(self, sums: NoisePathSums, timesteps: list[int], options: MethodOptions) -> BatchStats:
        return sums.result(timesteps, options.aggregation)

    def default_covariance_reg(self, options: MethodOptions) -> float:
        return path_covariance_reg(options)


METHOD = DiffPath6D()
