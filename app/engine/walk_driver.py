"""Statistics of a batch under any registered methods (METHOD.md steps 2-4): the driver.

Every path method of a batch reads ONE trajectory walk: K UNet evaluations per image however many path
methods are asked for; methods with the same ``walk_key`` also share their running sums. Methods with
their own passes (``PassMethod``) run after. What each method sums and how it derives its features lives in
its own module (app/engine/methods/).
"""

from __future__ import annotations

from typing import Any

import torch

from app.engine.methods import BatchStats, PassMethod, PathMethod, get
from app.engine.model.loading import LoadedModel
from app.engine.trajectory import content_noise, trajectory_grid, walk
from app.engine.types import MethodOptions


def path_statistics(
    model: LoadedModel,
    x0: torch.Tensor,
    options: MethodOptions,
    digests: list[bytes] | None = None,
    methods: tuple[str, ...] | None = None,
) -> dict[str, BatchStats]:
    """Path-method statistics for a batch x0 (B, C, H, W) in [-1, 1], several methods from one walk (they
    share the trajectory; only what is summed differs)."""
    chosen: list[PathMethod[Any]] = []
    for name in methods or (options.method,):
        method = get(name)
        if not isinstance(method, PathMethod):
            raise ValueError(f"{name!r} is not a trajectory method")
        chosen.append(method)
    timesteps = trajectory_grid(
        options.trajectory, len(model.alphas_cumprod), options.steps, options.t_max_fraction
    )
    noise = None
    if options.trajectory == "forward":
        noise = content_noise(digests or [b""] * x0.shape[0], tuple(x0.shape[1:]), x0.device)
    sums: dict[str, Any] = {}
    for method in chosen:
        if method.walk_key not in sums:
            sums[method.walk_key] = method.start_walk(x0, options)
    for step in walk(model, x0, timesteps, options.trajectory, noise):
        for running in sums.values():
            running.add_step(step)
    return {method.name: method.features(sums[method.walk_key], timesteps, options) for method in chosen}


def batch_statistics(
    model: LoadedModel,
    x0: torch.Tensor,
    options: MethodOptions,
    digests: list[bytes] | None = None,
    methods: tuple[str, ...] | None = None,
) -> dict[str, BatchStats]:
    """Statistics of every requested method (default: the options' own) for one batch."""
    chosen = {name: get(name) for name in methods or (options.method,)}
    out: dict[str, BatchStats] = {}
    path_methods = tuple(name for name, method in chosen.items() if isinstance(method, PathMethod))
    if path_methods:
        out.update(path_statistics(model, x0, options, digests, path_methods))
    for name, method in chosen.items():
        if isinstance(method, PassMethod):
            out[name] = method.statistics(model, x0, options, digests)
    return out
