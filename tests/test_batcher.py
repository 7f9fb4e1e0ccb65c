"""The batcher's contract (app/service/batcher.py docstring), with a fake scoring function and no model.
What it reports goes to a recording observer; two tests check the service's Metrics-backed observer.

A gate (threading.Event) holds the worker inside a batch so the tests decide what is queued meanwhile;
with several model instances, barriers and events order the workers. Nothing here depends on how fast
the machine is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from app.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    EngineFailure,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)
from app.service.batch_observer import BatchObserver, ImageOutcome
from app.service.batcher import DynamicBatcher
from app.service.metrics import BatchMetrics, Metrics
from tests.helpers import metric_value, until

WAIT = 10.0  # generous bound on waits for the worker thread; never reached when things work


class FakeEngine:
    """Doubles numbers; records each batch and the thread it ran on; optionally held at a gate."""

    def __init__(self, oom_above: int | None = None, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a batch has started (worker is inside fn)
        self.calls = threading.Semaphore(0)  # released once per call: counts workers inside fn
        self.oom_above = oom_above
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.entered.set()
        self.calls.release()
        assert self.gate.wait(WAIT)
        if self.oom_above is not None and len(items) > self.oom_above:
            raise DeviceOutOfMemory(f"fake OOM on {len(items)}")
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        self.batches.append(list(items))
        return [2 * x for x in items]

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    @property
    def seen(self) -> list[int]:
        return [x for batch in self.batches for x in batch]


class Recorder:
    """A plain observer: keeps what the batcher reported (its own lock: some events come outside the
    batcher's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.instances = 0
        self.safe_batch_size = 0
        self.queued = 0
        self.images: Counter[str] = Counter()
        self.queue_waits: list[float] = []
        self.batch_sizes: list[int] = []
        self.splits = 0
        self.inflight = 0

    def configured(self, instances: int, safe_batch_size: int) -> None:
        with self._lock:
            self.instances, self.safe_batch_size = instances, safe_batch_size

    def queue_changed(self, queued_images: int) -> None:
        with self._lock:
            self.queued = queued_images

    def images_done(self, outcome: ImageOutcome, count: int) -> None:
        with self._lock:
            self.images[outcome] += count

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        with self._lock:
            self.queue_waits.extend(queue_waits)
            self.inflight += 1

    def batch_computed(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_sizes.append(size)

    def batch_split(self, safe_batch_size: int) -> None:
        with self._lock:
            self.safe_batch_size = safe_batch_size
            self.splits += 1

    def batch_finished(self) -> None:
        with self._lock:
            self.inflight -= 1


def make(
    engine: Callable[[list[int]], Sequence[int]], observer: BatchObserver | None = None, **kwargs: float
) -> DynamicBatcher[int, int]:
    options = {"max_batch_size": 4, "max_batch_delay_s": 0.005, "max_queue_items": 16, **kwargs}
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        engine,
        max_batch_size=int(options["max_batch_size"]),
        max_batch_delay_s=float(options["max_batch_delay_s"]),
        max_queue_items=int(options["max_queue_items"]),
        observer=observer if observer is not None else Recorder(),
        instances=int(options.get("instances", 1)),
    )
    batcher.start()
    return batcher


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def batcher(engine: FakeEngine) -> Iterator[DynamicBatcher[int, int]]:
    b = make(engine)
    yield b
    engine.gate.set()
    b.close(drain=False, timeout=WAIT)


def busy(engine: FakeEngine, batcher: DynamicBatcher[int, int]):  # type: ignore[no-untyped-def]
    """Occupy the worker with one batch [-1] held at the gate; returns that request's future."""
    engine.hold()
    future = batcher.submit([-1])
    assert engine.entered.wait(WAIT)
    return future


def seen(batcher: DynamicBatcher[int, int]) -> Recorder:
    """What the batcher reported to its recording observer."""
    assert isinstance(batcher.observer, Recorder)
    return batcher.observer


def with_metrics(engine: Callable[[list[int]], Sequence[int]], **kwargs: float) -> DynamicBatcher[int, int]:
    """A batcher reporting to the service's Metrics-backed observer (a fresh registry)."""
    return make(engine, BatchMetrics(Metrics(CollectorRegistry())), **kwargs)


def sample(batcher: DynamicBatcher[int, int], name: str, **labels: str) -> float:
    """A sample of the batcher's metrics registry; a missing series fails (tests/helpers.py: metric_value)."""
    assert isinstance(batcher.observer, BatchMetrics)
    return metric_value(generate_latest(batcher.observer.metrics.registry).decode(), name, **labels)


def test_results_in_order_and_batches_never_empty_or_oversized(engine) -> None:
    batcher = make(engine, max_queue_items=64)
    futures = [batcher.submit(list(range(10 * i, 10 * i + n))) for i, n in enumerate((1, 3, 7, 2, 9))]
    for i, (future, n) in enumerate(zip(futures, (1, 3, 7, 2, 9), strict=True)):
        assert future.result(WAIT).outputs == [2 * x for x in range(10 * i, 10 * i + n)]
    assert all(1 <= len(b) <= 4 for b in engine.batches)
    assert sorted(engine.seen) == sorted(
        x for i, n in enumerate((1, 3, 7, 2, 9)) for x in range(10 * i, 10 * i + n)
    )
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads
    batcher.close(timeout=WAIT)


def test_full_batch_closes_without_waiting_for_the_delay(engine) -> None:
    b = make(engine, max_batch_delay_s=3600.0)  # only size can close a batch here
    try:
        assert b.submit([1, 2, 3, 4]).result(WAIT).outputs == [2, 4, 6, 8]
        assert engine.batches == [[1, 2, 3, 4]]
    finally:
        b.close(drain=False, timeout=WAIT)


def test_partial_batch_closes_after_the_delay(engine, batcher) -> None:
    assert batcher.submit([5]).result(WAIT).outputs == [10]
    assert engine.batches == [[5]]


def test_items_arriving_within_the_delay_share_a_batch(engine) -> None:
    """A partial batch stays open for the delay: a second item 50 ms after the first joins it (a batch that
    closed at once would compute them apart)."""
    b = make(engine, max_batch_delay_s=0.3)
    try:
        t0 = time.monotonic()
        first = b.submit([1])
        time.sleep(0.05)
        second = b.submit([2])
        assert first.result(WAIT).outputs == [2] and second.result(WAIT).outputs == [4]
        assert engine.batches == [[1, 2]]
        assert first.result().batches == 1 and second.result().batches == 1
        assert time.monotonic() - t0 >= 0.3 * 0.95  # it waited for the delay (the size never filled it)
    finally:
        b.close(drain=False, timeout=WAIT)


def test_a_lone_item_waits_for_the_delay_then_runs_alone(engine) -> None:
    b = make(engine, max_batch_delay_s=0.2)
    try:
        t0 = time.monotonic()
        done = b.submit([7]).result(WAIT)
        waited = time.monotonic() - t0
        assert done.outputs == [14] and engine.batches == [[7]]
        assert 0.2 * 0.95 <= waited < WAIT
        assert done.queue_s >= 0.2 * 0.95  # the queue time reports the wait
    finally:
        b.close(drain=False, timeout=WAIT)


def test_concurrent_requests_share_a_batch(engine, batcher) -> None:
    first = busy(engine, batcher)
    waiting = [batcher.submit([x]) for x in (1, 2, 3)]
    engine.gate.set()
    assert [f.result(WAIT).outputs for f in waiting] == [[2], [4], [6]]
    assert first.result(WAIT).outputs == [-2]
    assert engine.batches == [[-1], [1, 2, 3]]
    assert seen(batcher).batch_sizes == [1, 3]


def test_large_request_spreads_over_batches_and_is_answered_once(engine, batcher) -> None:
    done = batcher.submit(list(range(10))).result(WAIT)
    assert done.outputs == [2 * x for x in range(10)]
    assert [len(b) for b in engine.batches] == [4, 4, 2]
    assert done.batches == 3 and done.compute_s >= 0 and done.queue_s >= 0


def test_queue_full_refuses_at_once_with_retry_after(engine, batcher) -> None:
    first = busy(engine, batcher)
    accepted = batcher.submit(list(range(12)))
    with pytest.raises(Overloaded) as refused:
        batcher.submit(list(range(5)))  # 12 + 5 > 16
    assert refused.value.retry_after_s >= 1
    assert batcher.queued == 12  # the refused request left nothing behind
    assert seen(batcher).images["refused"] == 5
    fits = batcher.submit(list(range(4)))  # exactly full is fine
    engine.gate.set()
    assert len(accepted.result(WAIT).outputs) == 12 and len(fits.result(WAIT).outputs) == 4
    assert first.result(WAIT).outputs == [-2]


def test_request_larger_than_the_queue_is_too_large(batcher) -> None:
    with pytest.raises(PayloadTooLarge):
        batcher.submit(list(range(17)))


def test_empty_request_needs_no_batch(engine, batcher) -> None:
    assert batcher.submit([]).result(WAIT).outputs == []
    assert engine.batches == []


async def test_deadline_gives_deadline_exceeded_and_costs_no_compute(engine, batcher) -> None:
    busy(engine, batcher)
    with pytest.raises(DeadlineExceeded):
        await batcher.run([7, 8], deadline=time.monotonic() + 0.05)
    assert batcher.queued == 0
    engine.gate.set()
    assert batcher.submit([9]).result(WAIT).outputs == [18]
    assert 7 not in engine.seen and 8 not in engine.seen
    assert seen(batcher).images["expired"] == 2


def test_deadline_checked_by_the_worker_for_plain_futures(engine, batcher) -> None:
    busy(engine, batcher)
    future = batcher.submit([7], deadline=time.monotonic() + 0.01)
    time.sleep(0.02)  # only needs to be past the deadline; the worker is held at the gate anyway
    engine.gate.set()
    with pytest.raises(DeadlineExceeded):
        future.result(WAIT)
    assert 7 not in engine.seen


def test_past_deadline_is_refused_before_queueing(batcher) -> None:
    with pytest.raises(DeadlineExceeded):
        batcher.submit([1], deadline=time.monotonic() - 1)


async def test_cancelled_caller_is_dropped_before_compute(engine, batcher) -> None:
    busy(engine, batcher)
    task = asyncio.ensure_future(batcher.run([7, 8, 9]))
    end = time.monotonic() + WAIT
    while batcher.queued < 3:
        assert time.monotonic() < end, "the request never reached the queue"
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert batcher.queued == 0
    engine.gate.set()
    assert batcher.submit([1]).result(WAIT).outputs == [2]
    assert not {7, 8, 9} & set(engine.seen)
    assert seen(batcher).images["cancelled"] == 3


def test_error_fails_only_its_batch_and_the_worker_keeps_serving(engine) -> None:
    engine.fail_on = 13
    b = make(engine)
    try:
        first = busy(engine, b)
        doomed = [b.submit([x]) for x in (11, 12, 13, 14)]  # one batch of four, 13 breaks it
        later = [b.submit([x]) for x in (21, 22)]  # the next batch
        engine.gate.set()
        assert first.result(WAIT).outputs == [-2]
        for future in doomed:
            with pytest.raises(EngineFailure):
                future.result(WAIT)
        assert [f.result(WAIT).outputs for f in later] == [[42], [44]]
        assert b.submit([1]).result(WAIT).outputs == [2]
        assert seen(b).images["failed"] == 4
    finally:
        b.close(drain=False, timeout=WAIT)


def test_request_over_several_batches_fails_whole_and_leaves_the_queue(engine) -> None:
    engine.fail_on = 2
    b = make(engine)
    try:
        future = b.submit(list(range(12)))  # batches [0..3] fails, [4..11] must not be computed
        with pytest.raises(EngineFailure):
            future.result(WAIT)
        assert b.submit([100]).result(WAIT).outputs == [200]
        assert not set(range(4, 12)) & set(engine.seen)
    finally:
        b.close(drain=False, timeout=WAIT)


def test_wrong_output_count_is_an_engine_failure() -> None:
    b: DynamicBatcher[int, int] = DynamicBatcher(
        lambda items: items[:-1], max_batch_size=4, max_batch_delay_s=0.0, max_queue_items=8
    )
    b.start()
    try:
        with pytest.raises(EngineFailure):
            b.submit([1, 2]).result(WAIT)
    finally:
        b.close(timeout=WAIT)


def test_out_of_memory_splits_the_batch_and_remembers_the_safe_size() -> None:
    engine = FakeEngine(oom_above=2)
    b = make(engine, max_batch_size=8, max_queue_items=32)
    try:
        assert b.submit(list(range(8))).result(WAIT).outputs == [2 * x for x in range(8)]
        assert b.safe_batch_size == 2
        assert seen(b).safe_batch_size == 2
        assert seen(b).splits >= 2  # 8 -> 4+4 -> 2+2+2+2
        engine.batches.clear()
        assert b.submit(list(range(6))).result(WAIT).outputs == [2 * x for x in range(6)]
        assert [len(x) for x in engine.batches] == [2, 2, 2]  # no new OOM: the limit is remembered
    finally:
        b.close(timeout=WAIT)


def test_out_of_memory_on_a_single_image_fails_that_request() -> None:
    engine = FakeEngine(oom_above=0)
    b = make(engine)
    try:
        with pytest.raises(DeviceOutOfMemory):
            b.submit([1]).result(WAIT)
    finally:
        b.close(timeout=WAIT)


def test_close_drains_accepted_work_then_refuses(engine, batcher) -> None:
    first = busy(engine, batcher)
    accepted = [batcher.submit([x, x + 1]) for x in (10, 20, 30)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": True, "timeout": WAIT})
    closer.start()
    until(lambda: batcher.closed, "close() to take effect", WAIT)
    with pytest.raises(ModelNotReady):
        batcher.submit([1])
    engine.gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert first.result(0).outputs == [-2]
    assert [f.result(0).outputs for f in accepted] == [[20, 22], [40, 42], [60, 62]]


def test_close_without_drain_fails_queued_work(engine, batcher) -> None:
    busy(engine, batcher)
    queued = batcher.submit([1, 2])
    batcher.close(drain=False, timeout=0)
    with pytest.raises(ModelNotReady):
        queued.result(WAIT)
    engine.gate.set()


def test_metrics_move_with_the_work(engine) -> None:
    batcher = with_metrics(engine)
    try:
        for n in (1, 4, 6):
            batcher.submit(list(range(n))).result(WAIT)
        m = batcher
        assert sample(m, "anomaly_images_total", outcome="scored") == 11
        assert sample(m, "anomaly_batch_size_count") == len(engine.batches)
        assert sample(m, "anomaly_batch_size_sum") == 11
        assert sample(m, "anomaly_queue_wait_seconds_count") == 11
        assert sample(m, "anomaly_queue_images") == 0
        assert sample(m, "anomaly_inflight_batches") == 0
    finally:
        batcher.close(timeout=WAIT)


def test_metrics_count_splits_refusals_and_instances() -> None:
    """The Metrics-backed observer puts the other events under their ``anomaly_*`` names."""
    engine = FakeEngine(oom_above=2)
    b = with_metrics(engine, instances=2, max_batch_size=8, max_queue_items=32)
    try:
        assert sample(b, "anomaly_model_instances") == 2 and sample(b, "anomaly_safe_batch_size") == 8
        assert b.submit(list(range(8))).result(WAIT).outputs == [2 * x for x in range(8)]
        assert sample(b, "anomaly_safe_batch_size") == 2
        assert sample(b, "anomaly_oom_splits_total") >= 2  # 8 -> 4+4 -> 2+2+2+2
    finally:
        b.close(timeout=WAIT)
    engine = FakeEngine()
    b = with_metrics(engine)
    try:
        running = busy(engine, b)  # the only worker held: nothing leaves the queue meanwhile
        queued = b.submit(list(range(12)))
        with pytest.raises(Overloaded):
            b.submit(list(range(5)))  # 12 + 5 > 16
        assert sample(b, "anomaly_images_total", outcome="refused") == 5
        assert sample(b, "anomaly_queue_images") == 12
        engine.gate.set()
        assert running.result(WAIT).outputs == [-2] and len(queued.result(WAIT).outputs) == 12
    finally:
        engine.gate.set()
        b.close(timeout=WAIT)


# --- several model instances (worker threads sharing one queue) -----------------------------------------


def test_two_instances_run_two_batches_at_the_same_time() -> None:
    both_inside = threading.Barrier(2, timeout=WAIT / 2)  # one worker alone would break it
    threads: set[int] = set()

    def fn(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        both_inside.wait()
        return [2 * x for x in items]

    b = make(fn, max_batch_size=2, max_batch_delay_s=3600.0, max_queue_items=8, instances=2)
    try:
        first, second = b.submit([1, 2]), b.submit([3, 4])  # two full batches: no delay involved
        assert first.result(WAIT).outputs == [2, 4] and second.result(WAIT).outputs == [6, 8]
        assert len(threads) == 2
        assert seen(b).instances == 2
    finally:
        b.close(timeout=WAIT)


def test_request_over_batches_of_different_instances_keeps_request_order() -> None:
    later_batch_done = threading.Event()
    finished: list[int] = []  # first item of each batch, in the order the batches finished
    threads: dict[int, int] = {}

    def fn(items: list[int]) -> list[int]:
        threads[items[0]] = threading.get_ident()
        if items[0] == 0:  # the request's first batch finishes only after its second one
            assert later_batch_done.wait(WAIT)
        finished.append(items[0])
        if items[0] == 4:
            later_batch_done.set()
        return [2 * x for x in items]

    b = make(fn, max_batch_size=4, max_batch_delay_s=0.0, max_queue_items=16, instances=2)
    try:
        done = b.submit(list(range(10))).result(WAIT)
        assert done.outputs == [2 * x for x in range(10)]
        assert done.batches == 3
        assert finished.index(4) < finished.index(0)
        assert threads[0] != threads[4]
    finally:
        b.close(timeout=WAIT)


def test_close_drains_with_every_instance_busy_and_stops_them_all() -> None:
    engine = FakeEngine()
    b = make(engine, instances=3, max_batch_size=1)
    engine.hold()
    running = [b.submit([x]) for x in (-1, -2, -3)]
    for _ in range(3):  # all three workers held at the gate
        assert engine.calls.acquire(timeout=WAIT)
    queued = [b.submit([x, x + 1]) for x in (10, 20, 30, 40)]
    closer = threading.Thread(target=b.close, kwargs={"drain": True, "timeout": WAIT})
    closer.start()
    until(lambda: b.closed, "close() to take effect", WAIT)
    with pytest.raises(ModelNotReady):
        b.submit([1])
    engine.gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert not any(t.is_alive() for t in b._threads) and len(b._threads) == 3
    assert [f.result(0).outputs for f in running] == [[-2], [-4], [-6]]
    assert [f.result(0).outputs for f in queued] == [[20, 22], [40, 42], [60, 62], [80, 82]]
    assert len(engine.threads) == 3


def test_many_requests_on_four_instances_keep_every_count_exact() -> None:
    engine = FakeEngine()
    b = make(engine, instances=4, max_batch_size=3, max_queue_items=512, max_batch_delay_s=0.0)
    try:
        sizes = [1 + (7 * i) % 9 for i in range(60)]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        futures = [b.submit(list(range(s, s + n))) for s, n in zip(starts, sizes, strict=True)]
        for future, s, n in zip(futures, starts, sizes, strict=True):
            assert future.result(WAIT).outputs == [2 * x for x in range(s, s + n)]
        total = sum(sizes)
        assert sorted(engine.seen) == list(range(total))
        assert seen(b).images["scored"] == total
        assert sum(seen(b).batch_sizes) == total
        assert len(seen(b).queue_waits) == total
        # a worker reports its batch finished just after resolving its batch's futures: settle first
        assert b.close(timeout=WAIT)
        assert seen(b).inflight == 0
    finally:
        b.close(timeout=WAIT)


def test_out_of_memory_split_with_two_instances() -> None:
    engine = FakeEngine(oom_above=2)
    b = make(engine, instances=2, max_batch_size=8, max_queue_items=32)
    try:
        futures = [b.submit(list(range(8))), b.submit(list(range(10, 18)))]
        assert futures[0].result(WAIT).outputs == [2 * x for x in range(8)]
        assert futures[1].result(WAIT).outputs == [2 * x for x in range(10, 18)]
        assert b.safe_batch_size == 2
        assert seen(b).safe_batch_size == 2
    finally:
        b.close(timeout=WAIT)


def test_retry_after_counts_every_instance() -> None:
    engine = FakeEngine()
    one, two = make(engine), make(engine, instances=2)
    try:
        for b in (one, two):
            b._rate = 2.0  # images/s of one instance
            b._queue.extend([None] * 8)  # type: ignore[list-item]  # only the length matters here
        assert one._retry_after(8) == 8 and two._retry_after(8) == 4
    finally:
        for b in (one, two):
            b._queue.clear()
            b.close(timeout=WAIT)
