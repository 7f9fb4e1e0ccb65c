"""Heat-map PNGs (app/engine/explain.py): normalisation, placement over the source image, size cap."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.engine.explain import heatmap_png, normalise


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
