"""Calibration profiles: density monotonicity, honest thresholds, persistence and refusal of mismatches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.engine.calibration import profile as profile_module
from app.engine.calibration.density import GaussianMixtureDensity
from app.engine.calibration.fit import fit_profile
from app.engine.calibration.profile import Profile
from app.engine.calibration.store import ProfileStore, validate_profile_name
from app.engine.calibration.thresholds import (
    conformal_threshold,
    fpr_interval,
    fpr_intervals_for,
    wide_intervals,
)
from app.engine.methods import density_reg
from app.engine.types import ImageStats, MethodOptions
from app.errors import InvalidInput, ProfileConflict, ProfileMismatch, ProfileNotFound

OPTIONS = MethodOptions()


def normal_features(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)) * [1, 2, 3, 1, 2, 3] + [10, 0, -5, 0, 100, 0]


def test_gmm_score_grows_with_distance_from_the_normal_mode() -> None:
    f = normal_features(600)
    profile = fit_profile("p", f, model_id="m@1", options=OPTIONS)
    centre = f.mean(axis=0)
    direction = np.array([1, 1, 1, 1, 1, 1]) / np.sqrt(6)
    ray = np.stack([centre + d * direction for d in (0, 1, 2, 4, 8, 16)])
    scores = profile.score(ray)
    assert np.all(np.diff(scores) > 0)


def test_bic_picks_two_components_for_two_clusters() -> None:
    f = np.r_[normal_features(300, 1), normal_features(300, 2) + 40]
    density = GaussianMixtureDensity.fit(f, max_components=4)
    assert density.n_components == 2


def test_conformal_threshold_by_hand_and_false_positive_rate_holds() -> None:
    assert conformal_threshold(np.arange(1.0, 101.0), 0.05) == 96.0  # ceil(101 * 0.95) = 96th value
    profile = fit_profile("p", normal_features(1000), model_id="m@1", options=OPTIONS, fprs=(0.05,))
    fresh = profile.score(normal_features(4000, seed=9))
    assert 0.02 < (fresh > profile.threshold).mean() < 0.08


def test_verdict_fields_and_non_finite_scores_are_never_numbers() -> None:
    profile = fit_profile("p", normal_features(200), model_id="m@1", options=OPTIONS)
    stats = [
        ImageStats(
            normal_features(1, 5)[0], np.zeros((10, 3)), np.zeros((9, 3)), np.arange(10), np.zeros((2, 2))
        ),
        ImageStats(np.full(6, np.nan), np.zeros((10, 3)), np.zeros((9, 3)), np.arange(10), np.zeros((2, 2))),
        ImageStats(
            normal_features(1)[0] * 50, np.zeros((10, 3)), np.zeros((9, 3)), np.arange(10), np.zeros((2, 2))
        ),
    ]
    ok, bad, far = profile.verdicts(stats)
    assert ok.score is not None and 0 <= ok.percentile <= 100 and 0 < ok.p_value <= 1
    assert bad.score is None and bad.is_anomaly
    assert far.is_anomaly and far.percentile == 100.0 and far.p_value == pytest.approx(1 / 201)


def test_profile_round_trip_and_refusals(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, "model@abc", OPTIONS)
    profile = fit_profile("faces", normal_features(100), model_id="model@abc", options=OPTIONS)
    path = store.save(profile)
    assert json.loads(path.read_text())["model_id"] == "model@abc"  # plain JSON, no pickle
    again = store.get("faces")
    probe = normal_features(5, seed=3)
    np.testing.assert_allclose(again.score(probe), profile.score(probe))
    assert store.names() == ["faces"]
    with pytest.raises(ProfileNotFound):
        store.get("other")
    with pytest.raises(ProfileMismatch, match="made for model"):
        ProfileStore(tmp_path, "model@other", OPTIONS).get("faces")
    with pytest.raises(ProfileMismatch, match="method options"):
        ProfileStore(tmp_path, "model@abc", MethodOptions(steps=20)).get("faces")
    path.write_text(path.read_text()[:100])
    with pytest.raises(ProfileMismatch, match="corrupt"):
        store.get("faces")
    data = profile.to_dict()
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileMismatch, match="format"):
        Profile.load(path)


def test_a_profile_from_before_the_aggregation_option_means_the_six_sums(tmp_path: Path) -> None:
    sums = MethodOptions(aggregation="sum")
    data = fit_profile("old", normal_features(40), model_id="model@abc", options=sums).to_dict()
    del data["options"]["aggregation"]  # what every profile written before the option looked like
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert ProfileStore(tmp_path, "model@abc", sums).get("old").options.aggregation == "sum"
    # a service whose new profiles use other features still serves it, with its own six sums
    assert (
        ProfileStore(tmp_path, "model@abc", MethodOptions(aggregation="per-step")).get("old").options == sums
    )
    # what a profile must share with its service is the walk: another K is refused
    with pytest.raises(ProfileMismatch, match="method options"):
        ProfileStore(tmp_path, "model@abc", MethodOptions(aggregation="sum", steps=20)).get("old")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 80, "naïve", "a b", "a..b"])
def test_profile_names_are_validated(name: str) -> None:
    with pytest.raises(InvalidInput):
        validate_profile_name(name)


def test_too_few_reference_images_are_refused() -> None:
    with pytest.raises(InvalidInput):
        fit_profile("p", normal_features(5), model_id="m", options=OPTIONS)


def test_few_reference_images_with_many_features_give_a_stable_density() -> None:
    """19 per-step energies from 12 images: without shrinkage the covariance is near-singular and scores
    of new normal images swing with float rounding (what a live server showed between batch sizes)."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 19))  # the log energies are strongly correlated across steps

    def normal(n: int) -> np.ndarray:
        return rng.normal(size=(n, 4)) @ mixing + 0.01 * rng.normal(size=(n, 19))

    reference, probe = normal(12), normal(20)
    rounded = probe * (1 + 1e-6 * rng.normal(size=probe.shape))  # float32-sized differences
    swing = {}
    for reg in (None, 1e-4):
        profile = fit_profile("few", reference, model_id="m", options=MethodOptions(covariance_reg=reg))
        swing[reg] = np.abs(profile.score(rounded) - profile.score(probe)).max()
    assert density_reg(MethodOptions()) == 0.1 and density_reg(MethodOptions(aggregation="sum")) == 1e-4
    assert swing[None] < 1e-4 < swing[1e-4]  # ~1e-5 vs ~1.5e-3


