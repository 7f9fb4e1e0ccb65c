"""Zero-shot profiles on one live server: the shipped faces profile and a texture profile created over the
API, whose features were chosen from the texture images alone, each judge images with its own features in
the same batches (docs/METHOD.md, "Choosing features")."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.client import AnomalyClient
from app.engine.calibration.profile import Profile
from app.engine.engine import Engine
from tests.conftest import LiveServer
from tests.helpers import SHIPPED_MODEL, metric_value, require_data

pytestmark = [pytest.mark.slow, pytest.mark.live]

KEY = "zero-shot-key"


def images(name: str, count: int, start: int) -> list[bytes]:
    return [p.read_bytes() for p in require_data(name, count, start)]


@pytest.fixture(scope="module")
def server(
    live_server_module: Callable[..., LiveServer], tmp_path_factory: pytest.TempPathFactory
) -> LiveServer:
    images("dtd", 1, 0)  # skip before starting anything when the data is missing
    profiles = tmp_path_factory.mktemp("zero-shot-profiles")
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "default.json")
    # a wide batching window: two requests sent together share a batch on any host
    return live_server_module(
        {"DDM_ADMIN_API_KEYS": KEY, "DDM_PROFILES_DIR": str(profiles), "DDM_MAX_BATCH_DELAY_MS": "1500"}
    )


def test_a_texture_profile_chooses_its_features_and_shares_batches_with_the_faces_profile(
    server: LiveServer,
) -> None:
    with AnomalyClient(server.url, api_key=KEY, timeout=600.0) as client:
        textures = client.create_profile("textures", images("dtd", 200, 0), source="DTD 0-199")
        # chosen from the 200 textures alone: the richest features their density generalises over
        assert textures.options["aggregation"] == "per-step-centre+embedding"
        assert textures.density == "experts"
        selection = textures.model_extra["selection"]  # type: ignore[index]
        assert selection["aggregation"] == "per-step-centre+embedding"
        assert 0 <= selection["gaps"]["per-step-centre+embedding"] <= 1.0
        # 200 textures are too few for the 512 values of the means and spreads (400 suffice: ACCURACY.md)
        assert selection["gaps"]["per-step-centre+embedding+spread"] > 1.0
        listed = {p.name: p.options["aggregation"] for p in client.models().models[0].profiles}
        assert listed == {"default": "per-step-centre", "textures": "per-step-centre+embedding"}

        batch = images("celeba", 4, 2000) + images("dtd", 4, 600)  # none of them calibrated either profile
        before = metric_value(client.metrics(), "anomaly_batch_size_count")
        answers: dict[str, object] = {}

        def score(profile: str) -> None:
            answers[profile] = client.score(batch, profile=profile)

        threads = [threading.Thread(target=score, args=(p,)) for p in ("default", "textures")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        batches = metric_value(client.metrics(), "anomaly_batch_size_count") - before
    faces_view, texture_view = answers["default"], answers["textures"]
    # both requests' 16 images were walked in one batch, each judged by its own profile's features
    assert batches == 1
    face_flags = [r.is_anomaly for r in faces_view.results]  # type: ignore[attr-defined]
    assert sum(face_flags[:4]) <= 1 and sum(face_flags[4:]) >= 3, face_flags  # faces normal, textures not
    # the texture profile sees it the other way round: faces score above textures
    by_textures = [r.score for r in texture_view.results]  # type: ignore[attr-defined]
    assert np.mean(by_textures[:4]) > np.mean(by_textures[4:]) + 1.0, by_textures
    # the scores are what the engine and each profile compute offline
    engine = Engine(SHIPPED_MODEL, device="cpu")
    engine.load(warmup_batch=0)
    stats = engine.image_stats([engine.decode(b) for b in batch])
    folder = Path(server.env["DDM_PROFILES_DIR"])
    for name, answer in (("default", faces_view), ("textures", texture_view)):
        expected = Profile.load(folder / f"{name}.json").score(
            Profile.load(folder / f"{name}.json").features(stats)
        )
        got = np.array([r.score for r in answer.results])  # type: ignore[attr-defined]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-2)
