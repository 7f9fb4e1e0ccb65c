"""The model's denoising trajectory: pure functions of explicit timesteps and alphas (no scheduler state).

Shapes: images and noise are (B, C, H, W); ``abar`` values are Python floats or 0-d tensors.

Three trajectories (``MethodOptions.trajectory``):

* ``ddim`` (default): K timesteps evenly over [0, T - 1], DDIM inversion with float32 coefficients; the last
  step has no successor.
* ``forward``: every step noises x0 directly with one fixed per-image noise.
* ``diffpath``: DiffPath's own ``ddim_reverse_sample_loop`` (improved-diffusion ``timestep_respacing =
  "ddimK"``): timesteps ``range(0, T, stride)`` with the stride that gives exactly K, the schedule respaced
  over them in float64 as ``SpacedDiffusion`` does, the coefficients sqrt(1/abar) and sqrt(1/abar - 1)
  computed in float64 and cast to float32, x0 estimate clipped to [-1, 1], epsilon re-derived from it, the
  last move to abar = 0. On DiffPath's fixture this reproduces the collected epsilons bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.engine.model.loading import LoadedModel

log = logging.getLogger(__name__)

TRAJECTORIES = ("ddim", "forward", "diffpath")


def trajectory_timesteps(num_train_timesteps: int, steps: int, t_max_fraction: float = 1.0) -> list[int]:
    """K timesteps spaced evenly over [0, t_max_fraction * (T - 1)], starting at t = 0 (DiffPath)."""
    if steps < 2:
        raise ValueError("a trajectory needs at least 2 steps")
    top = t_max_fraction * (num_train_timesteps - 1)
    return [round(top * k / (steps - 1)) for k in range(steps)]


def diffpath_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """improved-diffusion's ``"ddimK"`` respacing: ``range(0, T, stride)`` with the smallest stride giving
    exactly K timesteps (T = 4000, K = 10: 0, 400, ..., 3600; T = 1000, K = 10: 0, 100, ..., 900)."""
    if steps < 2:
        raise ValueError("a trajectory needs at least 2 steps")
    if steps > num_train_timesteps:
        raise ValueError(f"cannot take {steps} steps from a {num_train_timesteps}-step schedule")
    stride = math.ceil(num_train_timesteps / steps)
    grid = list(range(0, num_train_timesteps, stride))
    if len(grid) != steps:  # the count only falls as the stride grows: no stride gives exactly K
        raise ValueError(
            f"cannot create exactly {steps} steps from {num_train_timesteps} with an integer stride"
        )
    return grid


def trajectory_grid(
    mode: str, num_train_timesteps: int, steps: int, t_max_fraction: float = 1.0
) -> list[int]:
    """The timesteps a trajectory mode visits: DiffPath's respaced grid for ``diffpath``, else
    :func:`trajectory_timesteps`."""
    if mode == "diffpath":
        if t_max_fraction != 1.0:
            raise ValueError("the diffpath trajectory has its own grid; t_max_fraction must be 1")
        return diffpath_timesteps(num_train_timesteps, steps)
    if mode not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory mode {mode!r}")
    return trajectory_timesteps(num_train_timesteps, steps, t_max_fraction)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate, clipped to the data range: clip((x - sigma * eps) / sqrt(abar), -1, 1)."""
    return ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0)


