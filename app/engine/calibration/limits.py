"""The bounds of what a profile is named, which features it may use and how many false-positive rates it
keeps: plain constants, no numpy or scipy, so the wire schemas (``app.web.schemas``, shared with
``app.client``) and the settings check requests against the same values the calibration code enforces."""

from __future__ import annotations

import re
from typing import Literal, get_args

# Letters, digits, '_', '-', '.', starting with a letter or digit: no path separators, no "..", no hidden
# files, bounded length (names become metric label values and file names).
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}(\.[A-Za-z0-9_-]{1,16})?")

DEFAULT_FPRS = (0.01, 0.05, 0.1)
MAX_FPRS = 32  # every answer carries one threshold per rate: a bounded list keeps answers small

# The feature sets a profile can read from the shared walk (methods/aggregations.py computes each one).
Aggregation = Literal[
    "sum", "per-step", "per-step-centre", "per-step-centre+embedding", "per-step-centre+embedding+spread"
]
# What a new profile may ask for: one of them, or "auto" to choose from its own normal images (choice.py).
ProfileAggregation = Literal["auto", Aggregation]
PROFILE_AGGREGATIONS: tuple[str, ...] = get_args(ProfileAggregation)
