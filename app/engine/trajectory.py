"""The model's denoising trajectory: pure functions of explicit timesteps and alphas (no scheduler state).

Shapes: images and noise are (B, C, H, W); ``abar`` values are Python floats or 0-d tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from app.engine.model_loading import LoadedModel


def trajectory_timesteps(num_train_timesteps: int, steps: int, t_max_fraction: float = 1.0) -> list[int]:
    """K timesteps spaced evenly over [0, t_max_fraction * (T - 1)], starting at t = 0 (DiffPath)."""
    if steps < 2:
        raise ValueError("a trajectory needs at least 2 steps")
    top = t_max_fraction * (num_train_timesteps - 1)
    return [round(top * k / (steps - 1)) for k in range(steps)]


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


def walk(
    model: LoadedModel,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    mode: str = "ddim",
    noise: torch.Tensor | None = None,
) -> Iterator[TrajectoryStep]:
    """Yield the K steps of the trajectory; one UNet call each, no host/device sync."""
    abar_all = model.alphas_cumprod
    x_t = x0
    for k, t in enumerate(timesteps):
        abar = abar_all[t]
        if mode == "forward":
            if noise is None:
                raise ValueError("forward trajectories need per-image noise")
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps_theta = predict_noise(model, x_t, t)
        if mode == "ddim":
            abar_next = abar_all[timesteps[k + 1]] if k + 1 < len(timesteps) else abar
            xhat0, eps_k, x_next = ddim_step(x_t, eps_theta, abar, abar_next)
        elif mode == "forward":
            xhat0 = predict_x0(x_t, eps_theta, abar)
            eps_k = eps_theta  # the added noise is fixed per image and carries no information
            x_next = x_t
        else:
            raise ValueError(f"unknown trajectory mode {mode!r}")
        yield TrajectoryStep(k, t, x_t, eps_theta, xhat0, eps_k, implied_noise(x_t, x0, abar), abar)
        x_t = x_next
