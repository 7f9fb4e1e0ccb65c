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
* It reports what happens to a :class:`~app.service.batch_observer.BatchObserver`; it knows no metrics.

All bookkeeping shared between workers (requests' outputs and counters, the rate and safe-size estimates,
the queue) changes under the one condition lock; ``fn`` runs outside it, and futures are resolved outside
it too (their callbacks may take it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from app.errors import (
    DDMError,
    DeadlineExceeded,
    DeviceOutOfMemory,
    EngineFailure,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)
from app.service.batch_observer import BatchObserver, NoObserver
from app.service.batch_requests import (
    Answers,
    BatchRequest,
    Completed,
    QueueEntry,
    deliver,
    expired_requests,
    outcome_of,
    settle,
    store_outputs,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class DynamicBatcher(Generic[T, R]):
    """Queue items from many requests and run them through ``fn`` in batches on worker threads."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_items: int,
        observer: BatchObserver | None = None,
        name: str = "model",
        instances: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue_items < 1 or max_batch_delay_s < 0 or instances < 1:
            raise ValueError("max_batch_size, max_queue_items and instances must be >= 1, the delay >= 0")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_items = max_queue_items
        self.observer: BatchObserver = observer if observer is not None else NoObserver()
        self.name = name
        self.instances = instances
        self._queue: deque[QueueEntry[T, R]] = deque()
        self._cond = threading.Condition()  # RLock inside: future callbacks may re-enter from this thread
        self._closed = False
        self._deadline_cap: float | None = None  # set when draining: no request outlives the drain
        self._safe_size = max_batch_size
        self._rate = 0.0  # items/s of one instance, moving average over batches (for Retry-After)
        self._threads: list[threading.Thread] = []
        self.observer.configured(instances, max_batch_size)

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
        request: BatchRequest[T, R] = BatchRequest(items, deadline, now, outputs=[None] * n, remaining=n)
        with self._cond:
            if self._closed:
                raise ModelNotReady("the service is shutting down")
            if len(self._queue) + n > self.max_queue_items:
                self.observer.images_done("refused", n)
                raise Overloaded(
                    f"queue full ({len(self._queue)} of {self.max_queue_items} images waiting)",
                    retry_after_s=self._retry_after(n),
                )
            self._queue.extend(QueueEntry(request, i, now) for i in range(n))
            self.observer.queue_changed(len(self._queue))
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
                error = DeadlineExceeded(f"no result within the request deadline ({len(items)} images)")
                settle(future, error)
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
            self.observer.images_done("failed", len(dropped))
        for request in {e.request for e in dropped}:
            settle(request.future, ModelNotReady("the service shut down before this request was computed"))
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _forget(self, request: BatchRequest[T, R]) -> None:
        """Done callback: a request that ended early (cancelled, expired, failed) leaves the queue."""
        future = request.future
        if not future.cancelled() and future.exception() is None:
            return
        with self._cond:
            before = len(self._queue)
            self._queue = deque(e for e in self._queue if e.request is not request)
            dropped = before - len(self._queue)
            if dropped:
                self.observer.queue_changed(len(self._queue))
                self.observer.images_done(outcome_of(future), dropped)

    def _take(self, limit: int) -> list[QueueEntry[T, R]]:
        """Up to ``limit`` live entries off the queue (a request cancelled a moment ago may still be
        there until its callback gets the lock; its entries are skipped, never computed)."""
        batch: list[QueueEntry[T, R]] = []
        while self._queue and len(batch) < limit:
            entry = self._queue.popleft()
            if entry.request.future.done():
                self.observer.images_done(outcome_of(entry.request.future), 1)
            else:
                batch.append(entry)
        self.observer.queue_changed(len(self._queue))
        return batch

    def _take_all(self) -> list[QueueEntry[T, R]]:
        entries = list(self._queue)
        self._queue.clear()
        self.observer.queue_changed(0)
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

    def _next_batch(self) -> list[QueueEntry[T, R]] | None:
        """Block until a batch closes (size or delay), or return None once closed and empty."""
        while True:
            with self._cond:
                expired = expired_requests(self._queue, time.monotonic())
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
                    expired = expired_requests(self._queue, time.monotonic())
            for request in expired:  # outside the lock: their done callbacks take it
                settle(request.future, DeadlineExceeded("the deadline passed while the request was queued"))

    def _execute(self, batch: list[QueueEntry[T, R]]) -> None:
        started = time.monotonic()
        with self._cond:
            for entry in batch:
                if entry.request.started is None:
                    entry.request.started = started
            self.observer.batch_started([started - entry.enqueued for entry in batch])
        try:
            self._compute(batch)
        finally:
            with self._cond:
                self.observer.batch_finished()

    def _compute(self, batch: list[QueueEntry[T, R]]) -> None:
        """Run one batch and answer its requests; on device OOM split it in halves and retry each."""
        t0 = time.monotonic()
        try:
            outputs = self._call_model(batch)
        except DeviceOutOfMemory as exc:
            if len(batch) == 1:
                self._fail_batch(batch, exc)
            else:
                self._split(batch)
            return
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        deliver(self._record(batch, outputs, time.monotonic() - t0))

    def _call_model(self, batch: list[QueueEntry[T, R]]) -> list[R]:
        items = [e.request.items[e.index] for e in batch]
        outputs = list(self._fn(items))
        if len(outputs) != len(items):
            raise EngineFailure(f"engine returned {len(outputs)} results for a batch of {len(items)}")
        return outputs

    def _split(self, batch: list[QueueEntry[T, R]]) -> None:
        """Out of device memory: lower the batch limit to the half that is tried next, run both halves."""
        half = len(batch) // 2
        with self._cond:
            self._safe_size = min(self._safe_size, half)
            self.observer.batch_split(self._safe_size)
        log.warning("device out of memory on a batch of %d; retrying as %d + %d", len(batch), half,
                    len(batch) - half)  # fmt: skip
        self._compute(batch[:half])
        self._compute(batch[half:])

    def _record(self, batch: list[QueueEntry[T, R]], outputs: list[R], elapsed: float) -> Answers[T, R]:
        """Book a computed batch: report it, update the rate, store its outputs in their requests; the
        requests now complete are returned (to be answered outside the lock)."""
        with self._cond:  # another worker may be finishing a batch of the same request right now
            self.observer.batch_computed(len(batch), elapsed)
            self.observer.images_done("scored", len(batch))
            self._measure_rate(len(batch), elapsed)
            return store_outputs(batch, outputs, elapsed)

    def _measure_rate(self, images: int, elapsed: float) -> None:
        """Moving average of one instance's images/s, the base of the Retry-After estimate."""
        if elapsed > 0:
            rate = images / elapsed
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate

    def _fail_batch(self, batch: list[QueueEntry[T, R]], exc: Exception) -> None:
        requests = {e.request for e in batch}
        log.error("batch of %d failed (%d requests): %s", len(batch), len(requests), exc,
                  exc_info=not isinstance(exc, DDMError))  # fmt: skip
        self.observer.images_done("failed", len(batch))
        error = exc if isinstance(exc, DDMError) else EngineFailure("the engine failed on this batch")
        for request in requests:
            settle(request.future, error)
