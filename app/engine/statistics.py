"""Trajectory -> Stein score errors -> SSIM amplification -> per-image features (METHOD.md steps 2-4).

Everything stays on the model's device and in the batch; sums are accumulated per step so memory does
not grow with K, and the only device->host copy happens once per batch, after the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.model.loading import LoadedModel
from app.engine.ssim import IMAGE_DATA_RANGE, SsimReference, ssim_map, ssim_per_image, ssim_reference
from app.engine.trajectory import (
    TrajectoryStep,
    content_noise,
    ddim_step,
    predict_noise,
    trajectory_grid,
    walk,
)
from app.engine.types import MethodOptions

# Noise maps are ~N(0, 1); +-4 sigma covers them, and SSIM's constants need a fixed range.
NOISE_DATA_RANGE = 8.0
# Smallest energy the per-step features take the log of (a map of exact zeros would give -inf).
ENERGY_FLOOR = 1e-12


@dataclass
class BatchStats:
    """Device tensors for a batch of B images (see ImageStats for the per-image meaning)."""

    features: torch.Tensor  # (B, D)
    step_sums: torch.Tensor  # (B, K, 3)
    delta_sums: torch.Tensor  # (B, K-1, 3)
    heatmap: torch.Tensor  # (B, H, W)
    timesteps: list[int]


def power_sums(q: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, 3): sum q, sum q^2, sum q^3 over everything but the batch axis."""
    flat = q.flatten(1)
    return torch.stack([flat.sum(1), flat.pow(2).sum(1), flat.pow(3).sum(1)], dim=-1)


def stein_error(step: TrajectoryStep, options: MethodOptions) -> torch.Tensor:
    """e_k = eps_theta(x_k, t_k) - eps*_k, optionally divided by sigma_k (score units)."""
    error = step.eps_theta - step.eps_star
    if options.sigma_scaling:
        error = error / (1 - step.abar).sqrt()
    return error


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


class PathAccumulator:
    """Running per-step power sums of a trajectory quantity q_k and of dq_k = (q_{k+1} - q_k) * K."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.step_sums: list[torch.Tensor] = []
        self.delta_sums: list[torch.Tensor] = []
        self.heat: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def add(self, q: torch.Tensor, heat_source: torch.Tensor) -> None:
        self.step_sums.append(power_sums(q))
        if self._previous is not None:
            self.delta_sums.append(power_sums((q - self._previous) * self.steps))
        self._previous = q
        heat = heat_source.abs().mean(dim=1)
        self.heat = heat if self.heat is None else self.heat + heat

    def result(self, timesteps: list[int], aggregation: str = "sum", one_d: bool = False) -> BatchStats:
        """Features from the accumulated sums: the six sums over steps (``"sum"``), the log energy of
        each step and each rate of change (``"per-step"``, 2K - 1 values), or DiffPath-1D's one value."""
        steps = torch.stack(self.step_sums, dim=1)
        deltas = torch.stack(self.delta_sums, dim=1)
        if one_d:
            features = deltas[..., 1].sum(dim=1, keepdim=True).sqrt()
        elif aggregation == "per-step":
            # energies span orders of magnitude across steps and images; the log makes them near-Gaussian
            # for the mixture (floored so an all-zero map stays finite)
            features = torch.cat([steps[..., 1], deltas[..., 1]], dim=1).clamp_min(ENERGY_FLOOR).log()
        elif aggregation == "sum":
            features = torch.cat([steps.sum(dim=1), deltas.sum(dim=1)], dim=-1)
        else:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        assert self.heat is not None
        return BatchStats(features, steps, deltas, self.heat / len(self.step_sums), timesteps)


PATH_METHODS = ("diffpath-v2", "diffpath-6d", "diffpath-1d")


