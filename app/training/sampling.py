"""DDIM sampling from a trained model and the sample-grid picture."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from PIL import Image


@torch.inference_mode()
def ddim_sample(
    unet: UNet2DModel,
    scheduler_config: Mapping[str, Any],
    n: int = 16,
    steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Draw ``n`` images with DDIM (``eta`` = 0: deterministic given the seed).

    A private ``DDIMScheduler`` is built from the model's own (DDPM) scheduler config, so the noise schedule
    is the one the model was trained with. The initial noise comes from a seeded CPU generator, so a seed
    gives the same images on CPU and CUDA (up to arithmetic). Returns uint8 [n, 3, H, W] on the CPU."""
    device = next(unet.parameters()).device
    size = int(unet.config.sample_size)
    channels = int(unet.config.in_channels)
    generator = torch.Generator().manual_seed(seed)
    use_bf16 = device.type == "cuda"
    was_training = unet.training
    unet.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            scheduler = DDIMScheduler.from_config(dict(scheduler_config))
            scheduler.set_timesteps(steps)
            x = torch.randn((b, channels, size, size), generator=generator).to(device)
            for t in scheduler.timesteps:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    eps = unet(x, t.to(device)).sample
                step_noise = torch.randn(x.shape, generator=generator).to(device) if eta > 0 else None
                x = scheduler.step(eps.float(), t, x, eta=eta, variance_noise=step_noise).prev_sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out)


def make_grid(images: torch.Tensor, columns: int = 8, scale: int = 2) -> Image.Image:
    """uint8 [n, 3, H, W] -> one RGB picture, ``columns`` wide, each image enlarged ``scale`` x (nearest)."""
    n, _, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = arr[i]
    grid = Image.fromarray(canvas)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 2) -> tuple[int, int]:
    """Write the grid as PNG; returns its (width, height)."""
    grid = make_grid(images, columns=columns, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return grid.size
