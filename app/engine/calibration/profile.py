"""A calibration profile: the fitted density, the cross-fitted scores of the normal images and the
thresholds that turn a score into a verdict. Plain JSON on disk (arrays as lists, no pickle), versioned.

``load`` refuses a profile made for another model, other feature options, a method this build does not
have, or a format newer than this build; older formats are upgraded on load.

Adding a field to the profile (e.g. per-pixel statistics of the normal images):
  1. add it to ``Profile`` with a default (``None`` or an empty value: profiles fitted before it have none);
  2. write it in ``to_dict`` and read it in ``from_dict`` (arrays as lists; ``summary`` drops large ones);
  3. bump ``FORMAT_VERSION`` and add ``MIGRATIONS[old] = function(dict) -> dict`` that gives a document of
     the old version the new field's "absent" value, so older profiles keep loading;
  4. fill it in ``fit.fit_profile``; tests: a profile of the old version still loads (test_calibration.py).
A new feature option is not a profile field: ``MethodOptions`` (types.py) carries it in ``options``, and its
``from_dict`` gives profiles written before the option the value they were fitted with.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.engine.calibration.density import (
    DENSITY_KINDS,
    Density,
    DensityClass,
    ExpertsDensity,
    GaussianMixtureDensity,
)
from app.engine.calibration.heatmap import HeatmapCalibration
from app.engine.calibration.thresholds import fpr_intervals_for, fpr_key, verdict, wide_intervals
from app.engine.types import ImageStats, MethodOptions, Verdict
from app.errors import ProfileMismatch

if TYPE_CHECKING:
    from app.engine.methods.base import Method

FORMAT_VERSION = 5
# MIGRATIONS[v] upgrades a version-v document to version v + 1; ``from_dict`` applies them in turn.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: lambda d: {**d, "heatmap": None},  # 2 adds heat-map statistics; older profiles draw maps uncalibrated
    # 3 adds each threshold's false-positive-rate interval: a function of the number of calibration scores
    # and the rate alone, so older profiles get exactly the values a refit would record
    2: lambda d: {**d, "fpr_intervals": fpr_intervals_for(len(d["calibration_scores"]), d["thresholds"])},
    3: lambda d: {**d, "selection": None},  # 4 records how the features were chosen; older ones were given
    4: lambda d: _embedding_unchanged(d),  # 5 reads another embedding (docs/METHOD.md, "Embedding expert")
}


def _embedding_unchanged(d: dict[str, Any]) -> dict[str, Any]:
    """A format-4 profile of the embedding expert was fitted on the spatial mean of the second up block;
    the walk now gives the first's (runtimes.EMBEDDING), which that density must not read: refit it."""
    if (d.get("options") or {}).get("aggregation") == "per-step-centre+embedding":
        raise ProfileMismatch(
            "profile fitted on an earlier UNet embedding (format 4, per-step-centre+embedding): "
            "calibrate it again from its images"
        )
    return d


MAX_PROFILE_BYTES = 8 * 1024 * 1024
TEMP_SUFFIX = ".tmp"  # ``.<name>.json.<random>.tmp`` while a profile is written


