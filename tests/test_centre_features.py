"""The per-step-centre aggregation (the default): per-step energies of the image's centre and border."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.engine.calibration.store import ProfileStore
from app.engine.methods import density_reg
from app.engine.methods.path_sums import PathAccumulator, centre_border_energy
from app.engine.types import MethodOptions
from app.errors import ProfileMismatch
from tests.helpers import SHIPPED_MODEL


def test_centre_is_the_middle_half_of_each_side_and_the_border_the_rest():
    q = torch.zeros(2, 3, 8, 8)
    q[0, :, 2:6, 2:6] = 1.0  # exactly the centre: 3 channels x 16 pixels
    q[1, 1, 0, 0] = 2.0  # a corner pixel
    q[1, 0, 4, 5] = -3.0  # inside the centre
    energy = centre_border_energy(q)
    torch.testing.assert_close(energy, torch.tensor([[48.0, 0.0], [9.0, 4.0]]))
    # the two regions add up to the whole map's energy
    torch.testing.assert_close(energy.sum(1), q.pow(2).flatten(1).sum(1))


def test_per_step_centre_features_are_log_region_energies_of_steps_then_rates():
    steps = 3
    maps = [torch.randn(2, 3, 12, 12) for _ in range(steps)]
    acc = PathAccumulator(steps, regions=True)
    plain = PathAccumulator(steps)
    for q in maps:
        acc.add(q, q)
        plain.add(q, q)
    features = acc.result([0, 1, 2], "per-step-centre").features
    assert features.shape == (2, 2 * (2 * steps - 1))
    torch.testing.assert_close(features[:, 2:4], centre_border_energy(maps[1]).log())
    torch.testing.assert_close(features[:, -2:], centre_border_energy((maps[2] - maps[1]) * steps).log())
    # centre + border of each step and rate is today's per-step energy, which tracking regions leaves alone
    per_step = plain.result([0, 1, 2], "per-step").features
    torch.testing.assert_close(features.exp().reshape(2, -1, 2).sum(-1).log(), per_step)
    torch.testing.assert_close(acc.result([0, 1, 2], "per-step").features, per_step)
    # every accumulator keeps the grid: any aggregation can be read from any walk
    torch.testing.assert_close(plain.result([0, 1, 2], "per-step-centre").features, features)
    with pytest.raises(ValueError, match="unknown aggregation"):
        plain.result([0, 1, 2], "per-step-corner")


def test_the_default_is_per_step_centre_and_profiles_keep_their_own_features(tmp_path: Path):
    shipped = json.loads((SHIPPED_MODEL / "profiles" / "default.json").read_text())
    assert MethodOptions().aggregation == "per-step-centre" == shipped["options"]["aggregation"]
    assert density_reg(MethodOptions()) == 0.1
    # a profile fitted on the whole-image per-step energies (the default before) loads under its own
    # options, and a service with the new default serves it with those, not with the service's features
    old = {**shipped, "options": {**shipped["options"], "aggregation": "per-step"}}
    (tmp_path / "before.json").write_text(json.dumps(old))
    per_step = MethodOptions(aggregation="per-step")
    assert ProfileStore(tmp_path, shipped["model_id"], per_step).get("before").options == per_step
    assert ProfileStore(tmp_path, shipped["model_id"], MethodOptions()).get("before").options == per_step
    # but a profile of another walk (here K = 20) is refused, never scored with features of another walk
    other_walk = {**shipped, "options": {**shipped["options"], "steps": 20}}
    (tmp_path / "k20.json").write_text(json.dumps(other_walk))
    with pytest.raises(ProfileMismatch, match="method options"):
        ProfileStore(tmp_path, shipped["model_id"], MethodOptions()).get("k20")
