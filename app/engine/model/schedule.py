"""A model folder's noise schedule, read once by the loader (loading.py) from its scheduler config.

Two views of the same recipe, both computed here and nowhere else:

* ``alphas_cumprod_from_config``: abar_t as the scheduler class named in the config computes it (diffusers
  rounds the betas to float32 first), or the float64 cumulative product of ``trained_betas`` when the
  sidecar asks for it. Its float32 cast is ``LoadedModel.alphas_cumprod``, which the ddim and forward walks
  use.
* ``recipe_alphas_cumprod``: abar_t recomputed from the recipe in float64, as improved-diffusion's numpy
  code computes it. The diffpath walk derives its coefficients from it (trajectory.py): a float32 schedule
  moves sqrt(1/abar - 1) at t = 0 by 0.3%.

``cosine_betas`` is improved-diffusion's cosine schedule, the one formula the reader and that importer share.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# a recipe's float64 abar must agree with the loaded schedule this closely to be taken as its exact form
RECIPE_AGREEMENT = 1e-5


class ScheduleError(ValueError):
    """The scheduler config does not describe an epsilon-prediction DDPM-family schedule."""


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """float64 betas of improved-diffusion's cosine schedule (``get_named_beta_schedule("cosine")``;
    diffusers' ``squaredcos_cap_v2``), each capped at ``max_beta``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
        dtype=np.float64,
    )


def float64_alphas_cumprod(scheduler_config: dict) -> np.ndarray | None:
    """abar_t of a diffusers scheduler config computed in float64 from its beta recipe (or its
    ``trained_betas``). None for a recipe this does not know."""
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    trained = scheduler_config.get("trained_betas")
    schedule = scheduler_config.get("beta_schedule", "linear")
    start = float(scheduler_config.get("beta_start", 0.0001))
    end = float(scheduler_config.get("beta_end", 0.02))
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = cosine_betas(steps)
    else:
        return None
    return np.cumprod(1.0 - betas, axis=0)


def recipe_alphas_cumprod(scheduler_config: dict | None, loaded: torch.Tensor) -> np.ndarray | None:
    """The float64 form of the ``loaded`` schedule (T,): the config's recipe when it is known and agrees
    with ``loaded`` to ``RECIPE_AGREEMENT``, else None (the float32 schedule is all there is)."""
    exact = float64_alphas_cumprod(scheduler_config) if scheduler_config is not None else None
    widened = loaded.detach().double().cpu().numpy()
    if exact is None or exact.shape != widened.shape or np.abs(exact - widened).max() > RECIPE_AGREEMENT:
        return None
    return exact


def alphas_cumprod_from_config(config: dict, float64: bool = False) -> torch.Tensor:
    """abar_t from a diffusers scheduler config, by the scheduler class it names (never hard-coded).

    ``float64`` (an imported improved-diffusion model's sidecar asks for it): the float64 cumulative product
    of the config's ``trained_betas``, as the original numpy code computes it; diffusers itself rounds the
    betas to float32 first, which moves sqrt(1/abar - 1) at t = 0 by 1e-3 relative."""
    import diffusers

    if float64:
        betas = config.get("trained_betas")
        if not betas:
            raise ScheduleError(
                "the sidecar asks for a float64 schedule but the scheduler has no trained_betas"
            )
        return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0)

    class_name = config.get("_class_name", "DDPMScheduler")
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
        raise ScheduleError(f"unknown scheduler class {class_name!r}")
    scheduler = scheduler_cls.from_config(config)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ScheduleError(f"scheduler {class_name} has no alphas_cumprod (not a DDPM-family schedule)")
    return torch.as_tensor(abar, dtype=torch.float64)


def read_schedule(scheduler_file: Path, float64: bool) -> tuple[dict, torch.Tensor, np.ndarray | None]:
    """The scheduler config, its (T,) abar in float64 (``alphas_cumprod_from_config``) and the recipe's
    float64 abar (``recipe_alphas_cumprod``); an epsilon-prediction schedule only."""
    scheduler_config = json.loads(scheduler_file.read_text())
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ScheduleError(
            f"prediction_type={prediction_type!r}: only epsilon-prediction models are supported"
        )
    abar = alphas_cumprod_from_config(scheduler_config, float64=float64)
    recipe = recipe_alphas_cumprod(scheduler_config, abar.float())
    if recipe is None:
        log.debug("%s: no float64 recipe agrees with the loaded schedule", scheduler_file)
    return scheduler_config, abar, recipe
