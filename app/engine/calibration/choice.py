"""Choosing a profile's features from its normal images alone (zero-shot: the user has no anomalies).

The candidates are aggregations of the same walk (methods/aggregations.py), richest first. A candidate is
taken when the normal images can support its density: its density, fitted on part of the images, must
judge the images it has not seen as it judges those it was fitted on. The criterion is the generalisation
gap: the median cross-fitted score minus the median in-sample score, in units of the cross-fitted scores'
interquartile range. A density with too many free parameters for the images at hand fits them closely and
scores new normal images much higher (a large gap); it would flag ordinary new images and its thresholds
would swing with every refit. No anomaly, and no image that is not the user's, enters the choice; nor does
any transformation of the images, which would reward features that notice how an image was made rather
than what it shows. How the candidates and the limit were set: docs/ACCURACY.md, "Any normal domain".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.engine.calibration.density import cross_fitted_scores
from app.engine.calibration.fit import MIN_REFERENCE_IMAGES, density_kwargs_for, fit_profile
from app.engine.calibration.profile import Profile, density_for, features_under
from app.engine.types import ImageStats, MethodOptions
from app.errors import InvalidInput

# Richest first; the last is taken when none before it passes.
CANDIDATES: tuple[str, ...] = (
    "per-step-centre+embedding+spread",
    "per-step-centre+embedding",
    "per-step-centre",
)
MAX_GAP = 1.0  # in interquartile ranges of the cross-fitted scores
AUTO = "auto"


@dataclass
class Choice:
    """The options chosen and why: the generalisation gap of each candidate tried, richest first, up to the
    one taken (None: the images cannot give that candidate)."""

    options: MethodOptions
    criterion: str = "generalisation gap (median cross-fitted - median in-sample score, in IQRs) <= 1.0"
    gaps: dict[str, float | None] = field(default_factory=dict)
    # the chosen candidate's cross-fitted scores: the profile's calibration scores, not computed twice
    held_out: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"aggregation": self.options.aggregation, "criterion": self.criterion, "gaps": self.gaps}


def generalisation_gap(options: MethodOptions, features: np.ndarray) -> tuple[float, np.ndarray]:
    """Median cross-fitted score minus median in-sample score, in IQRs of the cross-fitted scores; and the
    (sorted) cross-fitted scores."""
    density_cls = density_for(options)
    kwargs = density_kwargs_for(options, features)
    held_out = cross_fitted_scores(features, density_cls, kwargs)
    in_sample = -density_cls.fit(features, **kwargs).log_density(features)  # type: ignore[arg-type]
    q25, q75 = np.percentile(held_out, [25, 75])
    return float((np.median(held_out) - np.median(in_sample)) / max(q75 - q25, 1e-12)), held_out


def choose_options(
    walk: MethodOptions, stats: Sequence[ImageStats], candidates: Sequence[str] = CANDIDATES
) -> Choice:
    """The first candidate aggregation whose density generalises over these normal images (``MAX_GAP``),
    with the service's walk options; candidates the images cannot give (no UNet embedding) are skipped."""
    if not stats or stats[0].step_grid is None:
        # an engine that measures only its own features (a pass method): nothing to choose from
        return Choice(walk, criterion="the method's own features (nothing else is measured)")
    gaps: dict[str, float | None] = {}
    chosen: MethodOptions | None = None
    held_out = None
    for name in candidates:
        if chosen is not None:
            break
        options = walk.with_profile_options(aggregation=name)
        try:
            features = features_under(options, stats)
        except ValueError:  # e.g. a network without an embedding block
            gaps[name] = None
            continue
        gap, scores = generalisation_gap(options, features)
        gaps[name] = gap
        if gap <= MAX_GAP:
            chosen, held_out = options, scores
    if chosen is None:
        chosen = walk.with_profile_options(aggregation=candidates[-1])
    return Choice(chosen, gaps=gaps, held_out=held_out)


def resolve_options(
    walk: MethodOptions, aggregation: str, stats: Sequence[ImageStats]
) -> tuple[MethodOptions, Choice | None]:
    """A new profile's options: ``aggregation`` when one is named, else (``auto``) the choice made from its
    normal images."""
    if aggregation != AUTO:
        return walk.with_profile_options(aggregation=aggregation), None
    choice = choose_options(walk, stats)
    return choice.options, choice


def calibrate_profile(
    name: str,
    stats: Sequence[ImageStats],
    walk: MethodOptions,
    aggregation: str = AUTO,
    *,
    model_id: str,
    **fit_options: Any,
) -> Profile:
    """A profile from the engine's statistics of normal images: its features named or chosen
    (``resolve_options``), then ``fit_profile`` (thresholds, heat-map statistics, the choice recorded)."""
    if len(stats) < MIN_REFERENCE_IMAGES:
        raise InvalidInput(f"calibration needs at least {MIN_REFERENCE_IMAGES} images, got {len(stats)}")
    options, choice = resolve_options(walk, aggregation, stats)
    return fit_profile(
        name,
        features_under(options, stats),
        model_id=model_id,
        options=options,
        heatmaps=np.stack([s.heatmap for s in stats]),
        selection=None if choice is None else choice.to_dict(),
        calibration_scores=None if choice is None else choice.held_out,
        **fit_options,
    )
