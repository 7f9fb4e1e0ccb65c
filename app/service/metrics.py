"""Every Prometheus collector the service exports, on a registry passed in (a fresh one per app).

Label values are bounded: endpoints are route templates, outcomes and reasons are fixed sets, profiles are
limited to those that exist on disk (profile names are validated and their count is capped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from app.service.batch_observer import ImageOutcome

# Multi-second requests on CPU: buckets reach two minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
# Scores of the shipped model: normal faces -38 to -12 (1st to 99th percentile, median -33), the default
# threshold -22, anomalies far above.
# 2.5-wide buckets across that region resolve where the threshold cuts (DDM_SCORE_BUCKETS for other models).
SCORE_BUCKETS = (
    -60, -50, -45, -40, -37.5, -35, -32.5, -30, -27.5, -25, -22.5, -20, -17.5, -15, -10, -5,
    0, 10, 20, 50, 100, 200, 500, 1000,
)  # fmt: skip
# The routes that score images: the error ratio and latency panels are over these only (health probes,
# /metrics scrapes and the pages would dilute them); their 5xx series exist from start-up at 0.
SCORING_ENDPOINTS = (
    "/v1/score",
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{model_version}/infer",
)
STATIC_ENDPOINT = "static"  # the label of every file under the pages' static mounts (bounded: one value)

VERDICTS = ("normal", "anomaly", "non_finite")  # anomaly_verdicts_total{verdict}
REFUSAL_REASONS = (
    "queue_full",
    "timeout",
    "bad_input",
    "too_large",
    "unsupported_media_type",
    "unauthorized",
    "forbidden",
    "not_ready",
    "not_found",
    "validation",
    "engine_error",
    "cancelled",
)


class Metrics:
    """Named collectors. Names and labels here are the contract the dashboards and alerts are built on."""

    def __init__(
        self, registry: CollectorRegistry | None = None, score_buckets: Sequence[float] = SCORE_BUCKETS
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http_collectors(self.registry)
        self._batch_collectors(self.registry)
        self._device_collectors(self.registry)
        self._verdict_collectors(self.registry, score_buckets)
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds ... (Linux /proc; none elsewhere)
        self.process = ProcessCollector(registry=self.registry)
        # series a dashboard divides or sums exist from start-up at 0, so a healthy service reads 0, not
        # "no data"
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason=reason)
        for endpoint in SCORING_ENDPOINTS:
            self.requests.labels(endpoint=endpoint, code="500")

    def _http_collectors(self, r: CollectorRegistry) -> None:
        """Requests as the HTTP layer sees them: counts, refusals, latency, in flight."""
        self.requests = Counter(
            "anomaly_requests", "HTTP requests by route and status code", ["endpoint", "code"], registry=r
        )
        self.refusals = Counter("anomaly_refusals", "Refused requests by reason", ["reason"], registry=r)
        self.request_latency = Histogram(
            "anomaly_request_latency_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight_requests = Gauge(
            "anomaly_inflight_requests",
            "HTTP requests being handled (health and metrics included)",
            registry=r,
        )

    def _batch_collectors(self, r: CollectorRegistry) -> None:
        """Images and batches as the batcher reports them (through :class:`BatchMetrics`)."""
        self.images = Counter(
            "anomaly_images",
            "Images by outcome (scored, refused, failed, cancelled, expired)",
            ["outcome"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "anomaly_queue_wait_seconds",
            "Time an image waits in the queue before its batch starts",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "anomaly_batch_compute_seconds",
            "Model time per batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "anomaly_batch_size", "Images per executed batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queued_images = Gauge("anomaly_queue_images", "Images waiting in the queue", registry=r)
        self.inflight_batches = Gauge("anomaly_inflight_batches", "Batches being computed", registry=r)
        self.safe_batch_size = Gauge(
            "anomaly_safe_batch_size", "Largest batch size known to fit device memory", registry=r
        )
        self.model_instances = Gauge(
            "anomaly_model_instances",
            "Batcher workers each running model batches concurrently (DDM_MODEL_INSTANCES)",
            registry=r,
        )
        self.oom_splits = Counter(
            "anomaly_oom_splits", "Batches split after device out-of-memory", registry=r
        )

    def _device_collectors(self, r: CollectorRegistry) -> None:
        """The loaded model and the device it runs on."""
        self.device_memory = Gauge(
            "anomaly_device_memory_bytes",
            "Device memory (CUDA allocated/reserved; process RSS on CPU)",
            ["kind"],
            registry=r,
        )
        self.model_info = Gauge(
            "anomaly_model_info",
            "Loaded model (value 1)",
            ["model_id", "device", "dtype", "runtime", "method"],
            registry=r,
        )
        self.ready = Gauge("anomaly_ready", "1 when the model is loaded and warmed up", registry=r)

    def _verdict_collectors(self, r: CollectorRegistry, score_buckets: Sequence[float]) -> None:
        """What the profiles judged: scores, verdicts, the expected false-positive rate."""
        self.scores = Histogram(
            "anomaly_score",
            "Anomaly scores (-log density) by profile",
            ["profile"],
            buckets=tuple(score_buckets),
            registry=r,
        )
        self.verdicts = Counter("anomaly_verdicts", "Verdicts by profile", ["profile", "verdict"], registry=r)
        self.profile_default_fpr = Gauge(
            "anomaly_profile_default_fpr",
            "The calibrated false-positive rate of a profile's deciding threshold (the expected anomaly "
            "rate on normal inputs; set when the profile judges a request)",
            ["profile"],
            registry=r,
        )

    def forget_profile(self, name: str) -> None:
        """Drop a deleted profile's series: label values stay bounded by the profiles on disk."""
        series: list[tuple[Histogram | Counter | Gauge, tuple[str, ...]]] = [
            (self.scores, (name,)),
            (self.profile_default_fpr, (name,)),
            *((self.verdicts, (name, verdict)) for verdict in VERDICTS),
        ]
        for family, labels in series:
            with contextlib.suppress(KeyError):  # never touched
                family.remove(*labels)

    def refuse(self, reason: str) -> None:
        """Count a refusal; unknown reasons are folded into ``bad_input`` to keep labels bounded."""
        self.refusals.labels(reason=reason if reason in REFUSAL_REASONS else "bad_input").inc()


class BatchMetrics:
    """The batcher's events (:class:`app.service.batch_observer.BatchObserver`) as ``anomaly_*`` metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def configured(self, instances: int, safe_batch_size: int) -> None:
        self.metrics.safe_batch_size.set(safe_batch_size)
        self.metrics.model_instances.set(instances)

    def queue_changed(self, queued_images: int) -> None:
        self.metrics.queued_images.set(queued_images)

    def images_done(self, outcome: ImageOutcome, count: int) -> None:
        self.metrics.images.labels(outcome=outcome).inc(count)

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        for wait in queue_waits:
            self.metrics.queue_wait.observe(wait)
        self.metrics.inflight_batches.inc()

    def batch_computed(self, size: int, seconds: float) -> None:
        self.metrics.batch_compute.observe(seconds)
        self.metrics.batch_size.observe(size)

    def batch_split(self, safe_batch_size: int) -> None:
        self.metrics.safe_batch_size.set(safe_batch_size)
        self.metrics.oom_splits.inc()

    def batch_finished(self) -> None:
        self.metrics.inflight_batches.dec()
