"""reconstruction (DDPM-OOD style): noise x0 to a few levels, denoise with DDIM, compare by SSIM. Its own
passes through the model, not the shared walk; the score is the mean dissimilarity itself (no density)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from app.engine.calibration.density import DirectScore
from app.engine.methods.base import BatchStats, PassMethod
from app.engine.ssim import ssim_per_image
from app.engine.trajectory import content_noise, ddim_step, predict_noise

if TYPE_CHECKING:
    from app.engine.model.loading import LoadedModel
    from app.engine.types import MethodOptions


class Reconstruction(PassMethod):
    name = "reconstruction"
    density = DirectScore

    def statistics(
        self, model: LoadedModel, x0: torch.Tensor, options: MethodOptions, digests: list[bytes] | None
    ) -> BatchStats:
        """The UNet budget (options.steps evaluations) is shared between the levels. Features: 1 - SSIM per
        level; step_sums rows per level: [1 - SSIM, mean squared error, mean absolute error]."""
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


METHOD = Reconstruction()
