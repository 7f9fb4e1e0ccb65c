"""The data plane: engine + profiles + batcher + metrics behind plain async methods (no HTTP here).

Routes call :class:`ScoringService`; it decodes uploads on a small thread pool, queues the decoded images
on the batcher (whose ``model_instances`` worker threads are the only callers of
``Engine.image_stats``), judges the results against a calibration profile and counts everything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Protocol

import numpy as np

from app.bootstrap import engine_from_settings
from app.engine.calibration.limits import DEFAULT_FPRS
from app.engine.calibration.profile import Profile
from app.engine.calibration.store import ProfileStore, validate_profile_name
from app.engine.explain import calibrated_heatmap, calibrated_png, verdict_floor
from app.engine.preprocessing import PreparedImage, declared_pixels
from app.engine.types import ImageStats, MethodOptions, ModelInfo, Verdict
from app.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    ProfileMismatch,
)
from app.service.batcher import DynamicBatcher
from app.service.decode_queue import DecodeQueue
from app.service.metrics import BatchMetrics, Metrics
from app.service.profile_admin import ProfileAdmin
from app.service.results import (
    ImageResult,
    ModelDescription,
    ModelStatus,
    RefusedProfile,
    ScoreOutcome,
    ScoreTimings,
    State,
)
from app.settings import Settings

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 2.0  # time left after the last deadline for one running batch to finish and answer


class Engine(Protocol):
    """What the service needs from the engine (``app.engine.engine.Engine``; tests pass a fake)."""

    options: MethodOptions

    @property
    def ready(self) -> bool: ...
    @property
    def info(self) -> ModelInfo: ...
    def load(self, warmup_batch: int = 2) -> None: ...
    def decode(self, data: bytes) -> PreparedImage: ...
    def image_stats(self, batch: Sequence[PreparedImage]) -> list[ImageStats]: ...
    def memory(self) -> dict[str, float]: ...


class ScoringService:
    def __init__(self, settings: Settings, metrics: Metrics, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine = engine if engine is not None else engine_from_settings(settings)
        self.batcher: DynamicBatcher[PreparedImage, ImageStats] = DynamicBatcher(
            self.engine.image_stats,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue_items=settings.max_queue_images,
            observer=BatchMetrics(metrics),
            instances=settings.model_instances,
        )
        self.state: State = "loading"
        self.failure: str | None = None
        self._profiles: ProfileStore | None = None
        self._decoder = DecodeQueue(settings.decode_threads, settings.max_decode_queue_images)
        self._profile_admin = ProfileAdmin(settings, self.engine, self.batcher.run, self._decode_all)
        self._loader: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Load and warm up the model on a background thread; ``state`` becomes ready or failed."""
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()
        return self._loader

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self.engine.load(warmup_batch=2 if self.settings.warmup else 0)
            info = self.engine.info
            directory = self.settings.profiles_folder
            self._profiles = ProfileStore(directory, info.model_id, self.engine.options)
            self._profiles.remove_stale_temp_files()
            loaded = self._profiles.load_all()
            if not isinstance(loaded.get(self.settings.default_profile), Profile):
                log.warning("default calibration profile %r is not available; requests must name one",
                            self.settings.default_profile)  # fmt: skip
        except Exception as exc:  # any load failure keeps the service up and not ready, with the reason
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.error("model failed to load from %s: %s", self.settings.model_dir, self.failure)
            return
        self._check_cpu_budget(info.device)
        self.batcher.start()
        self.metrics.model_info.labels(
            model_id=info.model_id,
            device=info.device,
            dtype=info.dtype,
            runtime=info.runtime,
            method=self.engine.options.method,
        ).set(1)
        if self.state == "loading":
            self.state = "ready"
            self.metrics.ready.set(1)
        log.info("model %s ready on %s in %.1f s (profiles: %s)", info.model_id, info.device,
                 time.monotonic() - started, ", ".join(loaded) or "none")  # fmt: skip

    def _check_cpu_budget(self, device: str) -> None:
        """Warn when instances x torch threads oversubscribe the CPUs: OpenMP threads then wait at every
        operator's barrier for a descheduled sibling, the slowest case in PERFORMANCE.md."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = (self.settings.torch_threads or cpus) * self.settings.model_instances
        if device == "cpu" and threads > cpus:
            log.warning("%d model instances x %d torch threads = %d threads on %d CPUs; set "
                        "DDM_TORCH_THREADS x DDM_MODEL_INSTANCES to the CPUs the service has to itself",
                        self.settings.model_instances, threads // self.settings.model_instances, threads,
                        cpus)  # fmt: skip

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def begin_drain(self) -> None:
        """Readiness goes false and new work is refused; accepted work continues until the drain's end:
        the server stops ``shutdown_delay_s + drain_timeout_s`` from now, so every accepted request's
        deadline is capped a margin before that and what cannot be computed in time gets its JSON 504
        instead of a connection cut at shutdown (docs/API.md#errors)."""
        if self.state in ("loading", "ready"):
            log.info("draining: readiness is now false, new work is refused")
            ends = self.settings.shutdown_delay_s + self.settings.drain_timeout_s
            self.batcher.cap_deadlines(time.monotonic() + max(0.0, ends - DRAIN_MARGIN_S))
        self.state = "draining"
        self.metrics.ready.set(0)

    async def close(self) -> None:
        """Finish every accepted request (up to ``drain_timeout_s``), then stop the worker and pools."""
        self.begin_drain()
        drained = await asyncio.to_thread(self.batcher.close, True, self.settings.drain_timeout_s)
        if not drained:
            log.error("drain timeout (%.0f s) passed with work left", self.settings.drain_timeout_s)
        self._decoder.close()
        self.state = "stopped"

    def admit(self) -> None:
        """Called as a request arrives: refuse new work unless ready (loading, failed or draining)."""
        if self.state != "ready":
            reason = {"loading": "the model is still loading", "failed": "the model failed to load"}
            raise ModelNotReady(reason.get(self.state, "the service is shutting down"))

    def _check_ready(self) -> ProfileStore:
        """Work admitted before a drain began still runs; the batcher closes only after it is answered."""
        if self.state not in ("ready", "draining") or self._profiles is None:
            self.admit()
            raise ModelNotReady("the service is not ready")
        return self._profiles

    # --- scoring --------------------------------------------------------------------------------------
    async def score(
        self,
        images: Sequence[tuple[str, bytes]],
        *,
        profile: str | None = None,
        explain: bool = False,
        heatmaps: bool = False,
        deadline: float | None = None,
    ) -> ScoreOutcome:
        """Judge each (id, encoded bytes) against a profile; results in request order. ``explain``: each
        result carries a heat-map PNG; ``heatmaps``: each carries its calibrated map (``ImageResult``)."""
        t0 = time.monotonic()
        store = self._check_ready()
        if not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.settings.max_images_per_request:
            raise PayloadTooLarge(
                f"{len(images)} images in one request; at most {self.settings.max_images_per_request}"
            )
        name = validate_profile_name(profile or self.settings.default_profile)
        calibration = await asyncio.to_thread(store.get, name)  # a stat; a changed file is read and loaded
        prepared = await self._decode_all(images, deadline)
        t_decoded = time.monotonic()
        done = await self.batcher.run(prepared, deadline)
        verdicts = calibration.verdicts(done.outputs)
        maps: list[tuple[np.ndarray | None, bytes | None]] = [(None, None)] * len(prepared)
        if explain or heatmaps:
            maps = await self._explain(calibration, done.outputs, prepared, verdicts, explain)
        self._count_verdicts(calibration.name, verdicts)
        self.metrics.profile_default_fpr.labels(profile=calibration.name).set(calibration.default_fpr)
        results = [
            ImageResult(image_id, verdict, stats, png, heat if heatmaps else None)
            for (image_id, _), verdict, stats, (heat, png) in zip(
                images, verdicts, done.outputs, maps, strict=True
            )
        ]
        timings = ScoreTimings(
            decode_s=t_decoded - t0,
            queue_s=done.queue_s,
            compute_s=done.compute_s,
            total_s=time.monotonic() - t0,
            batches=done.batches,
        )
        return ScoreOutcome(results, calibration, self.engine.info, self.engine.options, timings)

    async def _explain(
        self,
        calibration: Profile,
        stats: list[ImageStats],
        prepared: list[PreparedImage],
        verdicts: list[Verdict],
        draw: bool,
    ) -> list[tuple[np.ndarray | None, bytes | None]]:
        """Each map calibrated once on the profile's scale and, with ``draw``, its PNG drawn from it, on the
        decode threads (admitted work: never refused now)."""
        side = self.settings.heatmap_max_side if draw else None
        jobs = [partial(_explain_image, calibration, s, p, v, side)
                for s, p, v in zip(stats, prepared, verdicts, strict=True)]  # fmt: skip
        maps = await self._decoder.run(jobs, bounded=False)
        for done in maps:
            if isinstance(done, BaseException):
                raise done
        return maps

    def _count_verdicts(self, profile: str, verdicts: list[Verdict]) -> None:
        for v in verdicts:
            if v.score is not None:
                self.metrics.scores.labels(profile=profile).observe(v.score)
            label = "non_finite" if v.score is None else ("anomaly" if v.is_anomaly else "normal")
            self.metrics.verdicts.labels(profile=profile, verdict=label).inc()

    async def _decode_all(
        self, images: Sequence[tuple[str, bytes]], deadline: float | None = None
    ) -> list[PreparedImage]:
        """Decode on the decode queue (503 when it is full), within the request's pixel budget and
        deadline: past it the request gets its 504 on time; its images still waiting are dropped (one
        already decoding finishes on its thread, its result unused)."""
        sizes = await asyncio.to_thread(lambda: [declared_pixels(data) for _, data in images])  # headers
        if sum(sizes) > self.settings.max_request_pixels:
            raise PayloadTooLarge(
                f"{sum(sizes)} pixels in one request; at most {self.settings.max_request_pixels} "
                "(DDM_MAX_REQUEST_PIXELS)"
            )
        decoding = self._decoder.run([partial(self.engine.decode, data) for _, data in images])
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            results = await asyncio.wait_for(decoding, timeout)
        except TimeoutError:
            raise DeadlineExceeded("the request deadline passed while its images were decoded") from None
        for (image_id, _), result in zip(images, results, strict=True):
            if isinstance(result, InvalidInput):  # the first bad image names itself; same error class
                raise type(result)(f"image {image_id!r}: {result}") from result
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, PreparedImage)]

    # --- profiles and metadata ----------------------------------------------------------------------
    async def create_profile(
        self,
        name: str,
        images: Sequence[tuple[str, bytes]],
        *,
        fprs: Sequence[float] = DEFAULT_FPRS,
        default_fpr: float = 0.05,
        overwrite: bool = False,
        source: str = "",
        aggregation: str | None = None,
    ) -> Profile:
        """Score normal images through the shared queues, fit a profile, persist it; usable at once.
        ``aggregation``: the profile's features (``auto``: chosen from the images; None: the setting)."""
        store = self._check_ready()
        return await self._profile_admin.create(
            store, name, images, fprs=fprs, default_fpr=default_fpr, overwrite=overwrite, source=source,
            aggregation=aggregation or self.settings.aggregation,
        )  # fmt: skip

    async def delete_profile(self, name: str) -> None:
        """Remove a profile; the one requests use by default cannot be removed (409)."""
        await self._profile_admin.delete(self._check_ready(), name)
        self.metrics.forget_profile(name)

    def model_info(self) -> ModelStatus:
        """The service's state and, once loaded, the model (also after a failed profile load or while
        draining)."""
        return ModelStatus(self.state, self.ready, self.engine.info if self.engine.ready else None)

    async def describe_model(self, model_id: str | None = None) -> ModelDescription:
        """Base model metadata, method options and calibration profiles (usable and refused); the profile
        files are read off the event loop."""
        store = self._check_ready()
        info = self.engine.info
        if model_id is not None and model_id not in (info.model_id, info.name):
            raise ModelNotFound(f"no model {model_id!r}; this service runs {info.model_id}")
        loaded = await asyncio.to_thread(store.load_all)
        return ModelDescription(
            info=info,
            options=self.engine.options,
            default_profile=self.settings.default_profile,
            profiles=[p for p in loaded.values() if isinstance(p, Profile)],
            refused_profiles=[
                RefusedProfile(name, str(p)) for name, p in loaded.items() if isinstance(p, ProfileMismatch)
            ],
        )

    def update_gauges(self) -> None:
        self.metrics.queued_images.set(self.batcher.queued)
        if self.engine.ready:
            for kind, value in self.engine.memory().items():
                self.metrics.device_memory.labels(kind=kind).set(value)


def _explain_image(
    calibration: Profile, stats: ImageStats, prepared: PreparedImage, verdict: Verdict, max_side: int | None
) -> tuple[np.ndarray, bytes | None]:
    """The calibrated map and, with a ``max_side``, its PNG on the profile's scale, lifted to the
    image's verdict (``explain.verdict_floor``: a flagged image never draws dark)."""
    heat = calibrated_heatmap(stats.heatmap, calibration.heatmap)
    if max_side is None:
        return heat, None
    floor = verdict_floor(calibration, verdict)
    png = calibrated_png(heat, prepared.source_size, box=prepared.crop_box, max_side=max_side,
                         calibration=calibration.heatmap, floor=floor)  # fmt: skip
    return heat, png
