"""Calibration profiles: a density over the features of normal images, plus the score distribution and
thresholds that turn a score into a verdict (METHOD.md step 5).

A profile is data: one JSON document (arrays as lists, no pickle) carrying the format version, the model
id and the feature options it was fitted with. ``load`` refuses a profile made for anything else.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import KFold
from sklearn.neighbors import KernelDensity

from app.engine.types import ImageStats, MethodOptions, Verdict
from app.errors import InvalidInput, ProfileMismatch

FORMAT_VERSION = 1
DEFAULT_FPRS = (0.01, 0.05, 0.1)
MAX_FPRS = 32  # every answer carries one threshold per rate: a bounded list keeps answers small
MAX_PROFILE_BYTES = 8 * 1024 * 1024
TEMP_SUFFIX = ".tmp"  # ``.<name>.json.<random>.tmp`` while a profile is written
MIN_REFERENCE_IMAGES = 10
RANDOM_STATE = 0


# --- densities: fit on (N, D) features, log_density(F) -> (N,) ---------------------------------------------
@dataclass
class GaussianMixtureDensity:
    """StandardScaler + Gaussian mixture, kept as plain arrays so it round-trips through JSON."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray  # (n, D, D) for every covariance type (expanded)
    covariance_type: str

    kind = "gmm"

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        max_components: int = 8,
        covariance_type: str = "full",
        reg_covar: float = 1e-4,
    ) -> GaussianMixtureDensity:
        mean = features.mean(axis=0)
        scale = features.std(axis=0)
        scale[scale == 0] = 1.0
        z = (features - mean) / scale
        kinds = ("full", "diag") if covariance_type == "auto" else (covariance_type,)
        # BIC needs enough points per parameter; never more components than points allow.
        limit = max(1, min(max_components, len(z) // (4 * z.shape[1] + 4)))
        best: GaussianMixture | None = None
        best_bic = math.inf
        for kind in kinds:
            for n in range(1, limit + 1):
                gmm = GaussianMixture(n, covariance_type=kind, random_state=RANDOM_STATE, reg_covar=reg_covar)
                gmm.fit(z)
                bic = gmm.bic(z)
                if bic < best_bic:
                    best, best_bic = gmm, bic
        assert best is not None
        return cls(
            mean,
            scale,
            best.weights_,
            best.means_,
            _full_precision_cholesky(best),
            str(best.covariance_type),
        )

    @property
    def n_components(self) -> int:
        return len(self.weights)

    def log_density(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.mean) / self.scale
        d = z.shape[1]
        log_probs = []
        for w, mu, chol in zip(self.weights, self.means, self.precisions_cholesky, strict=True):
            y = (z - mu) @ chol
            log_det = np.log(np.diag(chol)).sum()
            log_probs.append(np.log(w) - 0.5 * (d * np.log(2 * np.pi) + (y * y).sum(axis=1)) + log_det)
        # the density of the raw features: the scaler's Jacobian keeps scores comparable across profiles
        return logsumexp(np.stack(log_probs, axis=1), axis=1) - np.log(self.scale).sum()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "precisions_cholesky": self.precisions_cholesky.tolist(),
            "covariance_type": self.covariance_type,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianMixtureDensity:
        return cls(
            np.asarray(d["mean"], float),
            np.asarray(d["scale"], float),
            np.asarray(d["weights"], float),
            np.asarray(d["means"], float),
            np.asarray(d["precisions_cholesky"], float),
            str(d["covariance_type"]),
        )


def _full_precision_cholesky(gmm: GaussianMixture) -> np.ndarray:
    n, d = gmm.means_.shape
    pc = gmm.precisions_cholesky_
    if gmm.covariance_type == "full":
        return np.asarray(pc)
    if gmm.covariance_type == "tied":
        return np.repeat(np.asarray(pc)[None], n, axis=0)
    if gmm.covariance_type == "diag":
        return np.stack([np.diag(row) for row in pc])
    return np.stack([np.eye(d) * s for s in pc])  # spherical


@dataclass
class KernelDensity1D:
    """Gaussian KDE on one feature (diffpath-1d), bandwidth by Scott's rule on the standardised values."""

    mean: float
    scale: float
    points: np.ndarray
    bandwidth: float

    kind = "kde"

    @classmethod
    def fit(cls, features: np.ndarray, **_: Any) -> KernelDensity1D:
        x = features[:, 0]
        mean, scale = float(x.mean()), float(x.std() or 1.0)
        z = (x - mean) / scale
        return cls(mean, scale, z, float(len(z) ** (-1 / 5)))

    @functools.cached_property
    def _kde(self) -> KernelDensity:
        # built once per loaded profile, not on every scored batch
        return KernelDensity(bandwidth=self.bandwidth).fit(self.points[:, None])

    def log_density(self, features: np.ndarray) -> np.ndarray:
        z = (features[:, 0] - self.mean) / self.scale
        return self._kde.score_samples(z[:, None]) - math.log(self.scale)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mean": self.mean,
            "scale": self.scale,
            "points": self.points.tolist(),
            "bandwidth": self.bandwidth,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelDensity1D:
        return cls(float(d["mean"]), float(d["scale"]), np.asarray(d["points"], float), float(d["bandwidth"]))


@dataclass
class DirectScore:
    """Reconstruction: the score is the mean dissimilarity itself (higher = more anomalous), no density."""

    kind = "direct"

    @classmethod
    def fit(cls, features: np.ndarray, **_: Any) -> DirectScore:
        return cls()

    def log_density(self, features: np.ndarray) -> np.ndarray:
        return -features.mean(axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DirectScore:
        return cls()


Density = GaussianMixtureDensity | KernelDensity1D | DirectScore
DENSITY_KINDS: dict[str, Any] = {"gmm": GaussianMixtureDensity, "kde": KernelDensity1D, "direct": DirectScore}


def density_for(method: str) -> Any:
    return {"diffpath-1d": KernelDensity1D, "reconstruction": DirectScore}.get(method, GaussianMixtureDensity)


# --- the profile ---------------------------------------------------------------------------------------
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

    def verdicts(self, stats: list[ImageStats]) -> list[Verdict]:
        if not stats:
            return []
        scores = self.score(np.stack([s.features for s in stats]))
        return [self.verdict(float(v)) for v in scores]

    def verdict(self, score: float) -> Verdict:
        cal = self.calibration_scores
        if not math.isfinite(score):
            # not a number the density can judge: flagged, never reported as a number
            return Verdict(None, self.threshold, True, 100.0, 0.0, dict(self.thresholds))
        below = int(np.searchsorted(cal, score, side="right"))
        percentile = 100.0 * below / len(cal)
        p_value = (1 + len(cal) - below) / (len(cal) + 1)  # conformal: share of normals at least as extreme
        return Verdict(
            score, self.threshold, score > self.threshold, percentile, p_value, dict(self.thresholds)
        )

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
        }

    def summary(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("density")
        d.pop("calibration_scores")
        d["density"] = self.density.kind
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
        if d.get("format_version") != FORMAT_VERSION:
            raise ProfileMismatch(
                f"profile format {d.get('format_version')!r}, this build reads {FORMAT_VERSION}"
            )
        density_data = d["density"]
        density_cls = DENSITY_KINDS.get(density_data.get("kind"))
        if density_cls is None:
            raise ProfileMismatch(f"unknown density kind {density_data.get('kind')!r}")
        scores = np.sort(np.asarray(d["calibration_scores"], dtype=float))
        thresholds = {str(k): float(v) for k, v in d["thresholds"].items()}
        profile = cls(
            name=str(d["name"]),
            model_id=str(d["model_id"]),
            options=MethodOptions.from_dict(d["options"]),
            density=density_cls.from_dict(density_data),
            calibration_scores=scores,
            thresholds=thresholds,
            default_fpr=float(d["default_fpr"]),
            created=str(d["created"]),
            n_reference=int(d["n_reference"]),
            source=str(d.get("source", "")),
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
        if model_id is not None and profile.model_id != model_id:
            raise ProfileMismatch(
                f"{path.name}: made for model {profile.model_id}, loaded model is {model_id}"
            )
        if options is not None and profile.options.feature_key() != options.feature_key():
            # name what differs first (e.g. "trajectory: profile ddim, service diffpath"): a profile fitted
            # along another trajectory, K or aggregation describes other features and is never used
            mine, theirs = profile.options.feature_key(), options.feature_key()
            differ = "; ".join(
                f"{key}: profile {mine.get(key)!r}, service {theirs.get(key)!r}"
                for key in sorted(set(mine) | set(theirs))
                if mine.get(key) != theirs.get(key)
            )
            raise ProfileMismatch(
                f"{path.name}: made with method options {mine}, service runs {theirs} ({differ})"
            )
        return profile


def fpr_key(fpr: float) -> str:
    return f"{fpr:g}"


def validate_fprs(fprs: tuple[float, ...], default_fpr: float) -> tuple[float, ...]:
    """The sorted rates a profile keeps thresholds for (``default_fpr`` included); refused when any lies
    outside (0, 1) or there are more than ``MAX_FPRS`` of them. Cheap: callers check before computing."""
    rates = tuple(sorted(set(fprs) | {default_fpr}))
    if not all(0.0 < f < 1.0 for f in rates):  # also refuses NaN
        raise InvalidInput("false-positive rates must lie in (0, 1)")
    if len(rates) > MAX_FPRS:
        raise InvalidInput(f"{len(rates)} false-positive rates; a profile keeps at most {MAX_FPRS}")
    return rates


def fit_profile(
    name: str,
    features: np.ndarray,
    *,
    model_id: str,
    options: MethodOptions,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
    default_fpr: float = 0.05,
    folds: int = 5,
    source: str = "",
) -> Profile:
    """Fit the method's density on normal-image features (N, D).

    Thresholds come from cross-fitted scores: each reference image is scored by a density fitted without
    it, so the stated false-positive rates hold on new normal images instead of being optimistic. The
    density kept in the profile is then fitted on all N.
    """
    features = np.asarray(features, dtype=float)
    if features.ndim != 2 or len(features) < MIN_REFERENCE_IMAGES:
        raise InvalidInput(f"calibration needs at least {MIN_REFERENCE_IMAGES} images, got {len(features)}")
    if not np.isfinite(features).all():
        raise InvalidInput("some reference images gave non-finite features")
    fprs = validate_fprs(fprs, default_fpr)
    density_cls = density_for(options.method)
    kwargs = {
        "max_components": options.mixture_max_components,
        "covariance_type": options.covariance_type,
        "reg_covar": options.density_reg(),
    }
    held_out = np.empty(len(features))
    splitter = KFold(n_splits=min(folds, len(features)), shuffle=True, random_state=RANDOM_STATE)
    for train_idx, test_idx in splitter.split(features):
        fold_density = density_cls.fit(features[train_idx], **kwargs)
        held_out[test_idx] = -fold_density.log_density(features[test_idx])
    density = density_cls.fit(features, **kwargs)
    scores = np.sort(held_out)
    thresholds = {fpr_key(f): conformal_threshold(scores, f) for f in fprs}
    return Profile(
        name=name,
        model_id=model_id,
        options=options,
        density=density,
        calibration_scores=scores,
        thresholds=thresholds,
        default_fpr=default_fpr,
        n_reference=len(features),
        source=source,
    )


def conformal_threshold(sorted_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold that flags at most ``fpr`` of new normal images (split-conformal quantile)."""
    n = len(sorted_scores)
    rank = math.ceil((n + 1) * (1 - fpr))
    if rank > n:
        return float(sorted_scores[-1])
    return float(sorted_scores[rank - 1])
