"""The suite's own rules (tests/helpers.py, docs/TESTING.md): a missing tool or data set skips locally and
fails in CI; metric reads fail on a missing series; waits end with a failure, not a hang."""

from __future__ import annotations

import time

import pytest
from _pytest.outcomes import Failed, Skipped
from prometheus_client import CollectorRegistry, generate_latest

from app.service.metrics import Metrics
from tests import helpers


@pytest.mark.parametrize(("in_ci", "outcome"), [(False, Skipped), (True, Failed)])
def test_missing_tool_or_data_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, in_ci: bool, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(helpers, "IN_CI", in_ci)
    with pytest.raises(outcome, match="no-such-tool-19"):
        helpers.require_tool("no-such-tool-19", hint="none")
    monkeypatch.setattr(helpers, "DATA", helpers.REPO / "no-such-data")
    with pytest.raises(outcome, match="needs 3 images"):
        helpers.require_data("celeba", 3)
    assert helpers.require_tool("no-such-tool-19", "python3").endswith("python3")  # the first found


def test_metric_reads_fail_on_a_missing_series() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.images.labels(outcome="scored").inc(3)
    metrics.batch_size.observe(2)
    text = generate_latest(metrics.registry).decode()
    assert helpers.metric_value(text, "anomaly_images_total", outcome="scored") == 3
    assert helpers.metric_value(text, "anomaly_batch_size_count") == 1
    assert helpers.metric_value(text, "anomaly_refusals_total", reason="too_large") == 0  # pre-created
    # a labelled child never touched reads 0: prometheus_client creates it on first use
    assert helpers.metric_value(text, "anomaly_images_total", outcome="refused") == 0
    for name, labels in [
        ("anomaly_image_total", {"outcome": "scored"}),  # renamed metric
        ("anomaly_queue_image", {}),  # renamed gauge
        ("anomaly_batch_size_total", {}),  # an unlabelled series that does not exist
    ]:
        with pytest.raises(AssertionError, match="no series"):
            helpers.metric_value(text, name, **labels)


def test_until_fails_after_its_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match="waiting for the impossible"):
        helpers.until(lambda: False, "the impossible", timeout=0.05)
    assert time.monotonic() - started < 5
    helpers.until(lambda: True, "the obvious", timeout=0.0)
