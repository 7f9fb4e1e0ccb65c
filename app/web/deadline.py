"""The request deadline, as a route dependency: ``received + DDM_REQUEST_TIMEOUT_S``, shortened by the
request's own timeout (``timeout_s`` on ``/v1/score``; the OIP request parameter ``timeout`` on ``/v2``).

``received`` is when the request's head arrived (``RequestContext`` notes it), so time spent waiting for
the body counts. Reading the body, decoding, the queue and the model all end at the same ``Deadline.at``
(a ``time.monotonic()`` value); past it the answer is 504 (docs/API.md#errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError

from app.errors import DeadlineExceeded
from app.web.deps import SettingsDep

V = TypeVar("V")


class TimeoutTooShort(ValueError):
    """A request asked for less time than DDM_MIN_REQUEST_TIMEOUT_S; each protocol words the refusal."""


@dataclass(frozen=True)
class Deadline:
    received: float  # time.monotonic() when the request arrived
    at: float  # time.monotonic() by which it is answered
    min_timeout_s: float  # the least a request may ask for (DDM_MIN_REQUEST_TIMEOUT_S)

    def shortened(self, timeout_s: float | None) -> Deadline:
        """``timeout_s`` after the request arrived, if sooner; None keeps this one. TimeoutTooShort below
        the minimum (a deadline no request could meet only costs work)."""
        if timeout_s is None:
            return self
        if timeout_s < self.min_timeout_s:
            raise TimeoutTooShort(f"{self.min_timeout_s:g}")
        return dataclasses.replace(self, at=min(self.at, self.received + timeout_s))

    async def read(self, reading: Awaitable[V]) -> V:
        """Await ``reading`` (a request body) until the deadline, then DeadlineExceeded: a body that
        trickles in (slow upload) cannot hold a connection past the request's deadline."""
        try:
            return await asyncio.wait_for(reading, max(0.0, self.at - time.monotonic()))
        except TimeoutError as exc:
            if isinstance(exc, DeadlineExceeded):  # raised inside, by name a TimeoutError too
                raise
            raise DeadlineExceeded("the request body did not arrive before the request deadline") from None


async def request_deadline(request: Request, settings: SettingsDep) -> Deadline:
    """The server's deadline for this request (DDM_REQUEST_TIMEOUT_S after it arrived)."""
    received = request.scope["state"].get("received_at", time.monotonic())
    return Deadline(received, received + settings.request_timeout_s, settings.min_request_timeout_s)


RequestDeadline = Annotated[Deadline, Depends(request_deadline)]


async def score_deadline(
    deadline: RequestDeadline,
    timeout_s: Annotated[
        float | None,
        Query(
            gt=0,
            description="deadline for this request in seconds, at least DDM_MIN_REQUEST_TIMEOUT_S (the "
            "schema's minimum); capped at the server's DDM_REQUEST_TIMEOUT_S",
        ),
    ] = None,
) -> Deadline:
    """The server's deadline, shortened by the query parameter ``timeout_s``."""
    try:
        return deadline.shortened(timeout_s)
    except TimeoutTooShort as exc:
        raise RequestValidationError(
            [
                {
                    "type": "greater_than_equal",
                    "loc": ("query", "timeout_s"),
                    "msg": f"Input should be greater than or equal to {exc}",
                    "input": timeout_s,
                }
            ]
        ) from None


ScoreDeadline = Annotated[Deadline, Depends(score_deadline)]
