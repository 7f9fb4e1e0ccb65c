"""Heat-map statistics of a profile: what a normal image's map looks like, pixel by pixel.

The engine's raw map (``ImageStats.heatmap``, model resolution) is smoothed at the scale the model resolves,
logged, and z-scored against the per-pixel mean and standard deviation of the same over the profile's
normal reference images; ``hot`` is the threshold-equivalent of the profile's one colour scale
(app/engine/explain.py draws it). benchmarks/heatmap_eval.py measures how well this localizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

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

    def colour_scale(self, calibrated: np.ndarray, floor: float = 0.0) -> np.ndarray:
        """Calibrated map -> [0, 1] on the profile's one scale: 0 at or below typical, 0.5 at ``hot``, 1 at
        twice ``hot``; non-finite values draw as 0. ``floor`` (``verdict_floor``) lifts the whole map so its
        hottest pixel reaches at least that value: the map keeps its shape and agrees with the verdict."""
        arr = np.asarray(calibrated, dtype=np.float64)
        finite = np.isfinite(arr)
        peak = float(arr[finite].max()) if finite.any() else 0.0
        scaled = (arr + max(0.0, floor - peak)) / (2.0 * self.hot)
        return np.where(finite, np.clip(scaled, 0.0, 1.0), 0.0)

    def verdict_floor(self, is_anomaly: bool) -> float:
        """The least the hottest pixel of an image's map is drawn at: ``hot`` (mid-scale, the threshold's
        colour) when the image is flagged, else nothing. A whole image unlike the normal ones (a texture
        scored by a face model) may have no region hotter than the rest of it, so its calibrated map alone
        would stay dark while the verdict says anomaly. Lifting only flagged maps, and only to ``hot``,
        keeps pixel AUROC on pasted patches at 0.923 (0.926 unlifted); a floor growing with the score
        (``hot`` at the threshold, twice it far beyond) fell to 0.872: the lifted maps of far-out images
        outrank the patch pixels of the others (benchmarks/heatmap_eval.py, docs/ACCURACY.md)."""
        return self.hot if is_anomaly else 0.0

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
    ``sigma`` (model pixels) defaults to SMOOTHING_FRACTION of the map's side.

    ``hot`` comes from leave-one-out z-scores (each reference map against the statistics of the others), as
    score thresholds come from cross-fitted scores: in-sample maps would look cooler than new normal ones.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or len(maps) < 3:
        raise ValueError("need the heat maps of at least three reference images, (N, H, W)")
    if sigma is None:
        sigma = SMOOTHING_FRACTION * min(maps.shape[1:])
    logged = log_map(smooth(maps, sigma))
    logged = logged[np.isfinite(logged).all(axis=(1, 2))]
    n = len(logged)
    if n < 3:
        raise ValueError("fewer than three reference heat maps are finite")
    total, total_sq = logged.sum(0), np.square(logged).sum(0)
    mean_without = (total - logged) / (n - 1)
    var_without = (total_sq - np.square(logged)) / (n - 1) - np.square(mean_without)
    held_out = standardise(logged, mean_without, np.sqrt(np.maximum(var_without, 0.0)))
    hot = max(float(np.quantile(held_out.max(axis=(1, 2)), 1.0 - fpr)), 1e-6)
    return HeatmapCalibration(logged.mean(0), logged.std(0), hot, sigma)
