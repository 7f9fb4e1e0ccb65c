"""Dynamic batching: many requests' items share model calls on worker threads (Triton/Ray Serve style).

Contract of :class:`DynamicBatcher`:

* ``fn(batch) -> outputs`` is called only from the batcher's worker threads, one per model instance
  (``instances``, Triton's ``instance_group { count }``), with ``1 <= len(batch) <= max_batch_size`` items
  (never empty), and must return one output per item, in order. With ``instances > 1``, ``fn`` runs on
  several batches at the same time and must be safe for concurrent calls.
* The workers share one FIFO queue: a free worker takes the next batch that closes. A batch closes when it
  holds ``max_batch_size`` items, or ``max_batch_delay_s`` after its oldest item entered the queue,
  whichever comes first. Workers sleep on a condition; nothing polls.
* The queue holds at most ``max_queue_items`` waiting items. ``submit`` refuses a request that does not
  fit at once with :class:`Overloaded` (carrying a retry-after estimate); nothing waits for room.
* A request with more items than a batch spreads over consecutive batches, which different workers may
  run at the same time and finish in any order; its future resolves once, with all outputs in request
  order (or with the first error).
* A request whose future is cancelled (client gone) or whose deadline passed leaves the queue before any of
  its remaining items are computed; the deadline fails it with :class:`DeadlineExceeded`.
* An exception from ``fn`` fails every request with an item in that batch, and only those. A
  :class:`DeviceOutOfMemory` instead splits the batch in halves and retries them; the size that worked is
  remembered as the new batch limit (``safe_batch_size``) until restart.
* ``close(drain=True)`` refuses new work, computes everything already queued, then stops every worker.

All bookkeeping shared between workers (requests' outputs and counters, the rate and safe-size estimates,
the queue) changes under the one condition lock; ``fn`` runs outside it, and futures are resolved outside
it too (their callbacks may take it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from app.errors import (
    DDMError,
    DeadlineExceeded,
    DeviceOutOfMemory,
    EngineFailure,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)
from app.service.metrics import Metrics

log = logging.getLogger(__name__)

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
class _Request(Generic[T, R]):
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
class _Entry(Generic[T, R]):
    request: _Request[T, R]
    index: int
    enqueued: float


class DynamicBatcher(Generic[T, R]):
    """Queue items from many requests and run them through ``fn`` in batches on ``instances`` worker
    threads."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_items: int,
        metrics: Metrics | None = None,
        name: str = "model",
        instances: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue_items < 1 or max_batch_delay_s < 0 or instances < 1:
            raise ValueError("max_batch_size, max_queue_items and instances must be >= 1, the delay >= 0")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_items = max_queue_items
        self.metrics = metrics if metrics is not None else Metrics()
        self.name = name
        self.instances = instances
        self._queue: deque[_Entry[T, R]] = deque()
        self._cond = threading.Condition()  # RLock inside: future callbacks may re-enter from this thread
        self._closed = False
        self._deadline_cap: float | None = None  # set when draining: no request outlives the drain
        self._safe_size = max_batch_size
        self._rate = 0.0  # items/s of one instance, moving average over batches (for Retry-After)
        self._threads: list[threading.Thread] = []
        self.metrics.safe_batch_size.set(max_batch_size)
        self.metrics.model_instances.set(instances)

    # --- any thread -------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._loop, name=f"batcher-{self.name}-{i}", daemon=True)
                for i in range(self.instances)
            ]
            for thread in self._threads:
                thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def safe_batch_size(self) -> int:
        return self._safe_size

    def cap_deadlines(self, cap: float) -> None:
        """No request, queued or still to come, waits past ``cap`` (a ``time.monotonic()`` value): a drain
        that must end by then answers the work it cannot compute with DeadlineExceeded, not a cut
        connection."""
        with self._cond:
            self._deadline_cap = cap
            for entry in self._queue:
                entry.request.deadline = self._capped(entry.request.deadline)
            self._cond.notify_all()

    def _capped(self, deadline: float | None) -> float | None:
        cap = self._deadline_cap
        if cap is None:
            return deadline
        return cap if deadline is None else min(deadline, cap)

    def submit(self, items: Sequence[T], deadline: float | None = None) -> Future[Completed[R]]:
        """Queue a request's items; the future resolves to :class:`Completed` or raises a domain error.

        ``deadline`` is a ``time.monotonic()`` value. Raises at once (nothing queued) with Overloaded,
        PayloadTooLarge (more items than the queue can ever hold), DeadlineExceeded or ModelNotReady.
        """
        n = len(items)
        if n == 0:
            future: Future[Completed[R]] = Future()
            future.set_result(Completed([], 0.0, 0.0, 0))
            return future
        if n > self.max_queue_items:
            raise PayloadTooLarge(
                f"{n} images in one request; the queue holds at most {self.max_queue_items}"
            )
        now = time.monotonic()
        deadline = self._capped(deadline)
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("request deadline passed before it was queued")
        request: _Request[T, R] = _Request(items, deadline, now, outputs=[None] * n, remaining=n)
        with self._cond:
            if self._closed:
                raise ModelNotReady("the service is shutting down")
            if len(self._queue) + n > self.max_queue_items:
                self.metrics.images.labels(outcome="refused").inc(n)
                raise Overloaded(
                    f"queue full ({len(self._queue)} of {self.max_queue_items} images waiting)",
                    retry_after_s=self._retry_after(n),
                )
            self._queue.extend(_Entry(request, i, now) for i in range(n))
            self.metrics.queued_images.set(len(self._queue))
            self._cond.notify()
        request.future.add_done_callback(lambda _f: self._forget(request))
        return request.future

    async def run(self, items: Sequence[T], deadline: float | None = None) -> Completed[R]:
        """``submit`` and await the result. Past the deadline the request fails with DeadlineExceeded;
        cancelling the caller (client gone) cancels it. Either way it leaves the queue before compute."""
        future = self.submit(items, deadline)
        waiter = asyncio.wrap_future(future)
        deadline = self._capped(deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
            if not done:
                _settle(
                    future, DeadlineExceeded(f"no result within the request deadline ({len(items)} images)")
                )
            return await waiter
        finally:
            future.cancel()  # no-op when done

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Refuse new work; compute what is queued (``drain``) or fail it with ModelNotReady. Returns
        False when the workers did not finish within ``timeout`` seconds (shared by all of them)."""
        with self._cond:
            self._closed = True
            dropped = [] if drain and self._threads else self._take_all()
            self._cond.notify_all()
        if dropped:
            self.metrics.images.labels(outcome="failed").inc(len(dropped))
        for request in {e.request for e in dropped}:
            _settle(request.future, ModelNotReady("the service shut down before this request was computed"))
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _forget(self, request: _Request[T, R]) -> None:
        """Done callback: a request that ended early (cancelled, expired, failed) leaves the queue."""
        future = request.future
        if not future.cancelled() and future.exception() is None:
            return
        with self._cond:
            before = len(self._queue)
            self._queue = deque(e for e in self._queue if e.request is not request)
            dropped = before - len(self._queue)
            if dropped:
                self.metrics.queued_images.set(len(self._queue))
                self.metrics.images.labels(outcome=_outcome(future)).inc(dropped)

    def _take(self, limit: int) -> list[_Entry[T, R]]:
        """Up to ``limit`` live entries off the queue (a request cancelled a moment ago may still be
        there until its callback gets the lock; its entries are skipped, never computed)."""
        batch: list[_Entry[T, R]] = []
        while self._queue and len(batch) < limit:
            entry = self._queue.popleft()
            if entry.request.future.done():
                self.metrics.images.labels(outcome=_outcome(entry.request.future)).inc()
            else:
                batch.append(entry)
        self.metrics.queued_images.set(len(self._queue))
        return batch

    def _take_all(self) -> list[_Entry[T, R]]:
        entries = list(self._queue)
        self._queue.clear()
        self.metrics.queued_images.set(0)
        return entries

    def _retry_after(self, n: int) -> float:
        if self._rate <= 0:
            return 1.0
        # A full queue keeps every instance busy, and each batch's rate was measured while the others ran.
        rate = self._rate * self.instances
        return float(min(60, max(1, math.ceil((len(self._queue) + n) / rate))))

    # --- the worker threads ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Entry[T, R]] | None:
        """Block until a batch closes (size or delay), or return None once closed and empty."""
        while True:
            with self._cond:
                expired = self._expired(time.monotonic())
                while not expired:
                    if not self._queue:
                        if self._closed:
                            return None
                        self._cond.wait()
                    else:
                        limit = min(self.max_batch_size, self._safe_size)
                        wait = self._queue[0].enqueued + self.max_batch_delay_s - time.monotonic()
                        if len(self._queue) >= limit or wait <= 0 or self._closed:
                            batch = self._take(limit)
                            if self._queue:  # submit woke one worker; an idle one may take the rest
                                self._cond.notify()
                            if batch:
                                return batch
                            continue
                        self._cond.wait(timeout=wait)
                    expired = self._expired(time.monotonic())
            for request in expired:  # outside the lock: their done callbacks take it
                _settle(request.future, DeadlineExceeded("the deadline passed while the request was queued"))

    def _expired(self, now: float) -> set[_Request[T, R]]:
        return {
            e.request for e in self._queue if e.request.deadline is not None and e.request.deadline <= now
        }

    def _execute(self, batch: list[_Entry[T, R]]) -> None:
        started = time.monotonic()
        with self._cond:
            for entry in batch:
                self.metrics.queue_wait.observe(started - entry.enqueued)
                if entry.request.started is None:
                    entry.request.started = started
            self.metrics.inflight_batches.inc()
        try:
            self._compute(batch)
        finally:
            with self._cond:
                self.metrics.inflight_batches.dec()

    def _compute(self, batch: list[_Entry[T, R]]) -> None:
        """Run one batch; on device OOM split it in halves and retry each (recursively)."""
        items = [e.request.items[e.index] for e in batch]
        t0 = time.monotonic()
        try:
            outputs = list(self._fn(items))
            if len(outputs) != len(items):
                raise EngineFailure(f"engine returned {len(outputs)} results for a batch of {len(items)}")
        except DeviceOutOfMemory as exc:
            if len(batch) == 1:
                self._fail_batch(batch, exc)
                return
            half = len(batch) // 2
            with self._cond:
                self._safe_size = min(self._safe_size, half)
                self.metrics.safe_batch_size.set(self._safe_size)
                self.metrics.oom_splits.inc()
            log.warning("device out of memory on a batch of %d; retrying as %d + %d", len(batch), half,
                        len(batch) - half)  # fmt: skip
            self._compute(batch[:half])
            self._compute(batch[half:])
            return
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        elapsed = time.monotonic() - t0
        finished: list[tuple[_Request[T, R], Completed[R]]] = []
        with self._cond:  # another worker may be finishing a batch of the same request right now
            self.metrics.batch_compute.observe(elapsed)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.images.labels(outcome="scored").inc(len(batch))
            if elapsed > 0:
                rate = len(batch) / elapsed
                self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
            for request in {e.request for e in batch}:
                request.compute_s += elapsed
                request.batches += 1
            for entry, output in zip(batch, outputs, strict=True):
                request = entry.request
                request.outputs[entry.index] = output
                request.remaining -= 1
                if request.remaining == 0 and request.started is not None:
                    result = Completed(
                        cast(list[R], list(request.outputs)),  # all filled by now
                        request.started - request.submitted,
                        request.compute_s,
                        request.batches,
                    )
                    finished.append((request, result))
        for request, result in finished:
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                request.future.set_result(result)

    def _fail_batch(self, batch: list[_Entry[T, R]], exc: Exception) -> None:
        requests = {e.request for e in batch}
        log.error("batch of %d failed (%d requests): %s", len(batch), len(requests), exc,
                  exc_info=not isinstance(exc, DDMError))  # fmt: skip
        self.metrics.images.labels(outcome="failed").inc(len(batch))
        error = exc if isinstance(exc, DDMError) else EngineFailure("the engine failed on this batch")
        for request in requests:
            _settle(request.future, error)


def _settle(future: Future[Completed[R]], exc: Exception) -> None:
    """Fail a future unless it is already done (cancelled, answered, or failed by another batch)."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def _outcome(future: Future[Completed[R]]) -> str:
    if future.cancelled():
        return "cancelled"
    return "expired" if isinstance(future.exception(), DeadlineExceeded) else "failed"
