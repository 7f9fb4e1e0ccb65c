"""diffpath-v2 (the default, METHOD.md steps 2-4): the Stein score error amplified by structural
dissimilarity, a_k = e_k * w_k, summed along the walk; a Gaussian mixture over its features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from app.engine.calibration.density import GaussianMixtureDensity
from app.engine.methods.base import BatchStats, PathMethod
from app.engine.methods.path_sums import PathAccumulator, path_covariance_reg, stein_error
from app.engine.ssim import IMAGE_DATA_RANGE, SsimReference, ssim_map, ssim_reference

if TYPE_CHECKING:
    from app.engine.trajectory import TrajectoryStep
    from app.engine.types import MethodOptions

# Noise maps are ~N(0, 1); +-4 sigma covers them, and SSIM's constants need a fixed range.
NOISE_DATA_RANGE = 8.0


def ssim_weight(
    step: TrajectoryStep, x0: torch.Tensor | SsimReference, options: MethodOptions
) -> torch.Tensor | None:
    """Per-pixel weight from structural dissimilarity; None when SSIM weighting is off. ``x0`` may be given
    as an :class:`SsimReference` (its blurred moments computed once for all K steps)."""
    if options.ssim_weighting == "none":
        return None
    if options.ssim_target == "image":
        similarity = ssim_map(x0, step.xhat0, IMAGE_DATA_RANGE)
    else:
        similarity = ssim_map(step.eps_theta, step.eps_star, NOISE_DATA_RANGE)
    dissimilarity = 1.0 - similarity
    if options.ssim_weighting == "dissimilarity":
        return dissimilarity
    return 1.0 + options.ssim_lambda * dissimilarity


def amplified_error(
    step: TrajectoryStep, x0: torch.Tensor | SsimReference, options: MethodOptions
) -> torch.Tensor:
    """a_k = e_k * w_k (METHOD.md step 3)."""
    error = stein_error(step, options)
    weight = ssim_weight(step, x0, options)
    return error if weight is None else error * weight


class AmplifiedErrorSums(PathAccumulator):
    """Power sums of a_k and of its rate of change; heat map: mean |a_k|."""

    def __init__(self, x0: torch.Tensor, options: MethodOptions) -> None:
        super().__init__(options.steps)
        self.options = options
        # x0 is the same at every step: blur its SSIM moments once, not K times.
        image_ssim = options.ssim_target == "image" and options.ssim_weighting != "none"
        self.reference: torch.Tensor | SsimReference = ssim_reference(x0) if image_ssim else x0

    def add_step(self, step: TrajectoryStep) -> None:
        amplified = amplified_error(step, self.reference, self.options)
        self.add(amplified, amplified, step.abar)
        self.keep_embedding(step.embedding)


class DiffPathV2(PathMethod[AmplifiedErrorSums]):
    name = "diffpath-v2"
    density = GaussianMixtureDensity
    aggregated = True
    walk_key = "amplified-error"

    def start_walk(self, x0: torch.Tensor, options: MethodOptions) -> AmplifiedErrorSums:
        return AmplifiedErrorSums(x0, options)

    def features(self, sums: AmplifiedErrorSums, timesteps: list[int], options: MethodOptions) -> BatchStats:
        return sums.result(timesteps, options.aggregation)

    def default_covariance_reg(self, options: MethodOptions) -> float:
        return path_covariance_reg(options)


METHOD = DiffPathV2()
