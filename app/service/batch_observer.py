"""What the batcher reports while it works, as events; what they are counted as is the observer's business.

The service wires :class:`app.service.metrics.BatchMetrics` (the ``anomaly_*`` collectors); the batcher
knows neither metric names nor Prometheus. Calls come from ``submit`` callers and worker threads, mostly
while the batcher holds its lock: an observer keeps each call short and never calls back into the batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

# What became of an image: computed, refused at submit (queue full), failed (engine error, shutdown),
# cancelled (client gone) or expired (deadline) before it was computed.
ImageOutcome = Literal["scored", "refused", "failed", "cancelled", "expired"]


class BatchObserver(Protocol):
    def configured(self, instances: int, safe_batch_size: int) -> None:
        """Once, when the batcher is built: its worker count and its starting batch limit."""

    def queue_changed(self, queued_images: int) -> None:
        """The number of images waiting in the queue changed (or was recounted)."""

    def images_done(self, outcome: ImageOutcome, count: int) -> None:
        """``count`` images reached ``outcome``; each image is reported exactly once."""

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        """A worker took a batch: seconds each of its images waited in the queue."""

    def batch_computed(self, size: int, seconds: float) -> None:
        """The model answered a batch of ``size`` images (a split batch reports each part that ran)."""

    def batch_split(self, safe_batch_size: int) -> None:
        """A batch ran out of device memory and is retried in halves; the batch limit is now this."""

    def batch_finished(self) -> None:
        """The batch a ``batch_started`` announced is done (answered, failed or split and retried)."""


class NoObserver:
    """Reports nowhere: the default of a batcher built without an observer."""

    def configured(self, instances: int, safe_batch_size: int) -> None:
        pass

    def queue_changed(self, queued_images: int) -> None:
        pass

    def images_done(self, outcome: ImageOutcome, count: int) -> None:
        pass

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        pass

    def batch_computed(self, size: int, seconds: float) -> None:
        pass

    def batch_split(self, safe_batch_size: int) -> None:
        pass

    def batch_finished(self) -> None:
        pass