def test_thresholds_come_from_cross_fitted_scores_not_in_sample() -> None:
    """Each reference image is scored by a density fitted without it. In-sample scores of few images are
    optimistic (lower): thresholds from them flag ~10% of new normal images at a stated 5% (measured 0.10 on
    this data, 0.005 cross-fitted)."""
    from sklearn.model_selection import KFold

    from app.engine.calibration.density import RANDOM_STATE

    f = normal_features(40, seed=3)
    profile = fit_profile("p", f, model_id="m@1", options=OPTIONS, fprs=(0.05,))
    # the held-out scores by hand: 5 folds, the same split, each fold scored by the others' density
    held_out = np.empty(len(f))
    for train, test in KFold(5, shuffle=True, random_state=RANDOM_STATE).split(f):
        density = GaussianMixtureDensity.fit(f[train], reg_covar=density_reg(OPTIONS))
        held_out[test] = -density.log_density(f[test])
    np.testing.assert_allclose(profile.calibration_scores, np.sort(held_out), rtol=1e-9)
    assert profile.threshold == conformal_threshold(np.sort(held_out), 0.05)
    in_sample = np.sort(profile.score(f))
    assert profile.calibration_scores.mean() > in_sample.mean() + 0.5  # held out = worse fit than in sample
    fresh = profile.score(normal_features(4000, seed=9))
    assert (fresh > profile.threshold).mean() <= 0.05  # the stated rate holds (in-sample thresholds: 0.10)


def test_an_older_profile_format_is_upgraded_and_a_newer_one_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """How a profile field is added: FORMAT_VERSION goes up and MIGRATIONS gives documents of the older
    version the field's "absent" value, so profiles written before keep loading (here: a next version)."""
    current = profile_module.FORMAT_VERSION
    data = fit_profile("p", normal_features(40), model_id="m@1", options=OPTIONS).to_dict()
    assert data["format_version"] == current
    monkeypatch.setattr(profile_module, "FORMAT_VERSION", current + 1)
    monkeypatch.setitem(profile_module.MIGRATIONS, current, lambda d: {**d, "source": "upgraded"})
    upgraded = Profile.from_dict(data)
    assert upgraded.source == "upgraded" and upgraded.to_dict()["format_version"] == current + 1
    assert data["format_version"] == current  # the document read is not changed
    np.testing.assert_array_equal(upgraded.calibration_scores, data["calibration_scores"])
    for version in (current + 2, 0, str(current), None):
        with pytest.raises(ProfileMismatch, match="format"):
            Profile.from_dict({**data, "format_version": version})


def test_a_profile_must_use_its_methods_density() -> None:
    data = fit_profile("p", normal_features(40), model_id="m@1", options=OPTIONS).to_dict()
    with pytest.raises(ProfileMismatch, match="unknown method"):
        Profile.from_dict({**data, "options": {**data["options"], "method": "no-such-method"}})
    with pytest.raises(ProfileMismatch, match="uses gmm"):
        Profile.from_dict({**data, "density": {"kind": "direct"}})


