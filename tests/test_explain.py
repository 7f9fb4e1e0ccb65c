"""Heat maps (app/engine/explain.py): calibration against reference maps, the colour scale, normalisation,
placement over the source image, size cap."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.calibration.heatmap import HeatmapCalibration, fit_heatmap_calibration, smooth
from app.engine.explain import heatmap_png, normalise
from app.engine.methods.path_sums import PathAccumulator


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_normalise_spans_zero_to_one_and_survives_constant_and_non_finite_maps() -> None:
    ramp = normalise(np.arange(16, dtype=np.float32).reshape(4, 4))
    assert ramp.min() == 0.0 and ramp.max() == 1.0
    assert not normalise(np.full((4, 4), 3.0)).any()
    assert not normalise(np.full((4, 4), np.nan)).any()
    mixed = normalise(np.array([[0.0, np.inf], [np.nan, 2.0]]))
    assert np.isfinite(mixed).all() and mixed[1, 1] == 1.0 and mixed[0, 1] == 0.0


def test_png_covers_the_centred_square_of_the_source() -> None:
    heat = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    image = decode(heatmap_png(heat, (120, 60)))
    assert image.size == (120, 60) and image.mode == "RGBA"
    alpha = np.asarray(image)[..., 3]
    assert not alpha[:, :30].any() and not alpha[:, 90:].any()  # outside the 60x60 centre square
    assert (alpha[:, 30:90] > 0).all()


def test_large_sources_are_scaled_down_keeping_the_aspect_ratio() -> None:
    image = decode(heatmap_png(np.zeros((32, 32)), (4000, 2000), max_side=500))
    assert image.size == (500, 250)


# --- calibrated maps: per-pixel statistics of a profile's reference maps ---------------------------------


def reference_maps(n: int = 200, seed: int = 0) -> np.ndarray:
    """Log-normal maps whose per-pixel level rises left to right (as real maps vary over the face)."""
    rng = np.random.default_rng(seed)
    level = np.linspace(-2.0, 1.0, 8)[None, None, :]
    return np.exp(level + 0.3 * rng.standard_normal((n, 8, 8)))


def test_calibration_learns_each_pixels_level_so_a_typical_map_is_near_zero() -> None:
    cal = fit_heatmap_calibration(reference_maps(), sigma=0.0)
    np.testing.assert_allclose(cal.mean[0], np.linspace(-2.0, 1.0, 8), atol=0.08)
    np.testing.assert_allclose(cal.std, 0.3, atol=0.06)
    typical = np.exp(np.linspace(-2.0, 1.0, 8))[None, :].repeat(8, 0)
    assert np.abs(cal.apply(typical)).max() < 0.5
    # per-image min-max would paint the right edge hottest; the calibrated map does not
    assert normalise(typical)[:, -1].min() == 1.0


def test_a_pixel_far_above_its_own_reference_level_is_the_hottest() -> None:
    cal = fit_heatmap_calibration(reference_maps(), sigma=0.0)
    odd = np.exp(np.linspace(-2.0, 1.0, 8))[None, :].repeat(8, 0)
    odd[3, 1] *= np.exp(1.5)  # 5 reference sigmas up, yet still below the raw values on the right
    z = cal.apply(odd)
    assert np.unravel_index(z.argmax(), z.shape) == (3, 1)
    assert z[3, 1] > cal.hot and odd[3, 1] < odd[:, -1].min()


def test_hot_is_the_reference_maxima_quantile_at_the_rate() -> None:
    maps = reference_maps(400)
    cal = fit_heatmap_calibration(maps, fpr=0.1, sigma=0.0)
    above = (cal.apply(maps).max(axis=(1, 2)) > cal.hot).mean()
    assert abs(above - 0.1) < 0.01


def test_colour_scale_is_anchored_to_hot() -> None:
    cal = HeatmapCalibration(np.zeros((2, 2)), np.ones((2, 2)), hot=2.0, sigma=0.0)
    colours = cal.colour_scale(np.array([[-1.0, 2.0], [4.0, np.nan]]))
    np.testing.assert_allclose(colours, [[0.0, 0.5], [1.0, 0.0]])


def test_only_a_flagged_image_gets_a_floor_and_it_is_the_threshold_colour() -> None:
    cal = HeatmapCalibration(np.zeros((2, 2)), np.ones((2, 2)), hot=2.0, sigma=0.0)
    assert cal.verdict_floor(True) == 2.0 and cal.verdict_floor(False) == 0.0
    flat = np.array([[0.1, 0.3], [0.2, -1.0]])
    assert cal.colour_scale(flat, cal.verdict_floor(True)).max() == pytest.approx(0.5)  # mid-scale
    np.testing.assert_allclose(cal.colour_scale(flat, cal.verdict_floor(False)), cal.colour_scale(flat))


def test_a_floor_lifts_a_flat_map_keeping_its_shape_and_never_lowers_a_hot_one() -> None:
    cal = HeatmapCalibration(np.zeros((2, 2)), np.ones((2, 2)), hot=2.0, sigma=0.0)
    flat = np.array([[0.1, 0.3], [0.2, -1.0]])  # a whole-image anomaly with no region standing out
    lifted = cal.colour_scale(flat, floor=2.0)
    assert lifted.max() == pytest.approx(0.5)  # its hottest pixel at mid-scale ...
    np.testing.assert_allclose(lifted - lifted.max(), (flat - flat.max()) / 4.0)  # ... the rest as before
    hot = np.array([[0.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(cal.colour_scale(hot, floor=2.0), cal.colour_scale(hot))


def test_a_flagged_whole_image_anomaly_draws_bright() -> None:
    cal = fit_heatmap_calibration(reference_maps(), sigma=0.0)
    typical = np.exp(np.linspace(-2.0, 1.0, 8))[None, :].repeat(8, 0)  # no pixel above its reference level
    floor = cal.verdict_floor(is_anomaly=True)
    dark = np.asarray(decode(heatmap_png(typical, (8, 8), calibration=cal)))[..., :3].astype(int)
    lit = np.asarray(decode(heatmap_png(typical, (8, 8), calibration=cal, floor=floor)))[..., :3].astype(int)
    assert dark.sum(-1).max() < 200 and lit.sum(-1).max() > 300  # inferno's mid-scale: R+G+B 327


def test_smoothing_spreads_a_single_hot_pixel_but_keeps_it_the_peak() -> None:
    spike = np.zeros((9, 9))
    spike[4, 4] = 1.0
    blurred = smooth(spike, 1.0)
    assert blurred.argmax() == 40 and 0 < blurred[4, 4] < 1 and blurred[4, 5] > 0
    assert np.array_equal(smooth(spike, 0.0), spike)
    np.testing.assert_allclose(smooth(np.stack([spike, spike]), 1.0)[1], blurred)


def test_a_pixel_that_never_varies_does_not_blow_up() -> None:
    maps = reference_maps()
    maps[:, 0, 0] = 1.0
    cal = fit_heatmap_calibration(maps, sigma=0.0)
    z = cal.apply(np.full((8, 8), 1.0))
    assert np.isfinite(z).all() and abs(z[0, 0]) < 1e-9


def test_calibration_round_trips_and_refuses_broken_statistics() -> None:
    cal = fit_heatmap_calibration(reference_maps())
    back = HeatmapCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(back.mean, cal.mean, atol=1e-5)
    assert back.hot == cal.hot and back.sigma == cal.sigma
    for broken in (
        {"std": [[1.0]]},
        {"mean": [[float("nan")] * 8] * 8},
        {"hot": 0.0},
        {"transform": "sqrt"},
    ):
        with pytest.raises(ValueError):
            HeatmapCalibration.from_dict({**cal.to_dict(), **broken})


def test_calibrated_png_is_dark_for_a_typical_map_and_bright_where_it_is_not() -> None:
    cal = fit_heatmap_calibration(reference_maps(), sigma=0.0)
    typical = np.exp(np.linspace(-2.0, 1.0, 8))[None, :].repeat(8, 0)
    odd = typical.copy()
    odd[:4, :4] *= np.exp(2.0)
    calm = np.asarray(decode(heatmap_png(typical, (8, 8), calibration=cal)))[..., :3].astype(int)
    hot = np.asarray(decode(heatmap_png(odd, (8, 8), calibration=cal)))[..., :3].astype(int)
    assert calm.sum(-1).max() < 200  # inferno's dark end everywhere
    assert hot[:4, :4].sum(-1).min() > 500 and hot[4:, 4:].sum(-1).max() < 200


def test_the_engine_map_averages_only_the_mid_noise_steps() -> None:
    acc = PathAccumulator(steps=3)
    for abar, level in ((1.0, 1.0), (0.5, 2.0), (0.0, 9.0)):  # clean end, mid-noise, pure noise
        q = torch.full((1, 3, 2, 2), level)
        acc.add(q, q, torch.tensor(abar))
    assert torch.allclose(acc.result([0, 1, 2]).heatmap, torch.full((1, 2, 2), 2.0))
    outside = PathAccumulator(steps=2)  # no step in the range: every step, as before
    for abar, level in ((1.0, 1.0), (0.0, 3.0)):
        q = torch.full((1, 3, 2, 2), level)
        outside.add(q, q, torch.tensor(abar))
    assert torch.allclose(outside.result([0, 1]).heatmap, torch.full((1, 2, 2), 2.0))