def implied_noise(x_t: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The noise that takes x0 to x_t at this level: (x_t - sqrt(abar) * x0) / sigma."""
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, abar_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic DDIM move (eta = 0) from level abar to abar_next (inversion when abar_next < abar).

    Returns (xhat0, eps_k, x_next); eps_k is re-derived from the clipped estimate so the move stays on the
    data manifold the model was trained on.
    """
    xhat0 = predict_x0(x_t, eps, abar)
    eps_k = implied_noise(x_t, xhat0, abar)
    x_next = abar_next.sqrt() * xhat0 + (1 - abar_next).sqrt() * eps_k
    return xhat0, eps_k, x_next


def content_noise(digests: Sequence[bytes], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Per-image Gaussian noise seeded from the image content: a score never depends on batch neighbours."""
    out = torch.empty((len(digests), *shape), dtype=torch.float32)
    for i, digest in enumerate(digests):
        seed = int.from_bytes(hashlib.blake2b(digest, digest_size=8).digest(), "little") & ((1 << 63) - 1)
        generator = torch.Generator().manual_seed(seed)
        out[i] = torch.randn(shape, generator=generator)
    return out.to(device, non_blocking=True)


def predict_noise(model: LoadedModel, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """eps_theta(x_t, t) for the whole batch in one forward pass of the model's runtime, float32, NCHW."""
    timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    return model.runtime(x_t, timesteps)


def predict_noise_and_embedding(
    model: LoadedModel, x_t: torch.Tensor, t: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps_theta(x_t, t) and the UNet's image embedding from one forward pass (None from a runtime that
    gives only eps)."""
    timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    predict = getattr(model.runtime, "predict", None)
    if predict is None:
        return model.runtime(x_t, timesteps), None
    return predict(x_t, timesteps)


# --- DiffPath's trajectory: float64 schedule, float32 coefficients ---------------------------------------
def model_alphas_cumprod_float64(model: LoadedModel) -> np.ndarray:
    """The model's abar in float64: the loader's recomputation from the scheduler's recipe
    (``LoadedModel.recipe_alphas_cumprod64``, model/schedule.py), else the float32 schedule widened (with a
    warning)."""
    if model.recipe_alphas_cumprod64 is not None:
        return model.recipe_alphas_cumprod64
    log.warning(
        "%s: no float64 recipe for the noise schedule; the diffpath trajectory uses the float32 schedule",
        model.info.model_id,
    )
    return model.alphas_cumprod.detach().double().cpu().numpy()


@dataclass(frozen=True)
class DiffPathSchedule:
    """Per-step float32 0-d tensors on the model's device, computed in float64 as improved-diffusion's
    ``SpacedDiffusion`` computes them and cast once (``_extract_into_tensor(...).float()``)."""

    timesteps: tuple[int, ...]
    abar: tuple[torch.Tensor, ...]
    sqrt_recip: tuple[torch.Tensor, ...]  # sqrt(1 / abar)
    sqrt_recipm1: tuple[torch.Tensor, ...]  # sqrt(1 / abar - 1)
    sqrt_abar_next: tuple[torch.Tensor, ...]  # sqrt(abar_next) in float32; abar_next = 0 after the last step
    sqrt_one_minus_abar_next: tuple[torch.Tensor, ...]


def diffpath_schedule(
    abar64: np.ndarray, timesteps: Sequence[int], device: torch.device | str = "cpu"
) -> DiffPathSchedule:
    """Respace a float64 schedule over ``timesteps`` (betas 1 - abar_t / abar_prev, cumprod again, as
    respace.py does) and derive DiffPath's coefficients."""
    last = 1.0
    betas = []
    for t in timesteps:
        betas.append(1 - abar64[t] / last)
        last = abar64[t]
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)
    abar_next = np.append(abar[1:], 0.0)

    def f32(values: np.ndarray) -> tuple[torch.Tensor, ...]:
        return tuple(torch.tensor(float(v), dtype=torch.float64).float().to(device) for v in values)

    nxt = torch.from_numpy(abar_next).float()  # float32 abar_next; sqrt taken in float32 like the original
    return DiffPathSchedule(
        timesteps=tuple(int(t) for t in timesteps),
        abar=f32(abar),
        sqrt_recip=f32(np.sqrt(1.0 / abar)),
        sqrt_recipm1=f32(np.sqrt(1.0 / abar - 1)),
        sqrt_abar_next=tuple(v.to(device) for v in torch.sqrt(nxt)),
        sqrt_one_minus_abar_next=tuple(v.to(device) for v in torch.sqrt(1 - nxt)),
    )


_SCHEDULES: dict[tuple[str, str, str, tuple[int, ...]], DiffPathSchedule] = {}
_SCHEDULES_LOCK = threading.Lock()


def model_diffpath_schedule(model: LoadedModel, timesteps: Sequence[int]) -> DiffPathSchedule:
    """:func:`diffpath_schedule` of a loaded model, computed once per model, device and grid."""
    key = (model.info.path, model.info.weights_sha256, str(model.device), tuple(int(t) for t in timesteps))
    with _SCHEDULES_LOCK:
        cached = _SCHEDULES.get(key)
    if cached is None:
        cached = diffpath_schedule(model_alphas_cumprod_float64(model), timesteps, model.device)
        with _SCHEDULES_LOCK:
            _SCHEDULES[key] = cached
    return cached


def diffpath_step(
    x_t: torch.Tensor, eps: torch.Tensor, schedule: DiffPathSchedule, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffPath's ``ddim_reverse_sample`` (clip_denoised=True, eta = 0), the same float32 operations in
    the same order. Returns (xhat0, eps_k, x_next)."""
    scaled = schedule.sqrt_recip[k] * x_t
    xhat0 = (scaled - schedule.sqrt_recipm1[k] * eps).clamp(-1.0, 1.0)
    eps_k = (scaled - xhat0) / schedule.sqrt_recipm1[k]
    x_next = xhat0 * schedule.sqrt_abar_next[k] + schedule.sqrt_one_minus_abar_next[k] * eps_k
    return xhat0, eps_k, x_next


@dataclass
class TrajectoryStep:
    index: int
    t: int
    x_t: torch.Tensor  # the point the model was evaluated at
    eps_theta: torch.Tensor  # the model's noise prediction there
    xhat0: torch.Tensor  # clipped one-step clean estimate
    eps_k: torch.Tensor  # noise re-derived from the clipped xhat0 (DDIM); the prediction itself (forward)
    eps_star: torch.Tensor  # true conditional noise of x_t given x0
    abar: torch.Tensor
    # the UNet's image embedding at x_t (B, E), from the same forward pass (runtimes.py); None without one
    embedding: torch.Tensor | None = None


def walk(
    model: LoadedModel,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    mode: str = "ddim",
    noise: torch.Tensor | None = None,
) -> Iterator[TrajectoryStep]:
    """Yield the K steps of the trajectory; one UNet call each, no host/device sync."""
    if mode not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory mode {mode!r}")
    abar_all = model.alphas_cumprod
    schedule = model_diffpath_schedule(model, timesteps) if mode == "diffpath" else None
    x_t = x0
    for k, t in enumerate(timesteps):
        abar = abar_all[t] if schedule is None else schedule.abar[k]
        if mode == "forward":
            if noise is None:
                raise ValueError("forward trajectories need per-image noise")
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps_theta, embedding = predict_noise_and_embedding(model, x_t, t)
        if mode == "ddim":
            abar_next = abar_all[timesteps[k + 1]] if k + 1 < len(timesteps) else abar
            xhat0, eps_k, x_next = ddim_step(x_t, eps_theta, abar, abar_next)
        elif mode == "forward":
            xhat0 = predict_x0(x_t, eps_theta, abar)
            eps_k = eps_theta  # the added noise is fixed per image and carries no information
            x_next = x_t
        else:
            assert schedule is not None
            xhat0, eps_k, x_next = diffpath_step(x_t, eps_theta, schedule, k)
        yield TrajectoryStep(
            k, t, x_t, eps_theta, xhat0, eps_k, implied_noise(x_t, x0, abar), abar, embedding
        )
        x_t = x_next
