"""improved-diffusion's noise schedule as a diffusers scheduler, with the original's float64 betas."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.engine.model.importers.common import CheckpointImportError
from app.engine.model.importers.improved_diffusion.flags import resolve_flags
from app.engine.model.schedule import cosine_betas


def betas(flags: dict[str, Any]) -> np.ndarray:
    """float64 betas exactly as improved-diffusion's ``get_named_beta_schedule``."""
    flags = resolve_flags(flags)
    steps, schedule = flags["diffusion_steps"], flags["noise_schedule"]
    if steps < 2:
        raise CheckpointImportError(f"diffusion_steps={steps}: need at least 2")
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":
        return cosine_betas(steps)
    raise CheckpointImportError(
        f"noise_schedule={schedule!r}: improved-diffusion knows 'linear' and 'cosine'"
    )


def scheduler_for(flags: dict[str, Any]):
    from diffusers import DDPMScheduler

    flags = resolve_flags(flags)
    b = betas(flags)
    if flags["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if flags["sigma_small"] else "fixed_large"
    linear = flags["noise_schedule"] == "linear"
    return DDPMScheduler(
        num_train_timesteps=len(b),
        beta_schedule="linear" if linear else "squaredcos_cap_v2",
        beta_start=float(b[0]) if linear else 0.0001,
        beta_end=float(b[-1]) if linear else 0.02,
        trained_betas=[float(v) for v in b],  # float64 values; JSON keeps them exactly
        variance_type=variance,
        clip_sample=True,
        prediction_type="epsilon",
    )
