"""A request's life inside the batcher: its items' queue entries, its outputs as batches answer them, and
how its future is resolved. All of it changes under the batcher's lock; futures are resolved outside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from app.errors import DeadlineExceeded
from app.service.batch_observer import ImageOutcome

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Completed(Generic[R]):
    """What a request's future resolves to: outputs in request order plus where its time went."""

    outputs: list[R]
    queue_s: float  # submit -> start of its first batch
    compute_s: float  # summed model time of the batches its items were in
    batches: int


@dataclass(eq=False)
class BatchRequest(Generic[T, R]):
    items: Sequence[T]
    deadline: float | None  # time.monotonic() value
    submitted: float
    future: Future[Completed[R]] = field(default_factory=Future)
    outputs: list[R | None] = field(default_factory=list)
    remaining: int = 0
    started: float | None = None
    compute_s: float = 0.0
    batches: int = 0


@dataclass(eq=False)
class QueueEntry(Generic[T, R]):
    request: BatchRequest[T, R]
    index: int
    enqueued: float


Answers = list[tuple[BatchRequest[T, R], Completed[R]]]


def store_outputs(batch: list[QueueEntry[T, R]], outputs: list[R], elapsed: float) -> Answers[T, R]:
    """Put a batch's outputs in their requests (under the batcher's lock); return those now complete."""
    for request in {e.request for e in batch}:
        request.compute_s += elapsed
        request.batches += 1
    complete: Answers[T, R] = []
    for entry, output in zip(batch, outputs, strict=True):
        request = entry.request
        request.outputs[entry.index] = output
        request.remaining -= 1
        if request.remaining == 0 and request.started is not None:
            outputs_in_order = cast(list[R], list(request.outputs))  # all filled by now
            queue_s = request.started - request.submitted
            complete.append(
                (request, Completed(outputs_in_order, queue_s, request.compute_s, request.batches))
            )
    return complete


def expired_requests(entries: Iterable[QueueEntry[T, R]], now: float) -> set[BatchRequest[T, R]]:
    """The requests among queued entries whose deadline (a ``time.monotonic()`` value) is ``now`` or past."""
    return {e.request for e in entries if e.request.deadline is not None and e.request.deadline <= now}


def deliver(answers: Answers[T, R]) -> None:
    """Resolve completed requests' futures (outside the lock: their callbacks may take it)."""
    for request, result in answers:
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            request.future.set_result(result)


def settle(future: Future[Completed[R]], exc: Exception) -> None:
    """Fail a future unless it is already done (cancelled, answered, or failed by another batch)."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def outcome_of(future: Future[Completed[R]]) -> ImageOutcome:
    if future.cancelled():
        return "cancelled"
    return "expired" if isinstance(future.exception(), DeadlineExceeded) else "failed"
