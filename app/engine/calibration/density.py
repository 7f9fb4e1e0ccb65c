"""Densities over the features of normal images (METHOD.md step 5): ``fit(features (N, D), **kwargs)`` and
``log_density(features) -> (N,)``; each round-trips through plain JSON (``to_dict``/``from_dict``).

A method names its density class (``app.engine.methods``); a profile stores the fitted one under its
``kind``. A new density: a dataclass with ``kind``, ``fit``, ``log_density``, ``to_dict``, ``from_dict``,
added to ``Density`` and ``DENSITY_KINDS`` below.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import KFold
from sklearn.neighbors import KernelDensity

RANDOM_STATE = 0  # mixtures and cross-fitting folds are seeded: a profile refitted on the same data is equal


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


@dataclass
class GaussianDensity:
    """StandardScaler + one Gaussian with Ledoit-Wolf shrinkage: for many features (the UNet's embedding,
    hundreds of values) from a few hundred images, where a full mixture's covariance is singular."""

    mean: np.ndarray
    scale: np.ndarray
    centre: np.ndarray
    precision: np.ndarray  # (D, D) of the standardised features

    kind = "gaussian"

    @classmethod
    def fit(cls, features: np.ndarray, **_: Any) -> GaussianDensity:
        mean = features.mean(axis=0)
        scale = features.std(axis=0)
        scale[scale == 0] = 1.0
        shrunk = LedoitWolf().fit((features - mean) / scale)
        return cls(mean, scale, shrunk.location_, shrunk.precision_)

    @functools.cached_property
    def _log_normaliser(self) -> float:
        # once per loaded profile, not on every scored batch (a D x D determinant)
        _, log_det = np.linalg.slogdet(self.precision)
        d = len(self.mean)
        return float(0.5 * (log_det - d * np.log(2 * np.pi)) - np.log(self.scale).sum())

    def log_density(self, features: np.ndarray) -> np.ndarray:
        y = (features - self.mean) / self.scale - self.centre
        quad = np.einsum("ij,jk,ik->i", y, self.precision, y)
        return self._log_normaliser - 0.5 * quad

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "centre": self.centre.tolist(), "precision": self.precision.tolist()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianDensity:
        return cls(*(np.asarray(d[k], float) for k in ("mean", "scale", "centre", "precision")))


@dataclass
class ExpertsDensity:
    """Independent experts over column blocks of the features (the walk's energies: a Gaussian mixture; the
    UNet's embedding: a shrunk Gaussian), each expert's score put on a common scale by the median and
    interquartile range of its cross-fitted scores on the normal images, then summed (docs/METHOD.md,
    "Embedding expert"). ``log_density`` returns minus that sum: a score, not a normalised density."""

    blocks: list[tuple[int, int]]
    experts: list[GaussianMixtureDensity | GaussianDensity]
    centres: np.ndarray
    spreads: np.ndarray

    kind = "experts"

    @classmethod
    def fit(cls, features: np.ndarray, blocks: list[tuple[int, int]] | None = None, folds: int = 5,
            **mixture: Any) -> ExpertsDensity:  # fmt: skip
        if not blocks:
            raise ValueError("an experts density needs its column blocks")
        experts: list[GaussianMixtureDensity | GaussianDensity] = []
        centres, spreads = [], []
        for i, (start, stop) in enumerate(blocks):
            kind = GaussianMixtureDensity if i == 0 else GaussianDensity
            part = features[:, start:stop]
            held_out = cross_fitted_scores(part, kind, mixture, folds)
            # an expert whose held-out scores are infinite (a degenerate block) gets a NaN centre, so the
            # whole density scores NaN and choice.py passes its candidate over: expected, not a warning
            with np.errstate(invalid="ignore"):
                q25, q50, q75 = np.percentile(held_out, [25, 50, 75])
            experts.append(kind.fit(part, **mixture))
            centres.append(q50)
            spreads.append(max(q75 - q25, 1e-9))
        return cls([tuple(b) for b in blocks], experts, np.asarray(centres), np.asarray(spreads))  # type: ignore[misc]

    def log_density(self, features: np.ndarray) -> np.ndarray:
        total = np.zeros(len(features))
        for (start, stop), expert, centre, spread in zip(
            self.blocks, self.experts, self.centres, self.spreads, strict=True
        ):
            total += (-expert.log_density(features[:, start:stop]) - centre) / spread
        return -total

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "blocks": [list(b) for b in self.blocks],
            "experts": [e.to_dict() for e in self.experts],
            "centres": self.centres.tolist(),
            "spreads": self.spreads.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertsDensity:
        kinds: dict[str, Any] = {"gmm": GaussianMixtureDensity, "gaussian": GaussianDensity}
        return cls(
            [(int(a), int(b)) for a, b in d["blocks"]],
            [kinds[e["kind"]].from_dict(e) for e in d["experts"]],
            np.asarray(d["centres"], float),
            np.asarray(d["spreads"], float),
        )


Density = GaussianMixtureDensity | KernelDensity1D | DirectScore | GaussianDensity | ExpertsDensity
DensityClass = (
    type[GaussianMixtureDensity]
    | type[KernelDensity1D]
    | type[DirectScore]
    | type[GaussianDensity]
    | type[ExpertsDensity]
)
DENSITY_KINDS: dict[str, DensityClass] = {
    "gmm": GaussianMixtureDensity,
    "kde": KernelDensity1D,
    "direct": DirectScore,
    "gaussian": GaussianDensity,
    "experts": ExpertsDensity,
}


def cross_fitted_scores(
    features: np.ndarray, density_cls: DensityClass, density_kwargs: dict[str, Any], folds: int = 5
) -> np.ndarray:
    """Sorted anomaly scores of the reference images, each from a density fitted on the other folds."""
    held_out = np.empty(len(features))
    splitter = KFold(n_splits=min(folds, len(features)), shuffle=True, random_state=RANDOM_STATE)
    for train_idx, test_idx in splitter.split(features):
        fold_density = density_cls.fit(features[train_idx], **density_kwargs)
        held_out[test_idx] = -fold_density.log_density(features[test_idx])
    return np.sort(held_out)