def test_each_threshold_records_where_its_true_false_positive_rate_lies() -> None:
    """The interval is the Beta law of a conformal threshold's exceedance probability: it holds over many
    reference sets (checked by simulation) and is wide for a rare rate from few images (a warning)."""
    small = fit_profile("p", normal_features(200), model_id="m@1", options=OPTIONS)
    low, high = small.fpr_intervals["0.01"]
    assert low < 0.01 < high and high > 0.02  # 200 images: up to 2.8x the stated 1%
    assert len(small.warnings()) == 1 and "threshold at 0.01" in small.warnings()[0]
    assert small.summary()["warnings"] == small.warnings()
    large = fpr_intervals_for(1200, small.thresholds)  # what a 1,200-image profile records
    assert wide_intervals(large, 1200) == [] and large["0.01"][1] < 0.02
    # coverage: the true rate of a 5% threshold from 100 scores, over 400 reference sets of exact normals
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    low, high = fpr_interval(100, 0.05)
    inside = []
    for _ in range(400):
        threshold = conformal_threshold(np.sort(rng.normal(size=100)), 0.05)
        inside.append(low <= norm.sf(threshold) <= high)
    assert 0.92 <= np.mean(inside) <= 0.98  # a 95% interval


def test_profiles_of_format_2_get_their_intervals_on_load() -> None:
    data = fit_profile("p", normal_features(40), model_id="m@1", options=OPTIONS).to_dict()
    old = {k: v for k, v in data.items() if k != "fpr_intervals"} | {"format_version": 2}
    upgraded = Profile.from_dict(old)
    fitted = Profile.from_dict(data).fpr_intervals
    assert upgraded.fpr_intervals.keys() == fitted.keys()
    for key, interval in fitted.items():
        assert upgraded.fpr_intervals[key] == pytest.approx(interval, abs=1e-6)
    shipped = Profile.load(
        Path(__file__).parent.parent / "model_store" / "celeba32-ref" / "profiles" / "default.json"
    )
    assert shipped.n_reference == 1200 and shipped.warnings() == []
    assert shipped.fpr_intervals["0.05"] == pytest.approx((0.0384, 0.0630), abs=1e-4)


def test_a_profile_follows_the_weights_not_the_folder_name(tmp_path: Path) -> None:
    profile = fit_profile("p", normal_features(40), model_id="celeba32-ref@ecaff7b26f72", options=OPTIONS)
    path = profile.save(tmp_path / "p.json")
    assert Profile.load(path, "copied-folder@ecaff7b26f72", OPTIONS).name == "p"
    with pytest.raises(ProfileMismatch, match="made for model"):
        Profile.load(path, "celeba32-ref@000000000000", OPTIONS)
    ProfileStore(tmp_path / "store", "renamed@ecaff7b26f72", OPTIONS).save(profile)  # accepted as well


# --- profile files: names and writes ---------------------------------------------------------------------
def _fitted(name: str, seed: int = 0) -> Profile:
    features = np.random.default_rng(seed).normal(size=(20, 6))
    return fit_profile(name, features, model_id="m@0", options=MethodOptions())


@pytest.mark.parametrize("new", ["widgets", "WIDGETS", "wIdGeTs"])
def test_a_name_that_differs_only_by_case_from_an_existing_one_is_refused(tmp_path: Path, new: str) -> None:
    """Both directions: an existing ``Widgets`` blocks ``widgets`` and ``WIDGETS`` (one file on a
    case-insensitive filesystem), as an existing ``widgets`` blocks ``Widgets``."""
    store = ProfileStore(tmp_path, "m@0", MethodOptions())
    store.save(_fitted("Widgets"))
    with pytest.raises(ProfileConflict, match="only by case"):
        store.check_new(new, overwrite=True)
    other = ProfileStore(tmp_path / "lower", "m@0", MethodOptions())
    other.save(_fitted("widgets"))
    with pytest.raises(ProfileConflict, match="only by case"):
        other.check_new("Widgets", overwrite=True)


def test_a_write_that_fails_part_way_leaves_the_existing_profile_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Profiles are written to a temp file and renamed: a write that fails half-way (disk full, a crash)
    never destroys the profile it was replacing, and leaves no temp file."""
    store = ProfileStore(tmp_path, "m@0", MethodOptions())
    path = store.save(_fitted("widgets"))
    original = path.read_bytes()

    def failing_dump(obj: object, fh: Any, **kwargs: Any) -> None:
        fh.write(json.dumps(obj)[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile_module.json, "dump", failing_dump)
    with pytest.raises(OSError, match="No space left"):
        store.save(_fitted("widgets", seed=1), overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert Profile.load(path, "m@0", MethodOptions()).name == "widgets"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["widgets.json"]
