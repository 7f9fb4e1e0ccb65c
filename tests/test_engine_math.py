"""Each formula of METHOD.md on tiny tensors where the answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_msssim import ssim as library_ssim

from app.engine.methods.diffpath_v2 import amplified_error
from app.engine.methods.path_sums import PathAccumulator, power_sums, stein_error
from app.engine.model.schedule import alphas_cumprod_from_config
from app.engine.preprocessing import prepare
from app.engine.ssim import ssim_map
from app.engine.trajectory import TrajectoryStep, ddim_step, implied_noise, predict_x0, trajectory_timesteps
from app.engine.types import MethodOptions


def scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_trajectory_timesteps_start_at_zero_and_cover_the_range() -> None:
    assert trajectory_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert trajectory_timesteps(1000, 2, t_max_fraction=0.5) == [0, 500]
    with pytest.raises(ValueError):
        trajectory_timesteps(1000, 1)


def test_ddim_inversion_step_by_hand() -> None:
    # abar = 0.64 -> sqrt 0.8, sigma 0.6; abar_next = 0.36 -> sqrt 0.6, sigma 0.8
    x_t = torch.tensor([[[[0.5, 1.4]]]])
    eps = torch.tensor([[[[0.25, -0.5]]]])
    xhat0, eps_k, x_next = ddim_step(x_t, eps, scalar(0.64), scalar(0.36))
    # pixel 0: (0.5 - 0.15) / 0.8 = 0.4375 (inside [-1, 1]); pixel 1: (1.4 + 0.3) / 0.8 = 2.125 -> 1
    assert xhat0.flatten().tolist() == pytest.approx([0.4375, 1.0])
    # re-derived noise: pixel 0 unchanged (no clipping); pixel 1: (1.4 - 0.8) / 0.6 = 1.0
    assert eps_k.flatten().tolist() == pytest.approx([0.25, 1.0])
    assert x_next.flatten().tolist() == pytest.approx([0.6 * 0.4375 + 0.8 * 0.25, 0.6 * 1.0 + 0.8 * 1.0])


def test_implied_noise_recovers_the_noise_that_was_added() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    z = torch.randn(2, 3, 4, 4, generator=gen)
    abar = scalar(0.3)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * z
    assert torch.allclose(implied_noise(x_t, x0, abar), z, atol=1e-5)
    assert torch.allclose(predict_x0(x_t, z, abar), x0.clamp(-1, 1), atol=1e-5)


def test_ssim_map_is_one_for_identical_images_and_matches_the_closed_form_for_constants() -> None:
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    a, b = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), -0.25)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.5 * -0.25 + c1) / (0.25 + 0.0625 + c1)  # variances are 0: contrast term is 1
    assert torch.allclose(ssim_map(a, b), torch.full_like(a, expected), atol=1e-5)


def test_ssim_map_interior_agrees_with_pytorch_msssim() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(-1, 1)
    ours = ssim_map(x, y)[..., 5:-5, 5:-5].mean(dim=(1, 2, 3))
    theirs = library_ssim(x, y, data_range=2.0, size_average=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


def _step(
    x0: torch.Tensor, xhat0: torch.Tensor, eps_theta: torch.Tensor, eps_star: torch.Tensor
) -> TrajectoryStep:
    return TrajectoryStep(0, 0, x0, eps_theta, xhat0, eps_theta, eps_star, scalar(0.75))


def test_stein_error_and_ssim_amplification() -> None:
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    eps_theta, eps_star = torch.full_like(x0, 0.5), torch.full_like(x0, 0.2)
    perfect = _step(x0, x0.clone(), eps_theta, eps_star)
    # perfect reconstruction: SSIM = 1, so a_k = e_k exactly, whatever lambda
    e = stein_error(perfect, MethodOptions())
    assert torch.allclose(e, torch.full_like(x0, 0.3))
    assert torch.allclose(amplified_error(perfect, x0, MethodOptions(ssim_lambda=3.0)), e, atol=1e-5)
    # sigma scaling divides by sqrt(1 - abar) = 0.5
    assert torch.allclose(stein_error(perfect, MethodOptions(sigma_scaling=True)), e / 0.5)
    # a wrong estimate lowers SSIM and raises |a| by (1 + lambda (1 - S)) >= 1
    off = _step(x0, -x0, eps_theta, eps_star)
    s = ssim_map(x0, -x0)
    a = amplified_error(off, x0, MethodOptions(ssim_lambda=1.0))
    assert torch.allclose(a, e * (2.0 - s), atol=1e-5)
    assert (a.abs() >= e.abs() - 1e-6).all()
    pure = amplified_error(off, x0, MethodOptions(ssim_weighting="dissimilarity"))
    assert torch.allclose(pure, e * (1.0 - s), atol=1e-5)
    assert torch.equal(amplified_error(off, x0, MethodOptions(ssim_weighting="none")), e)


def test_ssim_lambda_scales_the_amplification_where_ssim_is_below_one() -> None:
    """a_k = e_k (1 + lambda (1 - S)): lambda must reach the weight (the default lambda = 1 cannot tell)."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    xhat0 = (x0 + 0.5 * torch.randn(1, 3, 16, 16, generator=gen)).clamp(-1, 1)
    eps_theta, eps_star = torch.randn(1, 3, 16, 16, generator=gen), torch.randn(1, 3, 16, 16, generator=gen)
    step = _step(x0, xhat0, eps_theta, eps_star)
    s = ssim_map(x0, xhat0)
    assert s.mean() < 0.9  # a clearly imperfect reconstruction
    e = stein_error(step, MethodOptions())
    for lam in (0.0, 0.5, 2.5, 10.0):
        a = amplified_error(step, x0, MethodOptions(ssim_lambda=lam))
        assert torch.allclose(a, e * (1.0 + lam * (1.0 - s)), atol=1e-5), lam
    energy = [amplified_error(step, x0, MethodOptions(ssim_lambda=lam)).pow(2).sum() for lam in (0.5, 1, 2.5)]
    assert energy[0] < energy[1] < energy[2]


