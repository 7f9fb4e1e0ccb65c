"""Heat maps as images: where along the trajectory the model found an image hard to explain.

The model scores one region of the source image (by default its largest centred square; a model's input
transform may crop elsewhere: ``PreparedImage.crop_box``), so the map is placed over that region of a canvas
the size of the source image; outside it the PNG is fully transparent. Overlaying the PNG on the original
(same size) lines the two up, whatever the model's resolution (32, 64, 256 px ...).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy.ndimage import gaussian_filter

DEFAULT_COLORMAP = "inferno"
# Gaussian smoothing of calibrated maps as a fraction of the map's side: 2 px at 32 px, where pixel AUROC
# on pasted patches peaks (1 px: -0.03, 3 px: -0.01; docs/ACCURACY.md, benchmarks/heatmap_eval.py). Single
# pixels of the error maps are mostly noise; a patch the model can see spans several.
SMOOTHING_FRACTION = 1.0 / 16.0
# A pixel whose reference maps barely vary would turn rounding noise into huge z-scores: its standard
# deviation is floored at this fraction of the median one.
STD_FLOOR_FRACTION = 0.05
LOG_FLOOR = 1e-12  # smallest map value taken the log of (an exact zero would give -inf)


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the last two axes (the image plane) of one map or a stack; sigma 0 = unchanged."""
    arr = np.asarray(maps, dtype=np.float64)
    if sigma <= 0:
        return arr
    return gaussian_filter(arr, sigma=(0,) * (arr.ndim - 2) + (sigma, sigma), mode="nearest")


def standardise(maps: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-pixel z-score of one map or a stack against reference statistics (H, W)."""
    floor = STD_FLOOR_FRACTION * float(np.median(std)) if np.size(std) else 0.0
    return (np.asarray(maps, dtype=np.float64) - mean) / np.maximum(std, max(floor, 1e-12))


@dataclass(frozen=True)
class HeatmapCalibration:
    """What a normal image's heat map looks like under one profile: per-pixel mean and standard deviation
    of the smoothed log map over the profile's reference images (model resolution), and ``hot``, the
    calibrated value the hottest pixel of only ``fpr`` of those images exceeds (the threshold-equivalent,
    drawn at mid-scale)."""

    mean: np.ndarray  # (H, W)
    std: np.ndarray  # (H, W)
    hot: float
    sigma: float  # smoothing, model pixels

    def apply(self, heatmap: np.ndarray) -> np.ndarray:
        """Raw map(s) (..., H, W) -> per-pixel z-scores of the log smoothed map (0: a typical pixel)."""
        return standardise(log_map(smooth(heatmap, self.sigma)), self.mean, self.std)

    def colour_scale(self, calibrated: np.ndarray) -> np.ndarray:
        """Calibrated map -> [0, 1] on the profile's one scale: 0 at or below typical, 0.5 at ``hot``, 1 at
        twice ``hot``; non-finite values draw as 0."""
        scaled = np.asarray(calibrated, dtype=np.float64) / (2.0 * self.hot)
        return np.where(np.isfinite(scaled), np.clip(scaled, 0.0, 1.0), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transform": "log",
            "sigma": self.sigma,
            "hot": self.hot,
            "mean": np.round(self.mean, 5).tolist(),
            "std": np.round(self.std, 5).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeatmapCalibration:
        """Raises ValueError on anything but finite, positive statistics of one square-or-not 2-D shape."""
        if data.get("transform") != "log":
            raise ValueError(f"unknown heat-map transform {data.get('transform')!r}")
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
        hot, sigma = float(data["hot"]), float(data["sigma"])
        if mean.ndim != 2 or mean.shape != std.shape or mean.size == 0:
            raise ValueError("heat-map mean and std must be two maps of one shape")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
            raise ValueError("heat-map statistics must be finite, std non-negative")
        if not (math.isfinite(hot) and hot > 0 and math.isfinite(sigma) and sigma >= 0):
            raise ValueError("heat-map hot must be positive and sigma non-negative")
        return cls(mean, std, hot, sigma)


def log_map(heatmap: np.ndarray) -> np.ndarray:
    """Energies of the map span orders of magnitude across pixels; their log is close to Gaussian."""
    return np.log(np.maximum(np.asarray(heatmap, dtype=np.float64), LOG_FLOOR))


def fit_heatmap_calibration(
    maps: np.ndarray, fpr: float = 0.05, sigma: float | None = None
) -> HeatmapCalibration:
    """Per-pixel statistics from the raw heat maps (N, H, W) of a profile's normal reference images;
    ``sigma`` (model pixels) defaults to SMOOTHING_FRACTION of the map's side."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or len(maps) < 2:
        raise ValueError("need the heat maps of at least two reference images, (N, H, W)")
    if sigma is None:
        sigma = SMOOTHING_FRACTION * min(maps.shape[1:])
    logged = log_map(smooth(maps, sigma))
    finite = np.isfinite(logged).all(axis=(1, 2))
    logged = logged[finite]
    partial = HeatmapCalibration(logged.mean(0), logged.std(0), hot=1.0, sigma=sigma)
    hottest = partial.apply(maps[finite]).max(axis=(1, 2))
    hot = max(float(np.quantile(hottest, 1.0 - fpr)), 1e-6)
    return HeatmapCalibration(partial.mean, partial.std, hot, sigma)


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) -> [0, 1] by the map's own min and max; constant or non-finite maps give zeros."""
    arr = np.asarray(heatmap, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.float64)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi - lo <= 0:
        return np.zeros(arr.shape, dtype=np.float64)
    return np.where(finite, (arr - lo) / (hi - lo), 0.0)


def heatmap_png(
    heatmap: np.ndarray,
    source_size: tuple[int, int],
    *,
    box: tuple[int, int, int, int] | None = None,
    max_side: int = 1024,
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = 0.8,
    calibration: HeatmapCalibration | None = None,
) -> bytes:
    """Colour PNG (RGBA) of an (H, W) heat map, upsampled onto the region of the source the model saw.

    ``source_size`` is (width, height) of the uploaded image; the canvas is that size, scaled down so its
    longer side is at most ``max_side`` (the aspect ratio is kept). ``box`` is that region, (left, top,
    right, bottom) in source pixels (``PreparedImage.crop_box``; it may reach outside the image, whose part
    is cut off); None = the largest centred square. With a profile's ``calibration`` the colours are on
    the profile's one scale (a normal image is dark, the threshold-equivalent mid-scale); without one
    (profiles fitted before heat-map statistics existed) each map is stretched between its own min and max.
    """
    width, height = source_size
    scale = min(1.0, max_side / max(width, height, 1))
    canvas_w, canvas_h = max(1, round(width * scale)), max(1, round(height * scale))
    if box is None:
        side = max(1, round(min(width, height) * scale))
        size, offset = (side, side), ((canvas_w - side) // 2, (canvas_h - side) // 2)
    else:
        left, top, right, bottom = (round(v * scale) for v in box)
        size, offset = (max(1, right - left), max(1, bottom - top)), (left, top)
    colours = (
        normalise(heatmap) if calibration is None else calibration.colour_scale(calibration.apply(heatmap))
    )
    rgba = (colormaps[colormap](colours) * 255.0 + 0.5).astype(np.uint8)
    rgba[..., 3] = round(255 * opacity)
    region = Image.fromarray(rgba).resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGBA", (canvas_w, canvas_h), (0, 0, 0, 0))
    canvas.paste(region, offset)
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False)
    return out.getvalue()
