"""What a scoring method declares: its name, its statistics, its density and its defaults.

Two kinds (see ``app.engine.methods`` for how to add one):

- ``PathMethod``: reads its features off the shared trajectory walk. ``start_walk`` returns the method's
  running sums for one batch (anything with ``add_step(step)``); the walk calls ``add_step`` once per
  ``TrajectoryStep`` (x_k, eps_theta, eps*, xhat0, abar; trajectory.py); ``features`` turns the sums into
  ``BatchStats``. Every path method of a batch shares ONE walk: K UNet evaluations per image however many
  path methods are asked for. Methods with equal ``walk_key`` also share ONE set of sums (diffpath-6d and
  diffpath-1d read the same noise path): give two methods the same key only when their ``start_walk``
  builds the same kind of sums; a method summing something new takes a key of its own.
- ``PassMethod``: runs its own passes through the model (``statistics``), e.g. reconstruction.

What leaves the device is ``BatchStats`` (features, per-step sums, a per-pixel heat map); a new per-image
array goes there, in ``ImageStats`` (types.py) and in the engine's host copy (engine.py ``_to_host``,
``_split``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch

from app.engine.calibration.density import DensityClass
from app.engine.methods.aggregations import PathBank, aggregate

if TYPE_CHECKING:
    from app.engine.model.loading import LoadedModel
    from app.engine.trajectory import TrajectoryStep
    from app.engine.types import ImageStats, MethodOptions

# Default shrinkage added to a standardised covariance (MethodOptions.covariance_reg = None).
DEFAULT_COVARIANCE_REG = 1e-4


@dataclass
class BatchStats:
    """Device tensors for a batch of B images (see ImageStats for the per-image meaning)."""

    features: torch.Tensor  # (B, D)
    step_sums: torch.Tensor  # (B, K, 3)
    delta_sums: torch.Tensor  # (B, K-1, 3)
    heatmap: torch.Tensor  # (B, H, W)
    timesteps: list[int]
    # path methods: the per-step grid energies every aggregation reads (aggregations.py); None otherwise
    step_grid: torch.Tensor | None = None  # (B, K, C, G, G)
    delta_grid: torch.Tensor | None = None  # (B, K-1, C, G, G)
    embeddings: torch.Tensor | None = None  # (B, K, E): the UNet's embedding per step (runtimes.py)


class WalkSums(Protocol):
    """A path method's running state over one batch's walk."""

    def add_step(self, step: TrajectoryStep) -> None: ...


SumsT = TypeVar("SumsT", bound=WalkSums)


class Method(ABC):
    """A scoring method: ``name`` (what options, settings and profiles say), ``density`` (the class
    fitted on its features in a profile, calibration/density.py)."""

    name: ClassVar[str]
    density: ClassVar[DensityClass]
    # True when ``features`` is ``options.aggregation`` of the walk's sums and grids (aggregations.py): then a
    # profile may choose its own aggregation and is served from the same walk. A method deriving its
    # features otherwise leaves it False and its profiles must match the service's aggregation.
    aggregated: ClassVar[bool] = False

    def default_covariance_reg(self, options: MethodOptions) -> float:
        """The density's covariance shrinkage when ``options.covariance_reg`` is None."""
        return DEFAULT_COVARIANCE_REG

    def image_features(self, stats: ImageStats, options: MethodOptions) -> np.ndarray:
        """An image's features under ``options`` from what the engine measured (host side): how a profile
        with its own feature options reads an image walked once for every profile. Default: the features
        the engine computed."""
        return stats.features


class PathMethod(Method, Generic[SumsT]):
    """A method whose features are sums along the shared trajectory walk."""

    walk_key: ClassVar[str]  # methods with equal keys share one ``start_walk`` result per batch

    def image_features(self, stats: ImageStats, options: MethodOptions) -> np.ndarray:
        """The aggregation ``options.aggregation`` of the image's sums and grids (aggregations.py), in float64
        on the host."""
        if not self.aggregated or stats.aggregation == options.aggregation or stats.step_grid is None:
            return stats.features
        return aggregate(_bank_of(stats), options.aggregation)[0].numpy()

    @abstractmethod
    def start_walk(self, x0: torch.Tensor, options: MethodOptions) -> SumsT:
        """Empty running sums for a batch x0 (B, C, H, W) in [-1, 1]."""

    @abstractmethod
    def features(self, sums: SumsT, timesteps: list[int], options: MethodOptions) -> BatchStats:
        """The batch's statistics once the walk has passed every step through ``sums.add_step``."""


class PassMethod(Method):
    """A method that runs its own passes through the model instead of reading the shared walk."""

    @abstractmethod
    def statistics(
        self, model: LoadedModel, x0: torch.Tensor, options: MethodOptions, digests: list[bytes] | None
    ) -> BatchStats:
        """Statistics for a batch x0 (B, C, H, W) in [-1, 1]; ``digests`` seed content-derived noise."""


def _bank_of(stats: ImageStats) -> PathBank:
    """One image's host arrays as a batch of one (float64, as the host copy keeps them)."""
    assert stats.step_grid is not None and stats.delta_grid is not None
    arrays = [stats.step_sums, stats.delta_sums, stats.step_grid, stats.delta_grid, stats.embeddings]
    return PathBank(*(None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))[None]
                      for a in arrays))  # type: ignore[arg-type]  # fmt: skip
