"""What ``ScoringService`` answers: typed results the routes shape into their protocol's schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.engine.calibration.profile import Profile
from app.engine.types import ImageStats, MethodOptions, ModelInfo, Verdict

State = Literal["loading", "ready", "failed", "draining", "stopped"]


@dataclass
class ImageResult:
    id: str
    verdict: Verdict
    stats: ImageStats
    heatmap_png: bytes | None = None
    # the map on the profile's scale (``HeatmapCalibration.apply``; without heat-map statistics the raw
    # map), when asked for; the PNG is drawn from this same array
    heatmap: np.ndarray | None = None


@dataclass(frozen=True)
class ScoreTimings:
    """Seconds spent on one request, and the model batches its images took part in."""

    decode_s: float
    queue_s: float
    compute_s: float
    total_s: float
    batches: int


@dataclass
class ScoreOutcome:
    results: list[ImageResult]
    profile: Profile
    model: ModelInfo
    options: MethodOptions
    timings: ScoreTimings

    @property
    def heatmap_threshold(self) -> float | None:
        """The calibrated value a map is hot at (the profile's ``hot``); None without heat-map statistics."""
        return None if self.profile.heatmap is None else self.profile.heatmap.hot


@dataclass(frozen=True)
class RefusedProfile:
    """A profile on disk the loaded model cannot use, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class ModelDescription:
    """The loaded base model, the method options every profile must match, and the profiles."""

    info: ModelInfo
    options: MethodOptions
    default_profile: str
    profiles: list[Profile]
    refused_profiles: list[RefusedProfile]


@dataclass(frozen=True)
class ModelStatus:
    """The service's state and, once the model is loaded, what it is (also while draining)."""

    state: State
    ready: bool  # taking new work
    info: ModelInfo | None  # None until the model is loaded

    @property
    def model_id(self) -> str | None:
        return None if self.info is None else self.info.model_id
