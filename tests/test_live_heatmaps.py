"""Heat maps never contradict the verdict, through a real server with the shipped model and profile: every
image flagged at the profile's threshold draws its hottest pixel at least mid-scale (the threshold's colour),
textures and digits alike. Most flagged DTD textures have no region hotter than the profile's per-pixel
``hot`` (their calibrated maps alone would draw dark): the map's floor from the image's score lights them.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Callable

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from app.client import AnomalyClient
from app.engine.explain import DEFAULT_COLORMAP
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, require_data

pytestmark = [pytest.mark.slow, pytest.mark.live]

MID_SCALE = 0.5
# bilinear upsampling of the 32 px map onto the 64 px canvas and 8-bit colours shave a little off the peak
TOLERANCE = 0.04


def drawn_values(png: bytes) -> np.ndarray:
    """The colour-scale value [0, 1] of each drawn pixel of a heat-map PNG (nearest colour of the map)."""
    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.float64)
    drawn = rgba[rgba[..., 3] > 0][:, :3]
    lut = colormaps[DEFAULT_COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0
    nearest = np.argmin(((drawn[:, None, :] - lut[None, :, :]) ** 2).sum(-1), axis=1)
    return nearest / 255.0


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    require_data("dtd", 1)
    profiles = tmp_path_factory.mktemp("heatmap-profiles")
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "default.json")
    return live_server_module({"DDM_PROFILES_DIR": str(profiles)})


@pytest.mark.parametrize(("kind", "start"), [("dtd", 0), ("mnist", 0), ("celeba", 0)])
def test_a_flagged_image_never_draws_a_dark_map(server: LiveServer, kind: str, start: int) -> None:
    images = [p.read_bytes() for p in require_data(kind, 12, start)]
    with AnomalyClient(server.url) as client:
        results = client.score(images, explain=True, features=True).results
    flagged = [r for r in results if r.is_anomaly]
    if kind == "celeba":
        assert len(flagged) <= 3  # normal faces: the profile flags about 5 %
    else:
        assert len(flagged) == len(results)  # textures and digits are all far outside faces
    dark_without_floor = 0
    for r in flagged:
        assert r.heatmap_png and r.features is not None and r.features.heatmap_threshold is not None
        peak = drawn_values(base64.b64decode(r.heatmap_png)).max()
        assert peak >= MID_SCALE - TOLERANCE, (r.id, r.score, peak)
        calibrated = np.asarray(r.features.heatmap, dtype=float)  # the map before the floor
        dark_without_floor += int(np.nanmax(calibrated) < r.features.heatmap_threshold)
    if kind == "dtd":
        assert dark_without_floor >= len(flagged) // 2  # the case the floor exists for
