"""Methods are plug-ins: a method registered in one place is scored, calibrated and validated everywhere.

The toy method below is the whole of what a new method takes (app/engine/methods/__init__.py): a class
declaring its name, what it sums along the shared walk, its density and its default shrinkage, then
``register``. It runs on the shipped model through the real Engine, fits a profile, and goes away again.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.commands.common import add_engine_args, settings_from_args
from app.commands.setting_flags import choices
from app.engine.calibration.density import GaussianMixtureDensity
from app.engine.calibration.fit import fit_profile
from app.engine.calibration.store import ProfileStore
from app.engine.engine import Engine
from app.engine.methods import (
    METHODS,
    BatchStats,
    PathMethod,
    density_reg,
    get,
    names,
    register,
    unregister,
)
from app.engine.methods.path_sums import PathAccumulator, stein_error
from app.engine.trajectory import TrajectoryStep
from app.engine.types import MethodOptions
from app.errors import ProfileMismatch
from app.settings import Settings
from tests.helpers import SHIPPED_MODEL, require_data

STEPS = 4
TOY = "toy-stein-energy"


# --- the toy method: one class and one ``register`` call ---------------------------------------------------
class SteinErrorSums(PathAccumulator):
    def __init__(self, x0: torch.Tensor, options: MethodOptions) -> None:
        super().__init__(options.steps)
        self.options = options

    def add_step(self, step: TrajectoryStep) -> None:
        error = stein_error(step, self.options)
        self.add(error, error)


class ToySteinEnergy(PathMethod[SteinErrorSums]):
    """Log energy of the plain Stein error at each step (diffpath-v2 without SSIM weighting)."""

    name = TOY
    density = GaussianMixtureDensity
    walk_key = "toy-stein-error"

    def start_walk(self, x0: torch.Tensor, options: MethodOptions) -> SteinErrorSums:
        return SteinErrorSums(x0, options)

    def features(self, sums: SteinErrorSums, timesteps: list[int], options: MethodOptions) -> BatchStats:
        stats = sums.result(timesteps, "per-step")
        stats.features = stats.features[:, : options.steps]  # the K step energies, not their changes
        return stats

    def default_covariance_reg(self, options: MethodOptions) -> float:
        return 0.5


@pytest.fixture
def toy() -> Iterator[str]:
    register(ToySteinEnergy())
    try:
        yield TOY
    finally:
        unregister(TOY)


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(SHIPPED_MODEL, device="cpu", runtime="torch", options=MethodOptions(steps=STEPS))
    engine.load(warmup_batch=0)
    return engine


@contextmanager
def unet_calls(engine: Engine) -> Iterator[list[int]]:
    """Batch sizes of every UNet forward pass (a hook that only counts; the model computes as always)."""
    calls: list[int] = []
    hook = engine.model.unet.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    try:
        yield calls
    finally:
        hook.remove()


def test_a_registered_method_is_known_everywhere_and_forgotten_after(toy: str) -> None:
    assert names() == (*METHODS, toy) and METHODS == (
        "diffpath-v2",
        "diffpath-6d",
        "diffpath-1d",
        "reconstruction",
    )
    assert Settings(method=toy).method == toy
    # --method has no argparse choices (listing them loads the engine; --help must not): Settings checks it
    assert choices("method") is None
    engine_flags = argparse.ArgumentParser()
    add_engine_args(engine_flags)
    assert settings_from_args(engine_flags.parse_args(["--method", toy])).method == toy
    assert density_reg(MethodOptions(method=toy)) == 0.5
    assert density_reg(MethodOptions(method=toy, covariance_reg=0.2)) == 0.2
    with pytest.raises(ValueError, match="registered already"):
        register(ToySteinEnergy())
    unregister(toy)
    assert toy not in names()
    with pytest.raises(ValidationError, match="unknown method"):
        Settings(method=toy)
    with pytest.raises(ValidationError, match="registered: diffpath-v2"):
        settings_from_args(engine_flags.parse_args(["--method", toy]))
    with pytest.raises(ValueError, match="unknown method"):
        get(toy)


@pytest.mark.slow
def test_a_toy_method_scores_real_images_and_calibrates(toy: str, engine: Engine, tmp_path: Path) -> None:
    celeba = [engine.decode(p.read_bytes()) for p in require_data("celeba", 16)]
    mnist = [engine.decode(p.read_bytes()) for p in require_data("mnist", 4)]
    options = MethodOptions(method=toy, steps=STEPS)
    toy_engine = copy.copy(engine)  # the loaded model under other options (no second load)
    toy_engine.options = options

    with unet_calls(engine) as calls:
        together = engine.image_stats_by_method(celeba, ("diffpath-v2", toy, "diffpath-6d"))
    assert calls == [len(celeba)] * STEPS  # one shared walk for three path methods: K passes, not 3K
    alone = toy_engine.image_stats(celeba)
    for shared, own in zip(together[toy], alone, strict=True):
        assert shared.features.shape == (STEPS,) and np.isfinite(shared.features).all()
        np.testing.assert_allclose(shared.features, own.features, rtol=1e-6)
        assert shared.heatmap.shape == (32, 32)

    features = np.stack([s.features for s in alone[:12]])
    profile = fit_profile("toy", features, model_id=engine.info.model_id, options=options)
    store = ProfileStore(tmp_path, engine.info.model_id, options)
    store.save(profile)
    loaded = store.get("toy")
    assert loaded.density.kind == "gmm" and loaded.options.method == toy
    normal = [v.score for v in loaded.verdicts(alone[12:])]
    digits = [v.score for v in loaded.verdicts(toy_engine.image_stats(mnist))]
    assert None not in normal + digits
    assert np.mean(digits) > np.mean(normal)  # type: ignore[arg-type]

    unregister(toy)  # a profile of a method this build does not have is refused, not misread
    with pytest.raises(ProfileMismatch, match="unknown method"):
        ProfileStore(tmp_path, engine.info.model_id, options).get("toy")
