"""Heat maps as images: where along the trajectory the model found an image hard to explain.

The model scores one region of the source image (by default its largest centred square; a model's input
transform may crop elsewhere: ``PreparedImage.crop_box``), so the map is placed over that region of a canvas
the size of the source image; outside it the PNG is fully transparent. Overlaying the PNG on the original
(same size) lines the two up, whatever the model's resolution (32, 64, 256 px ...).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

from app.engine.calibration.heatmap import HeatmapCalibration
from app.engine.calibration.profile import Profile
from app.engine.types import Verdict

DEFAULT_COLORMAP = "inferno"


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


def verdict_floor(profile: Profile, verdict: Verdict) -> float:
    """The floor (``HeatmapCalibration.verdict_floor``) that makes an image's map agree with its verdict:
    0 for a profile without heat-map statistics (those maps are stretched per image anyway)."""
    return 0.0 if profile.heatmap is None else profile.heatmap.verdict_floor(verdict.is_anomaly)


def heatmap_png(
    heatmap: np.ndarray,
    source_size: tuple[int, int],
    *,
    box: tuple[int, int, int, int] | None = None,
    max_side: int = 1024,
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = 0.8,
    calibration: HeatmapCalibration | None = None,
    floor: float = 0.0,
) -> bytes:
    """Colour PNG (RGBA) of an (H, W) heat map, upsampled onto the region of the source the model saw.

    ``source_size`` is (width, height) of the uploaded image; the canvas is that size, scaled down so its
    longer side is at most ``max_side`` (the aspect ratio is kept). ``box`` is that region, (left, top,
    right, bottom) in source pixels (``PreparedImage.crop_box``; it may reach outside the image, whose part
    is cut off); None = the largest centred square. With a profile's ``calibration`` the colours are on
    the profile's one scale (a normal image is dark, the threshold-equivalent mid-scale); without one
    (profiles fitted before heat-map statistics existed) each map is stretched between its own min and max.
    ``floor`` lifts the map so its hottest pixel is drawn at least there (``verdict_floor``: a flagged
    image never draws dark).
    """
    return calibrated_png(
        calibrated_heatmap(heatmap, calibration),
        source_size,
        box=box,
        max_side=max_side,
        colormap=colormap,
        opacity=opacity,
        calibration=calibration,
        floor=floor,
    )


def calibrated_heatmap(heatmap: np.ndarray, calibration: HeatmapCalibration | None) -> np.ndarray:
    """The map on the profile's scale (per-pixel z-scores: ``HeatmapCalibration.apply``); without heat-map
    statistics the raw map, unchanged."""
    return heatmap if calibration is None else calibration.apply(heatmap)


def calibrated_png(
    calibrated: np.ndarray,
    source_size: tuple[int, int],
    *,
    box: tuple[int, int, int, int] | None = None,
    max_side: int = 1024,
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = 0.8,
    calibration: HeatmapCalibration | None = None,
    floor: float = 0.0,
) -> bytes:
    """``heatmap_png`` of a map already through ``calibrated_heatmap`` with the same ``calibration``: a
    caller that also returns the calibrated numbers computes them once."""
    width, height = source_size
    scale = min(1.0, max_side / max(width, height, 1))
    canvas_w, canvas_h = max(1, round(width * scale)), max(1, round(height * scale))
    if box is None:
        side = max(1, round(min(width, height) * scale))
        size, offset = (side, side), ((canvas_w - side) // 2, (canvas_h - side) // 2)
    else:
        left, top, right, bottom = (round(v * scale) for v in box)
        size, offset = (max(1, right - left), max(1, bottom - top)), (left, top)
    colours = normalise(calibrated) if calibration is None else calibration.colour_scale(calibrated, floor)
    rgba = (colormaps[colormap](colours) * 255.0 + 0.5).astype(np.uint8)
    rgba[..., 3] = round(255 * opacity)
    region = Image.fromarray(rgba).resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGBA", (canvas_w, canvas_h), (0, 0, 0, 0))
    canvas.paste(region, offset)
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False)
    return out.getvalue()
