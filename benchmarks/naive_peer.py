"""The naive peer: DiffPathV2 features the way a straightforward port of the paper's code computes them.

One image at a time, a plain Python loop over the K timesteps with the schedule read from a diffusers
``DDIMScheduler``, the SSIM map assembled per step from pytorch-msssim's padded depthwise Gaussian blur
(five blurs, x0's included, every step), each step's amplified error copied to NumPy and the power sums
taken there in float64. Same model, same maths as ``app/engine`` (METHOD.md steps 1-4), none of its
batching or caching; ``engine_bench.py`` times it side by side with the engine and checks that both give the
same features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter


def load(model_dir: Path) -> tuple[UNet2DModel, DDIMScheduler]:
    unet_dir = model_dir / "unet" if (model_dir / "unet").is_dir() else model_dir
    scheduler_dir = model_dir / "scheduler" if (model_dir / "scheduler").is_dir() else model_dir
    unet = UNet2DModel.from_pretrained(
        str(unet_dir), local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
    )
    scheduler = DDIMScheduler.from_pretrained(str(scheduler_dir), local_files_only=True)
    return unet.eval(), scheduler


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    window = _fspecial_gauss_1d(11, 1.5).repeat(x.shape[1], 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return gaussian_filter(F.pad(t, (5, 5, 5, 5), mode="reflect"), window)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x**2
    sigma_yy = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)


def centre_and_border(q: np.ndarray) -> list[float]:
    """(C, H, W) -> [energy of the middle half of each side, energy of the rest]."""
    energy = (q**2).sum(axis=0)
    h, w = energy.shape
    centre = float(energy[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].sum())
    return [centre, float(energy.sum()) - centre]


def features(
    unet: UNet2DModel,
    scheduler: DDIMScheduler,
    image: torch.Tensor,
    steps: int = 10,
    autocast: torch.dtype | None = None,
    aggregation: str = "per-step",
) -> tuple[np.ndarray, np.ndarray]:
    """One (C, H, W) image in [-1, 1] -> (features, heat map), DDIM inversion with SSIM amplification.
    ``autocast``: run the UNet under bf16/fp16 autocast (what a port would do on a GPU). ``aggregation``:
    "per-step" = log energy of each step and each difference (2K - 1 values), "per-step-centre" = the same
    for the centre and the border of the image (2 (2K - 1) values), "sum" = METHOD.md's six sums."""
    T = scheduler.config.num_train_timesteps
    timesteps = [round(k * (T - 1) / (steps - 1)) for k in range(steps)]
    x0 = image[None]
    x = x0
    errors = []
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            abar = scheduler.alphas_cumprod[t]
            with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                eps = unet(x, t).sample.float()
            xhat0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            eps_k = (x - abar.sqrt() * xhat0) / (1 - abar).sqrt()
            eps_star = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            amplified = (eps - eps_star) * (1 + (1 - ssim_map(x0, xhat0)))
            errors.append(amplified[0].cpu().numpy().astype(np.float64))
            if k + 1 < steps:
                abar_next = scheduler.alphas_cumprod[timesteps[k + 1]]
                x = abar_next.sqrt() * xhat0 + (1 - abar_next).sqrt() * eps_k
    a = np.stack(errors)
    da = np.diff(a, axis=0) * steps
    if aggregation == "sum":
        feats = np.array([a.sum(), (a**2).sum(), (a**3).sum(), da.sum(), (da**2).sum(), (da**3).sum()])
    elif aggregation == "per-step-centre":
        energies = [e for q in a for e in centre_and_border(q)] + [
            e for q in da for e in centre_and_border(q)
        ]
        feats = np.log(np.array(energies))
    else:
        energies = [(q**2).sum() for q in a] + [(q**2).sum() for q in da]
        feats = np.log(np.array(energies))
    return feats, np.abs(a).mean(axis=(0, 1))
