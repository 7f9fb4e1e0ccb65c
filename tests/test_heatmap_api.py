"""Heat maps through the HTTP API (fake engine): a profile created over the API carries heat-map statistics;
``explain=true`` draws on the profile's one scale and ``features=true`` returns the same calibrated numbers;
a profile written before heat-map statistics existed still serves, each map on its own scale."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib import colormaps
from PIL import Image

from app.engine.calibration.heatmap import HeatmapCalibration
from app.settings import Settings
from app.web.app import create_app
from tests.helpers import until
from tests.service_fakes import FakeEngine

SIDE = 8  # the fake model's resolution: uploads this size are not resampled, so PNG pixels are map pixels


def face(seed: int, square: bool = False) -> bytes:
    """A stand-in for a normal image: dark grey with mild noise; ``square``: a white 3x3 patch on it."""
    rng = np.random.default_rng(seed)
    arr = np.clip(60 + rng.normal(0, 6, size=(SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    if square:
        arr[1:4, 1:4] = 255
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    fake = FakeEngine()
    settings = Settings(
        profiles_dir=tmp_path / "profiles", allow_open_profile_creation=True, max_batch_delay_ms=1.0
    )
    with TestClient(create_app(settings, engine=fake), raise_server_exceptions=False) as c:
        assert fake.loaded.wait(10)
        until(lambda: c.get("/readyz").status_code == 200, "/readyz 200", 10)
        files = [("files", (f"ref{i}.png", face(100 + i), "image/png")) for i in range(40)]
        created = c.post("/v1/profiles", data={"name": "default"}, files=files)
        assert created.status_code == 201, created.text
        yield c


def score(client: TestClient, image: bytes) -> dict:
    response = client.post(
        "/v1/score?explain=true&features=true", content=image, headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_explain_and_features_share_the_profiles_scale(client: TestClient) -> None:
    # the fake's map is |pixel| in [-1, 1] units: a white square on a dark image is the anomaly
    result = score(client, face(7, square=True))
    z = np.array(result["features"]["heatmap"], dtype=float)
    hot = result["features"]["heatmap_threshold"]
    assert z.shape == (SIDE, SIDE) and hot > 0
    assert z[1:4, 1:4].min() > 2 * hot and z[5:, 5:].max() < hot  # hot on the square, cool far from it
    # the PNG (the upload's size = the model's: no resampling) is inferno of z / (2 hot), clipped
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"]))))[..., :3]
    expected = colormaps["inferno"](np.clip(z / (2 * hot), 0, 1))[..., :3] * 255
    assert np.abs(drawn.astype(float) - expected).max() <= 2  # 4-decimal rounding of z, uint8 colours


def test_explain_with_features_calibrates_each_map_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calibrated: list[tuple[int, ...]] = []
    apply = HeatmapCalibration.apply

    def counted(self: HeatmapCalibration, heatmap: np.ndarray) -> np.ndarray:
        calibrated.append(np.shape(heatmap))
        return apply(self, heatmap)

    monkeypatch.setattr(HeatmapCalibration, "apply", counted)
    files = [("files", (f"{i}.png", face(i, square=i == 2), "image/png")) for i in (1, 2)]
    response = client.post("/v1/score?explain=true&features=true", files=files)
    assert response.status_code == 200, response.text
    assert all(r["heatmap_png"] and r["features"]["heatmap"] for r in response.json()["results"])
    assert calibrated == [(SIDE, SIDE)] * 2  # one map per image, once: the PNG is drawn from the same numbers


def test_a_typical_image_is_cool(client: TestClient) -> None:
    result = score(client, face(7))  # the same kind of image as the references, not one of them
    z = np.array(result["features"]["heatmap"], dtype=float)
    assert z.max() < result["features"]["heatmap_threshold"] and abs(np.median(z)) < 1.0


def test_a_profile_without_heatmap_statistics_draws_each_map_on_its_own(
    client: TestClient, tmp_path: Path
) -> None:
    path = tmp_path / "profiles" / "default.json"
    old = json.loads(path.read_text())
    old.pop("heatmap")
    old["format_version"] = 1  # as written before heat-map statistics existed
    (tmp_path / "profiles" / "old.json").write_text(json.dumps(old))
    response = client.post(
        "/v1/score?explain=true&features=true&profile=old",
        content=face(3, square=True),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    features = response.json()["results"][0]["features"]
    assert features["heatmap_threshold"] is None
    raw = np.array(features["heatmap"], dtype=float)
    assert raw.min() >= 0  # the engine's raw map, not z-scores
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["results"][0]["heatmap_png"]))))
    # per-image min-max: the map's hottest pixel takes the top of the colour map
    assert tuple(drawn[np.unravel_index(raw.argmax(), raw.shape)][:3]) == tuple(
        round(255 * c) for c in colormaps["inferno"](1.0)[:3]
    )