@dataclass
class Profile:
    name: str
    model_id: str
    options: MethodOptions
    density: Density
    calibration_scores: np.ndarray  # sorted, held-out (cross-fitted) scores of the reference images
    thresholds: dict[str, float]  # str(fpr) -> score threshold
    default_fpr: float = 0.05
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    n_reference: int = 0
    source: str = ""
    # per-pixel statistics of the reference images' heat maps (calibration/heatmap.py); None: fitted
    # before they existed, heat maps are then drawn each on its own scale
    heatmap: HeatmapCalibration | None = None
    # str(fpr) -> (low, high): where each threshold's true false-positive rate lies (thresholds.fpr_interval)
    fpr_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    # how the features were chosen from the normal images (calibration/choice.py ``Choice.to_dict``);
    # None when they were named explicitly
    selection: dict[str, Any] | None = None

    # scores ------------------------------------------------------------------------------------
    def score(self, features: np.ndarray) -> np.ndarray:
        """Anomaly score -log p(f) per row; +inf/NaN where features are not finite."""
        features = np.atleast_2d(np.asarray(features, dtype=float))
        out = np.full(len(features), np.nan)
        ok = np.isfinite(features).all(axis=1)
        if ok.any():
            out[ok] = -self.density.log_density(features[ok])
        return out

    @property
    def threshold(self) -> float:
        return self.thresholds[fpr_key(self.default_fpr)]

    def features(self, stats: Sequence[ImageStats]) -> np.ndarray:
        """(N, D): each image's features under this profile's own options (``features_under``)."""
        return features_under(self.options, stats)

    def verdicts(self, stats: list[ImageStats]) -> list[Verdict]:
        if not stats:
            return []
        scores = self.score(self.features(stats))
        return [self.verdict(float(v)) for v in scores]

    def verdict(self, score: float) -> Verdict:
        return verdict(score, self.calibration_scores, self.thresholds, self.default_fpr)

    # persistence --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "model_id": self.model_id,
            "options": self.options.to_dict(),
            "created": self.created,
            "n_reference": self.n_reference,
            "source": self.source,
            "default_fpr": self.default_fpr,
            "thresholds": self.thresholds,
            "density": self.density.to_dict(),
            "calibration_scores": self.calibration_scores.tolist(),
            "heatmap": None if self.heatmap is None else self.heatmap.to_dict(),
            "fpr_intervals": {k: [round(lo, 6), round(hi, 6)] for k, (lo, hi) in self.fpr_intervals.items()},
            "selection": self.selection,
        }

    def warnings(self) -> list[str]:
        """Thresholds too uncertain for their rate (thresholds.wide_intervals): few reference images."""
        return wide_intervals(self.fpr_intervals, len(self.calibration_scores))

    def summary(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("density")
        d.pop("calibration_scores")
        d["heatmap"] = (
            None if self.heatmap is None else {"hot": self.heatmap.hot, "sigma": self.heatmap.sigma}
        )
        d["density"] = self.density.kind
        d["warnings"] = self.warnings()
        if isinstance(self.density, ExpertsDensity):
            d["experts"] = [e.kind for e in self.density.experts]
        if isinstance(self.density, GaussianMixtureDensity):
            d["mixture_components"] = self.density.n_components
            d["covariance_type"] = self.density.covariance_type
        return d

    def save(self, path: str | Path) -> Path:
        """Atomic write: a reader never sees a half-written profile."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())  # the data is on disk before the name points at it
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; profiles are shared read-only data
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself survives a power cut
        finally:
            os.close(directory)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        d = upgrade(d)
        options = MethodOptions.from_dict(d["options"])
        density_data = d["density"]
        density_cls = DENSITY_KINDS.get(density_data.get("kind"))
        if density_cls is None:
            raise ProfileMismatch(f"unknown density kind {density_data.get('kind')!r}")
        _check_method(options, density_cls.kind)
        scores = np.sort(np.asarray(d["calibration_scores"], dtype=float))
        thresholds = {str(k): float(v) for k, v in d["thresholds"].items()}
        profile = cls(
            name=str(d["name"]),
            model_id=str(d["model_id"]),
            options=options,
            density=density_cls.from_dict(density_data),
            calibration_scores=scores,
            thresholds=thresholds,
            default_fpr=float(d["default_fpr"]),
            created=str(d["created"]),
            n_reference=int(d["n_reference"]),
            source=str(d.get("source", "")),
            heatmap=None if d.get("heatmap") is None else HeatmapCalibration.from_dict(d["heatmap"]),
            fpr_intervals={str(k): (float(lo), float(hi)) for k, (lo, hi) in d["fpr_intervals"].items()},
            selection=d.get("selection"),
        )
        if len(scores) == 0 or not np.isfinite(scores).all():
            raise ProfileMismatch("profile has no usable calibration scores")
        if fpr_key(profile.default_fpr) not in thresholds:
            raise ProfileMismatch("profile has no threshold at its default false-positive rate")
        return profile

    @classmethod
    def load(
        cls, path: str | Path, model_id: str | None = None, options: MethodOptions | None = None
    ) -> Profile:
        """Read a profile; refuse it if corrupt, too large, or made for another model or feature options."""
        path = Path(path)
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileMismatch(f"{path.name}: larger than {MAX_PROFILE_BYTES} bytes")
        try:
            profile = cls.from_dict(json.loads(path.read_text()))
        except ProfileMismatch as exc:
            raise ProfileMismatch(f"{path.name}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ProfileMismatch(f"{path.name}: corrupt profile ({type(exc).__name__}: {exc})") from exc
        if model_id is not None and not same_model(profile.model_id, model_id):
            raise ProfileMismatch(
                f"{path.name}: made for model {profile.model_id}, loaded model is {model_id}"
            )
        if options is not None and served_key(profile.options) != served_key(options):
            raise ProfileMismatch(f"{path.name}: {options_mismatch(profile.options, options)}")
        return profile


def same_model(a: str, b: str) -> bool:
    """Whether two model ids (``name@weights-hash``, ModelInfo) name the same weights: the hash is the
    identity, the folder name only a label, so a copied or renamed model folder keeps its profiles."""
    hash_a, hash_b = a.rpartition("@")[2], b.rpartition("@")[2]
    return hash_a == hash_b if "@" in a and "@" in b else a == b


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A profile document of this build's format: older versions migrated step by step, newer refused."""
    version = d.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ProfileMismatch(f"profile format {version!r}, this build reads formats 1 to {FORMAT_VERSION}")
    while version < FORMAT_VERSION:
        version += 1
        d = {**MIGRATIONS[version - 1](d), "format_version": version}
    return d


def features_under(options: MethodOptions, stats: Sequence[ImageStats]) -> np.ndarray:
    """(N, D): each image's features under ``options`` (its aggregation, from the sums of one walk that
    serves every profile; methods/aggregations.py). Fitting and scoring both read features through here."""
    method = _method(options.method)
    return np.stack([method.image_features(s, options) for s in stats]) if stats else np.zeros((0, 0))


def served_key(options: MethodOptions) -> dict[str, Any]:
    """What a profile must share with the service that serves it: the walk (``MethodOptions.walk_key``),
    and the aggregation too for a method whose features are not an aggregation of the shared sums."""
    return options.walk_key() if _method(options.method).aggregated else options.feature_key()


def _method(name: str) -> Method:
    # imported here: the methods load torch, and app.client reads this package's names without it
    from app.engine.methods import get

    try:
        return get(name)
    except ValueError as exc:
        raise ProfileMismatch(str(exc)) from None


def density_for(options: MethodOptions) -> DensityClass:
    """The density a profile of these options fits: its method's, or separate experts when its aggregation
    names them (methods/aggregations.py ``expert_blocks``)."""
    from app.engine.methods.aggregations import expert_blocks

    if expert_blocks(options.aggregation, options.steps, 0) is not None:
        return ExpertsDensity
    return _method(options.method).density


def _check_method(options: MethodOptions, density_kind: str) -> None:
    """Refuse a profile of a method this build does not have, or with another density than its options'."""
    expected = density_for(options)
    if expected.kind != density_kind:
        raise ProfileMismatch(f"a {density_kind} density for {options.method}, which uses {expected.kind}")


def options_mismatch(profile: MethodOptions, service: MethodOptions) -> str:
    """Why a profile's options do not match, naming what differs first (e.g. "trajectory: profile ddim,
    service diffpath"): a profile fitted along another trajectory, K or method describes other walks and is
    never used (its aggregation and density are its own)."""
    mine, theirs = served_key(profile), served_key(service)
    differ = "; ".join(
        f"{key}: profile {mine.get(key)!r}, service {theirs.get(key)!r}"
        for key in sorted(set(mine) | set(theirs))
        if mine.get(key) != theirs.get(key)
    )
    return f"made with method options {mine}, service runs {theirs} ({differ})"
