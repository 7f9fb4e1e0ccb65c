"""Settings -> engine and method options: what every entry point (``serve`` and the offline commands) builds
from a deployment's settings. It lives outside ``app.service`` so that the offline CLI loads a model without
importing the HTTP data plane."""

from __future__ import annotations

from app.engine.preprocessing import DecodeLimits
from app.engine.scorer import Scorer
from app.engine.types import MethodOptions
from app.settings import Settings


def options_from_settings(settings: Settings, method: str | None = None) -> MethodOptions:
    """The method options a deployment's settings select (a profile must match them to be used)."""
    return MethodOptions(
        method=method or settings.method,  # type: ignore[arg-type]
        steps=settings.steps,
        aggregation=settings.aggregation,
        trajectory=settings.trajectory,
    )


def engine_from_settings(settings: Settings, options: MethodOptions | None = None) -> Scorer:
    """The engine the settings describe (the CLI passes ``options`` to compare methods)."""
    return Scorer(
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
