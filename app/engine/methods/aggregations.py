"""Aggregations: how a path method's per-step sums become the feature vector a profile's density reads.

The walk keeps, per image, the power sums of the trajectory quantity q_k and of its rate of change dq_k
(``step_sums`` (K, 3), ``delta_sums`` (K-1, 3)) and their energies on a GRID x GRID grid per channel
(``step_grid`` (K, C, G, G), ``delta_grid`` (K-1, C, G, G)): a :class:`PathBank`. Every aggregation is a
cheap function of the bank, so one walk of an image serves every profile, whatever features each profile
chose (docs/METHOD.md, "Features"). The same function runs on the device for the engine's own options and
on the host for a profile's (``Method.image_features``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GRID = 4  # cells per side of the energy grid; the centre is its middle 2 x 2 (the middle half of each side)
# Smallest energy the per-step features take the log of (a map of exact zeros would give -inf).
ENERGY_FLOOR = 1e-12


@dataclass
class PathBank:
    """A batch's per-step sums (leading axis B): what every aggregation derives its features from."""

    step_sums: torch.Tensor  # (B, K, 3): sum q, sum q^2, sum q^3 per step
    delta_sums: torch.Tensor  # (B, K-1, 3): the same of the rate of change
    step_grid: torch.Tensor  # (B, K, C, G, G): q^2 summed over each grid cell
    delta_grid: torch.Tensor  # (B, K-1, C, G, G)


def _log(energies: torch.Tensor) -> torch.Tensor:
    # energies span orders of magnitude across steps and images; the log makes them near-Gaussian for the
    # mixture (floored so an all-zero map stays finite)
    return energies.clamp_min(ENERGY_FLOOR).log()


def region_energies(grid: torch.Tensor) -> torch.Tensor:
    """(B, S, C, G, G) -> (B, 2 S): centre then border energy of each step (interleaved per step)."""
    centre = grid[..., 1 : GRID - 1, 1 : GRID - 1].sum(dim=(-3, -2, -1))
    total = grid.sum(dim=(-3, -2, -1))
    return torch.stack([centre, total - centre], dim=-1).flatten(1)


def _six_sums(bank: PathBank) -> torch.Tensor:
    return torch.cat([bank.step_sums.sum(dim=1), bank.delta_sums.sum(dim=1)], dim=-1)


def _per_step(bank: PathBank) -> torch.Tensor:
    return _log(torch.cat([bank.step_sums[..., 1], bank.delta_sums[..., 1]], dim=1))


def _per_step_centre(bank: PathBank) -> torch.Tensor:
    return _log(torch.cat([region_energies(bank.step_grid), region_energies(bank.delta_grid)], dim=1))


# name -> features (B, D) of a bank. "sum": METHOD.md step 4's six sums over all steps; "per-step": the log
# energy of every step and of every rate of change, 2K - 1 values; "per-step-centre": the same energies of
# the image's centre and of its border, 2 (2K - 1) values.
AGGREGATIONS: dict[str, Callable[[PathBank], torch.Tensor]] = {
    "sum": _six_sums,
    "per-step": _per_step,
    "per-step-centre": _per_step_centre,
}


def aggregate(bank: PathBank, aggregation: str) -> torch.Tensor:
    try:
        return AGGREGATIONS[aggregation](bank)
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}") from None


def one_d_feature(bank: PathBank) -> torch.Tensor:
    """DiffPath-1D's one value: the root of the summed squared rate of change."""
    return bank.delta_sums[..., 1].sum(dim=1, keepdim=True).sqrt()
