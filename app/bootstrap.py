"""What every entry point (``serve`` and the offline commands) builds from a deployment's settings: the
engine and its method options, and the process's thread policy. It lives outside ``app.service`` so that
the offline CLI loads a model without importing the HTTP data plane."""

from __future__ import annotations

import logging

import torch

from app.engine.engine import Engine
from app.engine.model.loading import ModelLoadError, resolve_device, resolve_dtype
from app.engine.model.runtimes import RuntimeUnavailable, choose_runtime, torch_threads_beside
from app.engine.preprocessing import DecodeLimits
from app.engine.types import MethodOptions
from app.settings import Settings

log = logging.getLogger(__name__)

AUTO = "auto"  # Settings.aggregation: each new profile chooses its features (calibration/choice.py)
DEFAULT_AGGREGATION = "per-step-centre"


def options_from_settings(settings: Settings, method: str | None = None) -> MethodOptions:
    """The method options a deployment's settings select: the walk every profile must share, and the
    engine's own features (``aggregation = auto`` leaves each new profile to choose; the engine's own
    features are then the per-step-centre energies)."""
    aggregation = DEFAULT_AGGREGATION if settings.aggregation == AUTO else settings.aggregation
    return MethodOptions(
        method=method or settings.method,  # type: ignore[arg-type]
        steps=settings.steps,
        aggregation=aggregation,  # type: ignore[arg-type]
        trajectory=settings.trajectory,
    )


def engine_from_settings(settings: Settings, options: MethodOptions | None = None) -> Engine:
    """The engine the settings describe (the CLI passes ``options`` to compare methods)."""
    return Engine(
        settings.model_dir,
        device=settings.device,
        dtype=settings.dtype,
        options=options or options_from_settings(settings),
        torch_threads=settings.torch_threads,
        runtime=settings.runtime,
        limits=DecodeLimits(
            max_pixels=settings.max_image_pixels, allowed_formats=tuple(settings.allowed_formats)
        ),
    )


def set_torch_threads(threads: int | None) -> int:
    """Torch's intra-op threads for this process: ``threads``, or torch's own choice (one per physical core)
    when None. The count is process-wide, so each entry point sets it once at start-up, before model work."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def apply_thread_policy(settings: Settings) -> int:
    """Torch's threads for a process that scores with ``settings`` (``serve`` and the scoring commands call
    this once at start-up; the engine never changes them); see :func:`set_engine_threads`."""
    return set_engine_threads(settings.device, settings.dtype, settings.runtime, settings.torch_threads)


def set_engine_threads(device: str, dtype: str, runtime: str, threads: int | None) -> int:
    """Torch's threads beside the engine these settings load: ``threads`` (default torch's choice) when
    torch computes the UNet, one when the UNet runs in ONNX Runtime's own pool, which ``threads`` sizes
    instead and which then needs the cores (runtimes.torch_threads_beside). Returns torch's count."""
    count = set_torch_threads(threads)
    try:
        dev = resolve_device(device)
        chosen = choose_runtime(runtime, dev, resolve_dtype(dtype, dev)[1])
    except (ModelLoadError, RuntimeUnavailable):
        return count  # loading the model reports the bad setting
    torch.set_num_threads(torch_threads_beside(chosen, count))
    log.info("torch uses %d thread(s); the UNet runs in %s", torch.get_num_threads(), chosen)
    return torch.get_num_threads()
