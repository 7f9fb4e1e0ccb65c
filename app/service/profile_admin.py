"""Creating and deleting calibration profiles through the service's own queues (docs/API.md#profiles).

A profile's reference images are decoded and scored a chunk at a time on the same decode queue and
batcher as scoring requests, so fitting a profile never starves scoring; when a queue is full the
administrative job waits for room instead of failing half-way through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

from app.engine.calibration.choice import AUTO, calibrate_profile
from app.engine.calibration.profile import Profile
from app.engine.calibration.store import ProfileStore, validate_profile_name
from app.engine.calibration.thresholds import validate_fprs
from app.engine.preprocessing import PreparedImage
from app.engine.types import ImageStats, MethodOptions, ModelInfo
from app.errors import Overloaded, PayloadTooLarge, ProfileConflict
from app.service.batch_requests import Completed
from app.settings import Settings

log = logging.getLogger(__name__)
V = TypeVar("V")

Decode = Callable[[Sequence[tuple[str, bytes]]], Awaitable[list[PreparedImage]]]
Compute = Callable[[Sequence[PreparedImage]], Awaitable[Completed[ImageStats]]]


class FittedEngine(Protocol):
    """What fitting needs to know of the engine: the model the profile binds to and its options."""

    options: MethodOptions

    @property
    def info(self) -> ModelInfo: ...


class ProfileAdmin:
    def __init__(self, settings: Settings, engine: FittedEngine, compute: Compute, decode: Decode) -> None:
        self.settings = settings
        self.engine = engine
        self._compute = compute
        self._decode = decode
        self._creating: set[str] = set()  # casefolded names of profiles being fitted (event loop only)
        self._new: set[str] = set()  # those of them that will add a file (count against MAX_PROFILES)

    async def create(
        self,
        store: ProfileStore,
        name: str,
        images: Sequence[tuple[str, bytes]],
        *,
        fprs: Sequence[float],
        default_fpr: float,
        overwrite: bool,
        source: str,
        aggregation: str = AUTO,
    ) -> Profile:
        """Every option, the name and the room for one more profile are checked before any image is
        computed; one creation per name at a time. Creations under way hold their place, so concurrent
        ones cannot together pass the profile limit."""
        validate_profile_name(name)
        validate_fprs(tuple(fprs), default_fpr)
        if len(images) > self.settings.max_profile_images:
            raise PayloadTooLarge(
                f"{len(images)} images; a profile takes at most {self.settings.max_profile_images}"
            )
        store.check_new(name, overwrite)
        key = name.casefold()
        if key in self._creating:  # the second of two concurrent creations gets 409 at once
            raise ProfileConflict(f"profile {name!r} is being created by another request")
        adds_file = store.check_room(name, reserved=len(self._new))
        self._creating.add(key)
        if adds_file:
            self._new.add(key)
        try:
            profile = await self._fit(name, images, tuple(fprs), default_fpr, source, aggregation)
            await asyncio.to_thread(store.save, profile, overwrite)
        finally:
            self._creating.discard(key)
            self._new.discard(key)
        log.info("calibration profile %r created from %d images", name, len(images))
        for warning in profile.warnings():  # the response's "warnings" says the same to the client
            log.warning("calibration profile %r: %s", name, warning)
        return profile

    async def delete(self, store: ProfileStore, name: str) -> None:
        """The profile requests use by default, and one being fitted, cannot be removed (409)."""
        validate_profile_name(name)
        if name == self.settings.default_profile:
            raise ProfileConflict(f"profile {name!r} is the service default (DDM_DEFAULT_PROFILE)")
        if name.casefold() in self._creating:
            raise ProfileConflict(f"profile {name!r} is being created by another request")
        await asyncio.to_thread(store.delete, name)
        log.info("calibration profile %r deleted", name)

    async def _fit(
        self,
        name: str,
        images: Sequence[tuple[str, bytes]],
        fprs: tuple[float, ...],
        default_fpr: float,
        source: str,
        aggregation: str,
    ) -> Profile:
        settings = self.settings
        chunk = max(1, min(settings.max_batch_size, settings.max_queue_images // 2,
                           settings.max_decode_queue_images))  # fmt: skip
        stats: list[ImageStats] = []
        for start in range(0, len(images), chunk):
            prepared = await _when_room(partial(self._decode, images[start : start + chunk]))
            done = await _when_room(partial(self._compute, prepared))
            stats.extend(done.outputs)
        # off the event loop: choose the features (unless named), fit the density and thresholds
        return await asyncio.to_thread(
            calibrate_profile, name, stats, self.engine.options, aggregation,
            model_id=self.engine.info.model_id, fprs=fprs, default_fpr=default_fpr, source=source,
        )  # fmt: skip


async def _when_room(attempt: Callable[[], Awaitable[V]]) -> V:
    """Run ``attempt`` until a queue has room: an admin job waits instead of failing half-way through."""
    while True:
        try:
            return await attempt()
        except Overloaded as exc:
            await asyncio.sleep(min(exc.retry_after_s, 5.0))
