"""DiffPath's own trajectory (``trajectory = "diffpath"``) against the numbers DiffPath's code computed.

The fixture ``../shared/checkpoints/improved-diffusion/tiny_reference.pt`` holds a ddim10 reverse loop of the
original code on two images: the raw model epsilons it saw, the epsilons it collected (clipped x0 estimate,
epsilon re-derived) and DiffPath's 12 path statistics. A replay runtime answers the recorded raw epsilon at
each step, so the trajectory maths and the statistics are checked independently of any importer; the
end-to-end test imports ``tiny.pt`` and computes everything with the real network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.calibration.fit import fit_profile
from app.engine.calibration.profile import Profile
from app.engine.model.loading import LoadedModel
from app.engine.model.schedule import float64_alphas_cumprod, recipe_alphas_cumprod
from app.engine.trajectory import (
    diffpath_schedule,
    diffpath_timesteps,
    model_alphas_cumprod_float64,
    trajectory_grid,
    walk,
)
from app.engine.types import MethodOptions, ModelInfo
from app.engine.walk_driver import path_statistics
from app.errors import ProfileMismatch
from tests.helpers import missing

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "checkpoints" / "improved-diffusion"
REFERENCE = FIXTURES / "tiny_reference.pt"
COSINE_4000 = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 4000,
    "beta_schedule": "squaredcos_cap_v2",
}
# DiffPath's statistic names in the order of our six sums: sum q, q^2, q^3, then the same of dq = diff(q) * K
STAT_NAMES = ("eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt", "deps_dt_sq", "deps_dt_cb")


@pytest.fixture(scope="module")
def ref() -> dict:
    if not REFERENCE.is_file():
        missing(f"checkpoint fixture {REFERENCE} not present")
    return torch.load(REFERENCE, weights_only=True)


class ReplayRuntime:
    """A NoiseRuntime that answers, at its k-th call, the raw epsilon the original model gave at step k."""

    name = "replay"

    def __init__(self, eps: torch.Tensor) -> None:
        self.eps = eps  # (K, B, C, H, W)
        self.calls: list[list[int]] = []

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        k = len(self.calls)
        self.calls.append(timesteps.tolist())
        return self.eps[k].clone()


def replay_model(tmp_path: Path, ref: dict, scheduler: dict | None = COSINE_4000) -> LoadedModel:
    """A LoadedModel whose 'network' replays the fixture, with the float64 schedule the loader reads from
    the scheduler config ``scheduler`` (None: no config)."""
    abar = ref["alphas_cumprod_4000_cosine"]
    info = ModelInfo(
        model_id=f"replay@{tmp_path.name}",
        name="replay",
        path=str(tmp_path),
        sample_size=32,
        in_channels=3,
        parameters=0,
        num_train_timesteps=len(abar),
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        scheduler_class="DDPMScheduler",
        weights_sha256=tmp_path.name,
        device="cpu",
        dtype="float32",
        runtime="replay",
    )
    return LoadedModel(
        unet=None,  # type: ignore[arg-type]  # the replay runtime stands in for the network
        alphas_cumprod=abar.float(),
        device=torch.device("cpu"),
        autocast_dtype=None,
        info=info,
        runtime=ReplayRuntime(ref["traj_model_eps_raw"]),
        recipe_alphas_cumprod64=recipe_alphas_cumprod(scheduler, abar.float()),
    )


def test_grid_is_improved_diffusions_ddim_respacing(ref: dict) -> None:
    assert diffpath_timesteps(4000, 10) == ref["ddim10_timestep_map"].tolist() == list(range(0, 4000, 400))
    assert diffpath_timesteps(1000, 10) == list(range(0, 1000, 100))
    assert diffpath_timesteps(1000, 3) == [0, 334, 668]  # the smallest stride giving exactly 3
    assert diffpath_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="integer stride"):
        diffpath_timesteps(10, 6)  # strides 1 and 2 give 10 and 5 steps: none gives 6
    with pytest.raises(ValueError):
        diffpath_timesteps(1000, 1)
    assert trajectory_grid("ddim", 1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    with pytest.raises(ValueError, match="own grid"):
        trajectory_grid("diffpath", 1000, 10, t_max_fraction=0.5)
    with pytest.raises(ValueError, match="unknown trajectory"):
        trajectory_grid("sideways", 1000, 10)


def test_float64_schedule_is_improved_diffusions(ref: dict) -> None:
    abar64 = float64_alphas_cumprod(COSINE_4000)
    assert abar64 is not None and np.array_equal(abar64, ref["alphas_cumprod_4000_cosine"].numpy())
    # trained betas (what an importer may write) are taken as float64 too
    betas = 1 - ref["alphas_cumprod_4000_cosine"].numpy()[:3]
    trained = float64_alphas_cumprod({"num_train_timesteps": 3, "trained_betas": betas.tolist()})
    assert trained is not None and np.array_equal(trained, np.cumprod(1.0 - betas))
    linear = float64_alphas_cumprod({"num_train_timesteps": 5, "beta_start": 0.1, "beta_end": 0.5})
    assert linear is not None and np.array_equal(linear, np.cumprod(1.0 - np.linspace(0.1, 0.5, 5)))
    assert float64_alphas_cumprod({"beta_schedule": "sigmoid"}) is None
    # respaced over the ddim10 grid exactly as SpacedDiffusion does (float64, bit for bit)
    schedule = diffpath_schedule(abar64, diffpath_timesteps(4000, 10))
    respaced = ref["ddim10_alphas_cumprod"].numpy()
    assert [float(a) for a in schedule.abar] == [float(np.float32(a)) for a in respaced]
    expected = np.sqrt(1.0 / respaced - 1).astype(np.float32)
    assert [float(c) for c in schedule.sqrt_recipm1] == expected.tolist()
    assert float(schedule.sqrt_abar_next[-1]) == 0.0 and float(schedule.sqrt_one_minus_abar_next[-1]) == 1.0


def test_replayed_walk_matches_the_original_to_float32_rounding(tmp_path: Path, ref: dict) -> None:
    """Bit for bit on a CPU that rounds as the reference's did; other CPUs' vector units fuse the float32
    steps differently and move the last bit (1 ulp from step 2, 1.1e-6 at step 9 measured on an AMD EPYC):
    within 2e-6, far below the 1e-5 that a float32 schedule would miss by (the test below)."""
    model = replay_model(tmp_path, ref)
    x0 = ref["traj_x0"]
    timesteps = trajectory_grid("diffpath", 4000, 10)
    steps = list(walk(model, x0, timesteps, "diffpath"))
    runtime = model.runtime
    assert isinstance(runtime, ReplayRuntime)
    # the network is asked at schedule indices 0, 400, ...; the runtime maps them to its own time (t/4)
    assert runtime.calls == [[t, t] for t in range(0, 4000, 400)]
    for k, step in enumerate(steps):
        expected_x = x0 if k == 0 else ref["traj_xt_clip"][k - 1]
        torch.testing.assert_close(step.x_t, expected_x, rtol=0, atol=2e-6, msg=f"x_t at step {k}")
        torch.testing.assert_close(
            step.eps_k, ref["traj_eps_clip"][k], rtol=0, atol=2e-6, msg=f"eps at step {k}"
        )
        assert step.xhat0.abs().max() <= 1.0
    # the clipping matters: where x0 hat was clipped, the collected epsilon is not the model's
    assert not torch.equal(ref["traj_eps_clip"], ref["traj_eps_noclip"])


def test_float32_schedule_would_miss_the_reference(tmp_path: Path, ref: dict) -> None:
    """NOTES.md pitfall 12: coefficients from a float32 abar move epsilon at t = 0 (why float64 matters)."""
    model = replay_model(tmp_path, ref, scheduler=None)  # no config: the float32 schedule is all there is
    first = next(walk(model, ref["traj_x0"], trajectory_grid("diffpath", 4000, 10), "diffpath"))
    error = (first.eps_k - ref["traj_eps_clip"][0]).abs().max().item()
    assert error > 1e-5


def diffpath_6d_sums(model: LoadedModel, x0: torch.Tensor) -> np.ndarray:
    options = MethodOptions(method="diffpath-6d", aggregation="sum", trajectory="diffpath")
    with torch.inference_mode():
        stats = path_statistics(model, x0, options)["diffpath-6d"]
    return stats.features.double().numpy()


def reference_sums(ref: dict) -> np.ndarray:
    stats = ref["diffpath_stats_clip"]
    return torch.stack([stats[name] for name in STAT_NAMES], dim=1).numpy()


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


def test_replayed_diffpath_6d_sums_are_diffpaths_statistics(tmp_path: Path, ref: dict) -> None:
    ours = diffpath_6d_sums(replay_model(tmp_path, ref), ref["traj_x0"])
    assert ours.shape == (2, 6)
    assert relative_error(ours, reference_sums(ref)) <= 1e-4
    # the other six of DiffPath's twelve follow from the same walk's sums
    stats = ref["diffpath_stats_clip"]
    assert np.allclose(np.sqrt(ours[:, 1]), stats["eps_sum_sq_sqrt"].numpy(), rtol=1e-4)
    assert np.allclose(np.cbrt(ours[:, 5]), stats["deps_dt_cb_cbrt"].numpy(), rtol=1e-4)


def test_every_method_runs_on_the_diffpath_trajectory(tmp_path: Path, ref: dict) -> None:
    # default per-step-centre features: centre and border energy of K steps and K - 1 rates of change
    for method, width in (("diffpath-v2", 38), ("diffpath-6d", 38), ("diffpath-1d", 1)):
        model = replay_model(tmp_path / method, ref)
        options = MethodOptions(method=method, trajectory="diffpath")  # type: ignore[arg-type]
        with torch.inference_mode():
            stats = path_statistics(model, ref["traj_x0"], options)[method]
        assert stats.features.shape == (2, width) and torch.isfinite(stats.features).all()
        assert stats.timesteps == list(range(0, 4000, 400)) and stats.heatmap.shape == (2, 32, 32)


def test_profiles_are_bound_to_their_trajectory(tmp_path: Path) -> None:
    features = np.random.default_rng(0).normal(size=(40, 6))
    ddim = MethodOptions(method="diffpath-6d", aggregation="sum")
    diffpath = MethodOptions(method="diffpath-6d", aggregation="sum", trajectory="diffpath")
    profile = fit_profile("p", features, model_id="m", options=ddim)
    path = profile.save(tmp_path / "p.json")
    assert json.loads(path.read_text())["options"]["trajectory"] == "ddim"
    with pytest.raises(ProfileMismatch, match="trajectory"):
        Profile.load(path, "m", diffpath)
    assert Profile.load(path, "m", ddim).options.trajectory == "ddim"


def test_the_setting_and_the_flag_select_the_trajectory() -> None:
    import argparse

    from app.bootstrap import options_from_settings
    from app.commands.common import add_engine_args, settings_from_args
    from app.settings import Settings

    assert options_from_settings(Settings()).trajectory == "ddim"
    assert options_from_settings(Settings(trajectory="diffpath")).trajectory == "diffpath"
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--trajectory", "diffpath", "--method", "diffpath-6d", "--aggregation", "sum"])
    options = options_from_settings(settings_from_args(args))
    assert (options.trajectory, options.method, options.aggregation) == ("diffpath", "diffpath-6d", "sum")


# --- end to end: the imported tiny checkpoint, the project's loader, both runtimes ----------------------
@pytest.fixture(scope="module")
def imported_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.engine.model.importers.improved_diffusion import import_checkpoint, read_flags

    if not (FIXTURES / "tiny.pt").is_file():
        missing(f"checkpoint fixture {FIXTURES / 'tiny.pt'} not present")
    out = tmp_path_factory.mktemp("imported") / "tiny-diffpath"
    import_checkpoint(FIXTURES / "tiny.pt", read_flags(FIXTURES / "tiny_flags.json"), out)
    return out


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_imported_tiny_model_gives_diffpaths_statistics(imported_tiny: Path, ref: dict, runtime: str) -> None:
    """import -> the project's loader -> diffpath-6d, six sums, DiffPath's trajectory = DiffPath's numbers.

    The converted network matches the original to float rounding (here 5e-6-1e-5 on the raw epsilon), so
    the path is close, not bit-equal. Four of the six sums then agree to 5e-6. The two sums of the rate of
    change, deps_dt = K * (sum eps_K-1 - sum eps_0) and its cubes, are DiffPath's ill-conditioned ones: at
    t = 0 the re-derived epsilon divides a float32 rounding of x0 hat by sqrt(1/abar - 1) = 0.0031, which
    turns a 1e-6 change of the raw epsilon into up to 2e-5 per pixel. Measured: ONNX Runtime (the CPU
    default) 7.8e-5 relative, torch (channels_last convolutions) 2.7e-4, torch with NCHW weights 5.4e-5;
    the replay above, where the raw epsilon is the original's, 4.4e-7; 4e-6 of noise on the replayed raw
    epsilon alone moves deps_dt by up to 1.2e-4. So those two are held to 1e-3, the others to 1e-4.
    """
    from app.engine.model.loading import load_model

    model = load_model(imported_tiny, device="cpu", runtime=runtime)
    abar64 = ref["alphas_cumprod_4000_cosine"].numpy()
    assert np.array_equal(model_alphas_cumprod_float64(model), abar64)
    x0 = ref["traj_x0"]
    with torch.inference_mode():
        steps = list(walk(model, x0, trajectory_grid("diffpath", 4000, 10), "diffpath"))
        ours = diffpath_6d_sums(model, x0)
    eps = torch.stack([s.eps_k for s in steps])
    assert (eps - ref["traj_eps_clip"]).abs().max().item() < 1e-4
    theirs = reference_sums(ref)
    errors = dict(zip(STAT_NAMES, np.max(np.abs(ours - theirs) / np.abs(theirs), axis=0), strict=True))
    assert all(errors[name] <= 1e-4 for name in ("eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt_sq")), errors
    assert errors["deps_dt"] <= 1e-3 and errors["deps_dt_cb"] <= 1e-3, errors


def test_the_loader_reads_the_float64_schedule_and_the_walk_reads_no_file(tmp_path: Path) -> None:
    import shutil

    from app.engine.model.loading import load_model
    from tests.helpers import make_tiny_model

    folder = make_tiny_model(tmp_path / "plain")  # diffusers' linear schedule, T = 100
    model = load_model(folder, device="cpu", dtype="float32", runtime="torch")
    exact = np.cumprod(1.0 - np.linspace(0.0001, 0.02, 100))
    assert np.array_equal(model_alphas_cumprod_float64(model), exact)
    # not the float32 schedule widened: diffusers rounds its betas to float32
    assert not np.array_equal(exact, model.alphas_cumprod.double().numpy())
    shutil.rmtree(folder)  # everything the walk needs was read at load time
    x0 = torch.zeros(1, 3, 16, 16)
    with torch.inference_mode():
        steps = list(walk(model, x0, trajectory_grid("diffpath", 100, 5), "diffpath"))
    respaced = diffpath_schedule(exact, trajectory_grid("diffpath", 100, 5))
    assert [float(s.abar) for s in steps] == [float(a) for a in respaced.abar]
