"""Fit a calibration profile on the features of normal images: the method's density (from the method
registry, ``app.engine.methods``) on all of them, thresholds from cross-fitted scores (thresholds.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.engine.calibration.density import cross_fitted_scores
from app.engine.calibration.heatmap import fit_heatmap_calibration
from app.engine.calibration.limits import DEFAULT_FPRS
from app.engine.calibration.profile import Profile, density_for
from app.engine.calibration.thresholds import (
    fpr_intervals_for,
    fpr_key,
    thresholds_for,
    validate_fprs,
)
from app.engine.methods import density_reg
from app.engine.methods.aggregations import expert_blocks
from app.engine.types import MethodOptions
from app.errors import InvalidInput

MIN_REFERENCE_IMAGES = 10


def density_kwargs_for(options: MethodOptions, features: np.ndarray) -> dict[str, Any]:
    """What the density of ``options`` is fitted with (``density_for`` names its class)."""
    kwargs: dict[str, Any] = {
        "max_components": options.mixture_max_components,
        "covariance_type": options.covariance_type,
        "reg_covar": density_reg(options),
    }
    blocks = expert_blocks(options.aggregation, options.steps, features.shape[1])
    if blocks is not None:
        kwargs["blocks"] = blocks
    return kwargs


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
    heatmaps: np.ndarray | None = None,
    selection: dict[str, Any] | None = None,
    calibration_scores: np.ndarray | None = None,
) -> Profile:
    """Fit the method's density on normal-image features (N, D).

    Thresholds come from cross-fitted scores: each reference image is scored by a density fitted without
    it, so the stated false-positive rates hold on new normal images instead of being optimistic. The
    density kept in the profile is then fitted on all N. ``heatmaps`` (N, H, W), the same images' raw
    heat maps, give the profile its per-pixel heat-map statistics (calibration/heatmap.py).
    ``calibration_scores``: the cross-fitted scores when the caller has them already (calibration/choice.py
    computes them to choose the features).
    """
    features = np.asarray(features, dtype=float)
    if features.ndim != 2 or len(features) < MIN_REFERENCE_IMAGES:
        raise InvalidInput(f"calibration needs at least {MIN_REFERENCE_IMAGES} images, got {len(features)}")
    if not np.isfinite(features).all():
        raise InvalidInput("some reference images gave non-finite features")
    fprs = validate_fprs(fprs, default_fpr)
    density_cls = density_for(options)
    density_kwargs = density_kwargs_for(options, features)
    if calibration_scores is None or len(calibration_scores) != len(features):
        calibration_scores = cross_fitted_scores(features, density_cls, density_kwargs, folds)
    scores = np.sort(calibration_scores)
    return Profile(
        name=name,
        model_id=model_id,
        options=options,
        density=density_cls.fit(features, **density_kwargs),
        calibration_scores=scores,
        thresholds=thresholds_for(scores, fprs),
        default_fpr=default_fpr,
        n_reference=len(features),
        source=source,
        heatmap=None if heatmaps is None else fit_heatmap_calibration(heatmaps, fpr=default_fpr),
        selection=selection,
        fpr_intervals=fpr_intervals_for(len(scores), (fpr_key(f) for f in fprs)),
    )
