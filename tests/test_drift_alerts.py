"""The drift alert (deploy/prometheus/alerts.yml, group ddm-anomaly-drift) under ``promtool test rules``:
the unit tests in deploy/prometheus/alerts.test.yml fire it (20% anomalous against a 5% profile at 600
images an hour; a 1% profile at 5%; non-finite scores counted) and keep it quiet (2x the rate, under the
minimum volume, before 30 minutes, after recovery). The same tests run against weakened copies of the
rule must fail, so they pin the factor, the volume floor and the per-profile comparison."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
UNIT_TESTS = PROMETHEUS / "alerts.test.yml"


def promtool_test(folder: Path) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", hint="Debian package `prometheus`; .ci/run installs it")
    return subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def drift_alert() -> dict:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    (group,) = [g for g in groups if g["name"] == "ddm-anomaly-drift"]
    (alert,) = [r for r in group["rules"] if r.get("alert") == "DdmAnomalyRateDrift"]
    return dict(alert)


def test_drift_alert_unit_tests_pass() -> None:
    result = promtool_test(PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_drift_alert_shape() -> None:
    alert = drift_alert()
    assert alert["for"] == "30m"
    assert "3 * max by (profile) (anomaly_profile_default_fpr)" in alert["expr"]
    assert ">= 100" in alert["expr"]
    assert alert["labels"]["severity"] == "warning"


@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        ("factor 2 instead of 3", "> 3 * max", "> 2 * max"),
        ("no minimum volume", ">= 100", ">= 0"),
        ("fires at once", "for: 30m", "for: 0m"),
        ("only verdict=anomaly counts", 'verdict!="normal"}[1h])) / sum', 'verdict="anomaly"}[1h])) / sum'),
        ("one rate for every profile", "3 * max by (profile) (anomaly_profile_default_fpr)", "3 * 0.05"),
    ],
)
def test_unit_tests_catch_a_weakened_rule(tmp_path: Path, what: str, old: str, new: str) -> None:
    text = ALERTS.read_text()
    alert_at = text.index("- alert: DdmAnomalyRateDrift")
    head, rule = text[:alert_at], text[alert_at:]
    flat = re.sub(r"\)\n\s*/ sum", ") / sum", rule)  # the ratio on one line, so one pattern finds it
    assert old in flat, what
    (tmp_path / "alerts.yml").write_text(head + flat.replace(old, new, 1))
    shutil.copy(UNIT_TESTS, tmp_path / "alerts.test.yml")
    result = promtool_test(tmp_path)
    assert result.returncode != 0, f"{what}: the unit tests still pass\n{result.stdout}"


def test_dashboard_shows_the_rate_against_the_calibrated_fpr() -> None:
    from tests.test_deploy_monitoring import dashboard_queries

    queries = dashboard_queries()
    rate_panel = {
        k: v for k, v in queries.items() if k.startswith("Anomaly rate per profile vs calibrated FPR/")
    }
    assert any("anomaly_verdicts_total" in e for e in rate_panel.values())
    assert any(e.startswith("max by (profile) (anomaly_profile_default_fpr") for e in rate_panel.values())
    assert any(e.startswith("3 * max by (profile) (anomaly_profile_default_fpr") for e in rate_panel.values())
    (drift,) = [v for k, v in queries.items() if k.startswith("Drift: ")]
    assert "[1h]" in drift and "anomaly_profile_default_fpr" in drift