def test_model_input_is_scaled_to_minus_one_one() -> None:
    """Pixels 0..255 become -1..1 (v / 127.5 - 1), the range the model was trained on; not 0..1."""
    values = np.array([0, 51, 127, 128, 204, 255], dtype=np.uint8)
    pixels = np.broadcast_to(values[None, :, None], (6, 6, 3)).copy()
    tensor = prepare(Image.fromarray(pixels, "RGB"), 6).tensor
    assert tensor.shape == (3, 6, 6) and tensor.dtype == torch.float32
    expected = torch.tensor(values, dtype=torch.float32) / 127.5 - 1.0
    assert torch.allclose(tensor[:, 0, :], expected.expand(3, 6), atol=1e-6)
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    black, white = (prepare(Image.new("RGB", (8, 8), (v, v, v)), 8).tensor for v in (0, 255))
    assert torch.all(black == -1.0) and torch.all(white == 1.0)


def test_feature_sums_over_steps_and_differences() -> None:
    n = 3 * 2 * 2
    acc = PathAccumulator(steps=2)
    q1, q2 = torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 2.0)
    acc.add(q1, q1)
    acc.add(q2, q2)
    stats = acc.result([0, 99], aggregation="sum")
    # sum q: n + 2n; sum q^2: n + 4n; sum q^3: n + 8n; dq = (2 - 1) * K = 2 -> 2n, 4n, 8n
    assert stats.features.flatten().tolist() == pytest.approx([3 * n, 5 * n, 9 * n, 2 * n, 4 * n, 8 * n])
    assert stats.step_sums.shape == (1, 2, 3) and stats.delta_sums.shape == (1, 1, 3)
    assert torch.allclose(stats.heatmap, torch.full((1, 2, 2), 1.5))
    # per-step: log energy of each step (n, 4n) and of the one difference (4n)
    per_step = acc.result([0, 99], aggregation="per-step")
    assert per_step.features.flatten().tolist() == pytest.approx(
        [math.log(n), math.log(4 * n), math.log(4 * n)]
    )
    one_d = acc.result([0, 99], one_d=True)
    assert one_d.features.flatten().tolist() == pytest.approx([math.sqrt(4 * n)])
    assert power_sums(torch.tensor([[1.0, -2.0]])).tolist() == [[-1.0, 5.0, -7.0]]


def test_schedule_is_read_from_the_scheduler_config() -> None:
    abar = alphas_cumprod_from_config(
        {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": 10,
            "beta_schedule": "linear",
            "beta_start": 0.1,
            "beta_end": 0.2,
        }
    )
    betas = np.linspace(0.1, 0.2, 10)
    assert np.allclose(abar.numpy(), np.cumprod(1 - betas), atol=1e-6)
