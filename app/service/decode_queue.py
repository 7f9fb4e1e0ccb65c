"""Decoding admitted against its own bounded queue, shared fairly between requests.

Decoding is CPU work on a few threads (``DDM_DECODE_THREADS``), before an image reaches the model's queue.
Two things keep one client's expensive images from costing another client its deadline:

- **A bound.** At most ``max_images`` images are admitted (waiting or being decoded) at a time; a request
  that does not fit is refused at once with :class:`Overloaded` (503 + ``Retry-After``) rather than
  queued behind work it could not outwait. An image counts until its decode has finished on its thread,
  even when its request has given up: a decode that runs cannot be interrupted, and the thread is busy.
  A request larger than the bound is admitted only into an empty queue.
- **Fair order.** Each request's images form a group; a free thread takes the next image of the group
  that has had the fewest images started (ties: the older request). A request with one ordinary image
  waits for the decodes already running, not for every image queued before it.

Jobs a request no longer wants (deadline passed, client gone) are cancelled while they wait and never run.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from app.errors import Overloaded

_EWMA = 0.2  # weight of the newest decode time in the running mean behind Retry-After


@dataclass
class _Group:
    """One request's jobs: (function, its future) in request order."""

    arrival: int
    jobs: deque[tuple[Callable[[], Any], Future[Any]]] = field(default_factory=deque)
    started: int = 0


class DecodeQueue:
    def __init__(self, threads: int, max_images: int, name: str = "decode") -> None:
        self.threads = threads
        self.max_images = max_images
        self._lock = threading.Condition()
        self._groups: list[_Group] = []
        self._admitted = 0  # images waiting or being decoded
        self._mean_s = 0.05  # running mean of one job's seconds (first guess: a small image)
        self._arrivals = itertools.count()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def admitted(self) -> int:
        """Images waiting or being decoded now."""
        return self._admitted

    def submit(self, jobs: Sequence[Callable[[], Any]], *, bounded: bool = True) -> list[Future[Any]]:
        """Queue one request's jobs as a group; raise Overloaded when ``bounded`` and they do not fit.

        ``bounded=False`` is for work of a request already admitted (heat maps after the model): refusing
        it then would waste the compute already spent."""
        futures: list[Future[Any]] = [Future() for _ in jobs]
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode queue is closed")
            waiting = self._admitted
            if bounded and waiting > 0 and waiting + len(jobs) > self.max_images:
                retry = max(1, math.ceil(waiting * self._mean_s / self.threads))
                raise Overloaded(
                    f"the decode queue is full: {waiting} images admitted, {len(jobs)} more would pass "
                    f"the bound of {self.max_images} (DDM_MAX_DECODE_QUEUE_IMAGES)",
                    retry_after_s=retry,
                )
            self._admitted += len(jobs)
            group = _Group(next(self._arrivals))
            for job, future in zip(jobs, futures, strict=True):
                future.add_done_callback(self._release)  # once per job: finished, failed or cancelled
                group.jobs.append((job, future))
            if group.jobs:
                self._groups.append(group)
                self._lock.notify(len(group.jobs))
        return futures

    async def run(self, jobs: Sequence[Callable[[], Any]], *, bounded: bool = True) -> list[Any]:
        """Submit and await the jobs; results (or the exceptions they raised) in order. Cancelling the
        caller cancels the jobs that have not started."""
        futures = [asyncio.wrap_future(f) for f in self.submit(jobs, bounded=bounded)]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    def close(self) -> None:
        """Cancel what waits; workers exit once their running job is done."""
        with self._lock:
            self._closed = True
            pending = [future for group in self._groups for _, future in group.jobs]
            self._groups.clear()
            self._lock.notify_all()
        for future in pending:
            future.cancel()

    def _release(self, future: Future[Any]) -> None:
        with self._lock:
            self._admitted -= 1

    def _next(self) -> tuple[Callable[[], Any], Future[Any]] | None:
        """The next job, fair between requests; None once closed."""
        with self._lock:
            while not self._groups:
                if self._closed:
                    return None
                self._lock.wait()
            group = min(self._groups, key=lambda g: (g.started, g.arrival))
            job = group.jobs.popleft()
            group.started += 1
            if not group.jobs:
                self._groups.remove(group)
            return job

    def _work(self) -> None:
        while (item := self._next()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue  # its request gave up while it waited
            started = time.monotonic()
            try:
                result = job()
            except BaseException as exc:  # handed to the request, which decides what it means
                future.set_exception(exc)
            else:
                future.set_result(result)
            with self._lock:
                self._mean_s += _EWMA * (time.monotonic() - started - self._mean_s)