def path_statistics(
    model: LoadedModel,
    x0: torch.Tensor,
    options: MethodOptions,
    digests: list[bytes] | None = None,
    methods: tuple[str, ...] | None = None,
) -> dict[str, BatchStats]:
    """diffpath-v2 / -6d / -1d statistics for a batch x0 (B, C, H, W) in [-1, 1], several methods from
    one walk (they share the trajectory; only what is summed differs)."""
    methods = methods or (options.method,)
    timesteps = trajectory_grid(
        options.trajectory, len(model.alphas_cumprod), options.steps, options.t_max_fraction
    )
    noise = None
    if options.trajectory == "forward":
        noise = content_noise(digests or [b""] * x0.shape[0], tuple(x0.shape[1:]), x0.device)
    amplified_acc = PathAccumulator(options.steps) if "diffpath-v2" in methods else None
    # x0 is the same at every step: blur its SSIM moments once, not K times.
    image_ssim = options.ssim_target == "image" and options.ssim_weighting != "none"
    reference = ssim_reference(x0) if amplified_acc is not None and image_ssim else x0
    noise_acc = PathAccumulator(options.steps) if {"diffpath-6d", "diffpath-1d"} & set(methods) else None
    for step in walk(model, x0, timesteps, options.trajectory, noise):
        if amplified_acc is not None:
            amplified = amplified_error(step, reference, options)
            amplified_acc.add(amplified, amplified)
        if noise_acc is not None:
            noise_acc.add(step.eps_k, stein_error(step, options))
    out: dict[str, BatchStats] = {}
    for method in methods:
        if method == "diffpath-v2" and amplified_acc is not None:
            out[method] = amplified_acc.result(timesteps, options.aggregation)
        elif noise_acc is not None and method in ("diffpath-6d", "diffpath-1d"):
            out[method] = noise_acc.result(timesteps, options.aggregation, one_d=method == "diffpath-1d")
        else:
            raise ValueError(f"{method!r} is not a trajectory method")
    return out


def reconstruction_statistics(
    model: LoadedModel, x0: torch.Tensor, options: MethodOptions, digests: list[bytes] | None = None
) -> BatchStats:
    """DDPM-OOD style: noise x0 to a few levels, denoise with DDIM, compare by SSIM.

    The UNet budget (options.steps evaluations) is shared between the levels. Features: 1 - SSIM per level;
    step_sums rows per level: [1 - SSIM, mean squared error, mean absolute error].
    """
    T = len(model.alphas_cumprod)
    levels = [max(1, round(f * (T - 1))) for f in options.recon_levels]
    per_level = max(1, options.steps // len(levels))
    noise = content_noise(digests or [b""] * x0.shape[0], tuple(x0.shape[1:]), x0.device)
    abar_all = model.alphas_cumprod
    rows, heat = [], torch.zeros_like(x0[:, 0])
    for t_start in levels:
        path = [round(t_start * (1 - i / per_level)) for i in range(per_level)]  # t_start ... > 0
        abar = abar_all[t_start]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        xhat0 = x0
        for i, t in enumerate(path):
            eps = predict_noise(model, x_t, t)
            abar_next = abar_all[path[i + 1]] if i + 1 < len(path) else abar_all[0]
            xhat0, _, x_t = ddim_step(x_t, eps, abar_all[t], abar_next)
        dissimilarity = 1.0 - ssim_per_image(x0, xhat0)
        diff = (x0 - xhat0).flatten(1)
        rows.append(torch.stack([dissimilarity, diff.pow(2).mean(1), diff.abs().mean(1)], dim=-1))
        heat = heat + (x0 - xhat0).abs().mean(dim=1)
    step_sums = torch.stack(rows, dim=1)
    empty = step_sums.new_zeros((x0.shape[0], 0, 3))
    return BatchStats(step_sums[..., 0], step_sums, empty, heat / len(levels), levels)


def batch_statistics(
    model: LoadedModel,
    x0: torch.Tensor,
    options: MethodOptions,
    digests: list[bytes] | None = None,
    methods: tuple[str, ...] | None = None,
) -> dict[str, BatchStats]:
    """Statistics of every requested method (default: the options' own) for one batch."""
    methods = methods or (options.method,)
    out: dict[str, BatchStats] = {}
    path_methods = tuple(m for m in methods if m in PATH_METHODS)
    if path_methods:
        out.update(path_statistics(model, x0, options, digests, path_methods))
    if "reconstruction" in methods:
        out["reconstruction"] = reconstruction_statistics(model, x0, options, digests)
    return out
