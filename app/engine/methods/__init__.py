"""Scoring methods as plug-ins: one module per method, registered here; everything else asks the registry.

``Settings.method`` and the CLI's ``--method`` choices, profile validation (a profile names its method and
density), density selection in ``fit_profile``, the density's default shrinkage
(``density_reg`` below) and the statistics driver (statistics.py: one shared walk per batch for
all path methods) all read ``names()``/``get(name)``.

Adding a method = adding one file and registering it:

1. ``app/engine/methods/my_method.py``: subclass ``PathMethod`` (features summed along the shared walk:
   ``walk_key``, ``start_walk(x0, options)`` returning an object with ``add_step(step)``, and
   ``features(sums, timesteps, options) -> BatchStats``; ``PathAccumulator`` in path_sums.py gives the
   power sums of any per-step quantity and the standard aggregations) or ``PassMethod`` (own passes:
   ``statistics(model, x0, options, digests)``). Set ``name`` and ``density`` (calibration/density.py);
   override ``default_covariance_reg`` if the mixture needs other shrinkage. End with ``METHOD = MyMethod()``.
2. Add the module to ``BUILTIN`` below. Nothing else: settings, CLI, profiles and the engine follow.
   Method-specific options go in ``MethodOptions`` (types.py; ``feature_key`` binds profiles to them).

tests/test_methods_registry.py registers a toy method in one place and scores real images with it.
"""

from __future__ import annotations

from app.engine.methods import diffpath_1d, diffpath_6d, diffpath_v2, reconstruction
from app.engine.methods.base import BatchStats, Method, PassMethod, PathMethod, WalkSums
from app.engine.methods.registry import get, names, register, unregister
from app.engine.types import MethodOptions

BUILTIN: tuple[Method, ...] = (
    diffpath_v2.METHOD,
    diffpath_6d.METHOD,
    diffpath_1d.METHOD,
    reconstruction.METHOD,
)
for _method in BUILTIN:
    register(_method)
# The shipped methods' names, in order (what evaluations and goldens cover); ``names()`` also lists methods
# registered later.
METHODS: tuple[str, ...] = names()


def density_reg(options: MethodOptions) -> float:
    """The shrinkage added to the diagonal of the density's standardised covariance: the options' own
    ``covariance_reg``, else the method's default. Here, not on ``MethodOptions``: the options are the
    engine's bottom layer and the methods import them."""
    if options.covariance_reg is not None:
        return options.covariance_reg
    return get(options.method).default_covariance_reg(options)


__all__ = [
    "BUILTIN",
    "METHODS",
    "BatchStats",
    "Method",
    "PassMethod",
    "PathMethod",
    "WalkSums",
    "density_reg",
    "get",
    "names",
    "register",
    "unregister",
]
