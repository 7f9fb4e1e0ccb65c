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
    # (B, K, 2 C): the UNet's image embedding at each step, its C channel means then their C spreads over
    # the image (runtimes.py); None when the network has none
    embeddings: torch.Tensor | None = None


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


# Where along the walk the embedding expert reads the UNet's embedding, as fractions of K (steps 2 and 4 of
# 10): low noise, where the network still sees the image's content (docs/METHOD.md, "Embedding expert").
EMBEDDING_STEPS = (0.2, 0.4)


def embedding_steps(steps: int) -> list[int]:
    return sorted({min(steps - 1, round(f * steps)) for f in EMBEDDING_STEPS})


def _embedding_at_steps(bank: PathBank, aggregation: str, spread: bool) -> torch.Tensor:
    if bank.embeddings is None:
        raise ValueError(f"{aggregation} needs a network with an embedding block (runtimes.py)")
    chosen = bank.embeddings[:, embedding_steps(bank.embeddings.shape[1])]
    if not spread:  # the channel means: the first half
        chosen = chosen[..., : chosen.shape[-1] // 2]
    return torch.cat([_per_step_centre(bank), chosen.flatten(1).to(bank.step_grid.dtype)], dim=1)


def _with_embedding(bank: PathBank) -> torch.Tensor:
    return _embedding_at_steps(bank, "per-step-centre+embedding", spread=False)


def _with_embedding_spread(bank: PathBank) -> torch.Tensor:
    return _embedding_at_steps(bank, "per-step-centre+embedding+spread", spread=True)


EMBEDDING_AGGREGATIONS = ("per-step-centre+embedding+spread", "per-step-centre+embedding")


def expert_blocks(aggregation: str, steps: int, n_features: int) -> list[tuple[int, int]] | None:
    """Column ranges scored by separate experts (calibration/density.py ``ExpertsDensity``), or None for
    one density over all features: the energies (2 (2K - 1)) and the embeddings."""
    if aggregation not in EMBEDDING_AGGREGATIONS:
        return None
    energies = 2 * (2 * steps - 1)
    return [(0, energies), (energies, n_features)]


# name -> features (B, D) of a bank. "sum": METHOD.md step 4's six sums over all steps; "per-step": the log
# energy of every step and of every rate of change, 2K - 1 values; "per-step-centre": the same energies of
# the image's centre and of its border, 2 (2K - 1) values; "per-step-centre+embedding": those energies and
# the UNet's embedding (its channel means) at the EMBEDDING_STEPS, scored by two experts
# (``expert_blocks``); "per-step-centre+embedding+spread": the same with the channels' spreads beside their
# means.
AGGREGATIONS: dict[str, Callable[[PathBank], torch.Tensor]] = {
    "sum": _six_sums,
    "per-step": _per_step,
    "per-step-centre": _per_step_centre,
    "per-step-centre+embedding": _with_embedding,
    "per-step-centre+embedding+spread": _with_embedding_spread,
}


def aggregate(bank: PathBank, aggregation: str) -> torch.Tensor:
    try:
        return AGGREGATIONS[aggregation](bank)
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}") from None


def one_d_feature(bank: PathBank) -> torch.Tensor:
    """DiffPath-1D's one value: the root of the summed squared rate of change."""
    return bank.delta_sums[..., 1].sum(dim=1, keepdim=True).sqrt()
