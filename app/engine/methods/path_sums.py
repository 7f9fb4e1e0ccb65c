"""Building blocks of the path methods: power sums of a per-step quantity and of its rate of change.

Everything stays on the model's device and in the batch; sums are accumulated per step so memory does not
grow with K, and the only device->host copy happens once per batch, after the walk (engine.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from app.engine.methods.aggregations import GRID, PathBank, aggregate, one_d_feature, region_energies
from app.engine.methods.base import BatchStats

if TYPE_CHECKING:
    from app.engine.trajectory import TrajectoryStep
    from app.engine.types import MethodOptions

# The heat map averages the steps whose signal fraction abar lies in this range: at low noise the model
# reproduces almost any patch, near pure noise its error covers the whole image; a pasted patch stands out
# in between (pixel AUROC 0.93 against 0.90 with every step: docs/ACCURACY.md, benchmarks/heatmap_eval.py).
HEAT_NOISE_RANGE = (0.01, 0.65)


def power_sums(q: torch.Tensor, squared: torch.Tensor | None = None) -> torch.Tensor:
    """(B, ...) -> (B, 3): sum q, sum q^2, sum q^3 over everything but the batch axis. ``squared``: q^2
    when the caller has it already (the region energies need it too)."""
    flat = q.flatten(1)
    squares = flat.pow(2) if squared is None else squared.flatten(1)
    return torch.stack([flat.sum(1), squares.sum(1), flat.pow(3).sum(1)], dim=-1)


def stein_error(step: TrajectoryStep, options: MethodOptions) -> torch.Tensor:
    """e_k = eps_theta(x_k, t_k) - eps*_k, optionally divided by sigma_k (score units)."""
    error = step.eps_theta - step.eps_star
    if options.sigma_scaling:
        error = error / (1 - step.abar).sqrt()
    return error


def centre_border_energy(q: torch.Tensor, squared: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2): sum of q^2 over the centre (the middle half of each side, a quarter of the
    pixels) and over the border around it. Aligned faces put the face in the centre and background, hair
    and shoulders in the border; where the error sits separates faces from photos that are not faces
    (ACCURACY.md: CelebA vs CIFAR-10 0.961 against 0.952 with one energy per step, development split)."""
    return region_energies(grid_energy(q.pow(2) if squared is None else squared)[:, None])


def grid_energy(squared: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) squared map -> (B, C, GRID, GRID): its sum over each cell of a GRID x GRID grid (rows and
    columns split as evenly as ``torch.tensor_split`` does). Every aggregation derives from these cells and
    the power sums, so one walk serves profiles with different features (aggregations.py)."""
    b, c, h, w = squared.shape
    if h % GRID == 0 and w % GRID == 0:
        return squared.reshape(b, c, GRID, h // GRID, GRID, w // GRID).sum(dim=(3, 5))
    rows = torch.tensor_split(squared, GRID, dim=2)
    return torch.stack(
        [
            torch.stack([cell.sum(dim=(2, 3)) for cell in torch.tensor_split(r, GRID, dim=3)], -1)
            for r in rows
        ],
        dim=-2,
    )


class PathAccumulator:
    """Running per-step power sums of a trajectory quantity q_k and of dq_k = (q_{k+1} - q_k) * K, and the
    energy of both on a GRID x GRID grid per channel (what every aggregation reads; aggregations.py)."""

    def __init__(self, steps: int, regions: bool = True) -> None:
        # ``regions`` is accepted for callers written before the grid was always kept; the grid costs one
        # pooling of q^2 per step, nothing beside the UNet
        self.steps = steps
        self.step_sums: list[torch.Tensor] = []
        self.delta_sums: list[torch.Tensor] = []
        self.step_grid: list[torch.Tensor] = []
        self.delta_grid: list[torch.Tensor] = []
        self.heat: torch.Tensor | None = None
        self.heat_all: torch.Tensor | None = None  # every step: the map when no step is in the range
        self.heat_steps: torch.Tensor | None = None  # how many steps the heat map holds (0-d)
        self.embeddings: list[torch.Tensor] = []
        self._previous: torch.Tensor | None = None

    def keep_embedding(self, embedding: torch.Tensor | None) -> None:
        """The step's UNet embedding (B, E), when the runtime gives one: the embedding expert reads it."""
        if embedding is not None:
            self.embeddings.append(embedding)

    def add(self, q: torch.Tensor, heat_source: torch.Tensor, abar: torch.Tensor | None = None) -> None:
        """One step: q's power sums, and |heat_source| into the heat map when the step's ``abar`` is in
        HEAT_NOISE_RANGE (every step when None). Masked on the device: no host sync inside the walk."""
        self.step_sums.append(self._sums(q, self.step_grid))
        if self._previous is not None:
            self.delta_sums.append(self._sums((q - self._previous) * self.steps, self.delta_grid))
        self._previous = q
        heat = heat_source.abs().mean(dim=1)
        inside = torch.ones((), dtype=heat.dtype, device=heat.device)
        if abar is not None:
            inside = ((abar >= HEAT_NOISE_RANGE[0]) & (abar <= HEAT_NOISE_RANGE[1])).to(heat.dtype)
        self.heat_all = heat if self.heat_all is None else self.heat_all + heat
        self.heat = heat * inside if self.heat is None else self.heat + heat * inside
        self.heat_steps = inside if self.heat_steps is None else self.heat_steps + inside

    def _sums(self, q: torch.Tensor, grid: list[torch.Tensor]) -> torch.Tensor:
        """q's power sums, and its grid energies into ``grid``, from one q^2."""
        squared = q.pow(2)
        grid.append(grid_energy(squared))
        return power_sums(q, squared)

    def result(self, timesteps: list[int], aggregation: str = "sum", one_d: bool = False) -> BatchStats:
        """The accumulated sums and grids, and the features of ``aggregation`` (aggregations.py; ``one_d``:
        DiffPath-1D's one value)."""
        steps = torch.stack(self.step_sums, dim=1)
        deltas = torch.stack(self.delta_sums, dim=1)
        step_grid = torch.stack(self.step_grid, dim=1)
        delta_grid = torch.stack(self.delta_grid, dim=1)
        embeddings = (
            torch.stack(self.embeddings, dim=1) if len(self.embeddings) == len(self.step_sums) else None
        )
        bank = PathBank(steps, deltas, step_grid, delta_grid, embeddings)
        features = one_d_feature(bank) if one_d else aggregate(bank, aggregation)
        assert self.heat is not None and self.heat_all is not None and self.heat_steps is not None
        heat = torch.where(
            self.heat_steps > 0,
            self.heat / self.heat_steps.clamp_min(1),
            self.heat_all / len(self.step_sums),
        )
        return BatchStats(features, steps, deltas, heat, timesteps, step_grid, delta_grid, embeddings)


def path_covariance_reg(options: MethodOptions) -> float:
    """Shrinkage of the path methods' mixtures: 19 per-step energies from a few dozen images give a
    near-singular covariance whose scores blow up and swing with float rounding, and 0.1 detects as well or
    better at every calibration size measured; the six sums lose a little with it, so they keep 1e-4
    (ACCURACY.md)."""
    return 1e-4 if options.aggregation == "sum" else 0.1
