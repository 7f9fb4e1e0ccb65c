"""From scores of normal images to thresholds and verdicts (METHOD.md step 5).

Thresholds are split-conformal quantiles of cross-fitted scores (``density.cross_fitted_scores``): each
reference image is scored by a density fitted without it, so a stated false-positive rate holds on new
normal images instead of being optimistic. A verdict places one score among those calibration scores
(percentile, conformal p-value).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta

from app.engine.calibration.limits import MAX_FPRS
from app.engine.types import Verdict
from app.errors import InvalidInput

FPR_CI_LEVEL = 0.95  # the probability each profile's false-positive-rate interval holds
# a threshold whose true false-positive rate may be over twice the stated one (upper end of its interval)
# is flagged: the reference set is too small for that rate
WIDE_FPR_RATIO = 2.0


def fpr_key(fpr: float) -> str:
    """How a false-positive rate names its threshold in a profile (``0.05`` -> ``"0.05"``)."""
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


def conformal_threshold(sorted_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold that flags at most ``fpr`` of new normal images (split-conformal quantile)."""
    n = len(sorted_scores)
    rank = math.ceil((n + 1) * (1 - fpr))
    if rank > n:
        return float(sorted_scores[-1])
    return float(sorted_scores[rank - 1])


def thresholds_for(sorted_scores: np.ndarray, fprs: tuple[float, ...]) -> dict[str, float]:
    return {fpr_key(f): conformal_threshold(sorted_scores, f) for f in fprs}


def fpr_interval(n: int, fpr: float, level: float = FPR_CI_LEVEL) -> tuple[float, float]:
    """Where the true false-positive rate of the conformal threshold for ``fpr`` lies, with probability
    ``level`` over reference sets of ``n`` images. The threshold is the k-th smallest of n exchangeable
    scores, so the chance that a new normal image exceeds it is Beta(n + 1 - k, k) distributed
    (training-conditional conformal validity): its mean is the stated rate, its spread shrinks as 1/sqrt(n).
    When k > n (fewer images than the rate needs) the threshold is the largest score, k = n."""
    k = min(math.ceil((n + 1) * (1 - fpr)), n)
    tail = (1.0 - level) / 2.0
    a, b = n + 1 - k, k
    return float(beta.ppf(tail, a, b)), float(beta.ppf(1.0 - tail, a, b))


def fpr_intervals_for(n: int, keys: Any) -> dict[str, tuple[float, float]]:
    """``fpr_interval`` for each threshold of a profile, keyed like its thresholds (``"0.05"``)."""
    return {str(key): fpr_interval(n, float(key)) for key in keys}


def wide_intervals(intervals: dict[str, tuple[float, float]], n: int) -> list[str]:
    """A warning for each threshold whose true false-positive rate may exceed ``WIDE_FPR_RATIO`` times the
    stated one. (No "N images suffice": the bound is not monotone in n, the threshold's rank is rounded.)"""
    warnings = []
    for key, (low, high) in sorted(intervals.items(), key=lambda kv: float(kv[0])):
        fpr = float(key)
        if high > WIDE_FPR_RATIO * fpr:
            warnings.append(
                f"threshold at {key}: with {n} reference images its true false-positive rate lies in "
                f"[{low:.4f}, {high:.4f}] ({FPR_CI_LEVEL:.0%}), up to {high / fpr:.1f}x the stated rate; "
                "calibrate on more images for a rate this small"
            )
    return warnings


def verdict(
    score: float, calibration_scores: np.ndarray, thresholds: dict[str, float], default_fpr: float
) -> Verdict:
    """Judge one score against sorted calibration scores; the threshold in force is ``default_fpr``'s."""
    threshold = thresholds[fpr_key(default_fpr)]
    if not math.isfinite(score):
        # not a number the density can judge: flagged, never reported as a number
        return Verdict(None, threshold, True, 100.0, 0.0, dict(thresholds))
    cal = calibration_scores
    below = int(np.searchsorted(cal, score, side="right"))
    percentile = 100.0 * below / len(cal)
    p_value = (1 + len(cal) - below) / (len(cal) + 1)  # conformal: share of normals at least as extreme
    return Verdict(score, threshold, score > threshold, percentile, p_value, dict(thresholds))
