"""Heat maps point at the anomaly on the shipped model: a patch pasted on a real face is hotter than the rest
of the face under the committed default profile's calibration, and a normal face stays below the
profile's threshold-equivalent (benchmarks/heatmap_eval.py measures the pixel AUROC on 300 such faces)."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.calibration.profile import Profile
from app.engine.engine import Engine
from benchmarks.local_anomalies import LocalAnomalies, mask_at
from tests.helpers import SHIPPED_MODEL, require_data


@pytest.fixture(scope="module")
def shipped() -> Engine:
    engine = Engine(SHIPPED_MODEL, device="cpu")
    engine.load(warmup_batch=0)
    return engine


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load(SHIPPED_MODEL / "profiles" / "default.json")


@pytest.mark.slow
def test_a_pasted_patch_is_hotter_than_the_rest_of_the_face(shipped: Engine, profile: Profile) -> None:
    assert profile.heatmap is not None, "the shipped default profile carries heat-map statistics"
    faces = require_data("celeba", 8, start=2000)
    patches = require_data("dtd", 4) + require_data("cifar10", 4)
    generator = LocalAnomalies(faces, patches, seed=1)
    # patches of a quarter of the side and more: big enough for a 32 px model to see at all
    samples = [s for s in generator.samples(40) if s.mask.mean() >= 0.06][:8]
    stats = shipped.image_stats([shipped.prepare(s.image) for s in samples])
    size = shipped.info.sample_size
    inside, outside = [], []
    for sample, stat in zip(samples, stats, strict=True):
        z = profile.heatmap.apply(stat.heatmap)
        mask = mask_at(sample.mask, size)
        inside.append(z[mask].mean())
        outside.append(z[~mask].mean())
    inside_arr, outside_arr = np.array(inside), np.array(outside)
    assert (inside_arr > outside_arr).mean() >= 0.75, (inside, outside)  # most patches, one by one
    assert inside_arr.mean() > outside_arr.mean() + 1.0  # by more than a reference standard deviation


@pytest.mark.slow
def test_normal_faces_stay_below_the_threshold_colour(shipped: Engine, profile: Profile) -> None:
    assert profile.heatmap is not None
    faces = require_data("celeba", 24, start=2100)
    stats = shipped.image_stats([shipped.decode(f.read_bytes()) for f in faces])
    hottest = np.array([profile.heatmap.apply(s.heatmap).max() for s in stats])
    # by construction ~95% of normal faces (94% of 48 of these); a few are hotter somewhere
    assert (hottest <= profile.heatmap.hot).mean() >= 0.8, hottest
