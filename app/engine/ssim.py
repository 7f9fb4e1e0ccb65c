"""Per-pixel SSIM maps, same size as the input, on the input's device.

pytorch-msssim gives the Gaussian window and the separable blur; it only returns image means, so the
map itself (five blurred moments, the SSIM formula) is assembled here. Borders are reflect-padded so the map
covers every pixel the Stein error covers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as ssim_mean
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
IMAGE_DATA_RANGE = 2.0  # images live in [-1, 1]; fixed, never inferred from a batch


@functools.lru_cache(maxsize=16)
def _window(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _fspecial_gauss_1d(WINDOW, SIGMA).repeat(channels, 1, 1, 1).to(device=device, dtype=dtype)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = IMAGE_DATA_RANGE) -> torch.Tensor:
    """SSIM per pixel and channel. x, y: (B, C, H, W) -> (B, C, H, W), 1 where identical."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    x = x.float()
    y = y.float()
    pad = WINDOW // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    win = _window(x.shape[1], x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return gaussian_filter(F.pad(t, (pad, pad, pad, pad), mode=mode), win)

    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x * mu_x
    sigma_yy = blur(y * y) - mu_y * mu_y
    sigma_xy = blur(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    return luminance * contrast_structure


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = IMAGE_DATA_RANGE) -> torch.Tensor:
    """Mean SSIM per image, (B,), the library's standard (valid-window) definition."""
    return ssim_mean(x.float(), y.float(), data_range=data_range, size_average=False, K=(K1, K2))
