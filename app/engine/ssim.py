"""Per-pixel SSIM maps, same size as the input, on the input's device.

pytorch-msssim gives the Gaussian window (and the separable blur, used for large images); it only returns
image means, so the map itself (five blurred moments, the SSIM formula) is assembled here. Borders are
reflect-padded so the map covers every pixel the Stein error covers.

Speed: padding + an 11-tap blur along one axis is a fixed linear map, so for model-sized images
(side <= ``MATRIX_BLUR_MAX_SIDE``) it is applied as one (side x side) matrix per axis. Two batched matmuls
replace pad + two depthwise convolutions, which on CPU were several times slower
(docs/PERFORMANCE.md#limits-on-this-cpu-and-what-was-dropped); the result is the
same up to float rounding (~1e-7). The trajectory's reference image x0 does not change between steps, so its
blurred moments can be computed once per batch (``ssim_reference``) instead of once per step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as ssim_mean
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
IMAGE_DATA_RANGE = 2.0  # images live in [-1, 1]; fixed, never inferred from a batch
# Above this side the dense operator's cost (side^2 per row) outgrows the 11-tap convolution.
MATRIX_BLUR_MAX_SIDE = 256


def _pad_mode(height: int, width: int) -> str:
    return "reflect" if min(height, width) > WINDOW // 2 else "replicate"


@functools.lru_cache(maxsize=16)
def _window(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _fspecial_gauss_1d(WINDOW, SIGMA).repeat(channels, 1, 1, 1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def blur_operator(size: int, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, size) matrix M with M @ v = Gaussian blur of the padded vector v (same as pad + conv1d)."""
    taps = _fspecial_gauss_1d(WINDOW, SIGMA).flatten().double()
    pad = WINDOW // 2
    source = torch.arange(size).view(-1, 1) + torch.arange(-pad, pad + 1).view(1, -1)  # (size, WINDOW)
    if mode == "reflect":  # torch's reflect: -1 -> 1, size -> size - 2 (the edge is not repeated)
        source = source.abs()
        source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    else:
        source = source.clamp(0, size - 1)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.scatter_add_(1, source, taps.expand(size, -1).contiguous())
    return matrix.to(device=device, dtype=dtype)


def blur(t: torch.Tensor) -> torch.Tensor:
    """Padded Gaussian blur of every (H, W) plane of t (..., H, W); output has t's shape."""
    height, width = t.shape[-2:]
    mode = _pad_mode(height, width)
    if max(height, width) <= MATRIX_BLUR_MAX_SIDE:
        rows = blur_operator(height, mode, t.device, t.dtype)
        cols = blur_operator(width, mode, t.device, t.dtype)
        return rows @ t @ cols.T
    planes = t.reshape(-1, 1, height, width)
    pad = WINDOW // 2
    padded = F.pad(planes, (pad, pad, pad, pad), mode=mode)
    return gaussian_filter(padded, _window(1, t.device, t.dtype)).reshape(t.shape)


@dataclass(frozen=True)
class SsimReference:
    """x and its blurred moments (mu_x, blur(x^2)): what SSIM needs of an image that several maps share."""

    x: torch.Tensor
    mu: torch.Tensor
    mean_sq: torch.Tensor


def ssim_reference(x: torch.Tensor) -> SsimReference:
    x = x.float()
    moments = blur(torch.stack([x, x * x]))
    return SsimReference(x, moments[0], moments[1])


def ssim_map(
    x: torch.Tensor | SsimReference, y: torch.Tensor, data_range: float = IMAGE_DATA_RANGE
) -> torch.Tensor:
    """SSIM per pixel and channel. x, y: (B, C, H, W) -> (B, C, H, W), 1 where identical.

    ``x`` may be an :class:`SsimReference` made once for a reference image compared with many ``y``.
    """
    ref = x if isinstance(x, SsimReference) else ssim_reference(x)
    if ref.x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(ref.x.shape)} vs {tuple(y.shape)}")
    y = y.float()
    mu_y, mean_yy, mean_xy = blur(torch.stack([y, y * y, ref.x * y]))  # one batched call for three moments
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mu_x = ref.mu
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_xx = ref.mean_sq - mu_xx
    sigma_yy = mean_yy - mu_yy
    sigma_xy = mean_xy - mu_xy
    luminance = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1)
    contrast_structure = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    return luminance * contrast_structure


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = IMAGE_DATA_RANGE) -> torch.Tensor:
    """Mean SSIM per image, (B,), the library's standard (valid-window) definition."""
    return ssim_mean(x.float(), y.float(), data_range=data_range, size_average=False, K=(K1, K2))
