"""The dashboard's queries evaluated by Prometheus' own engine (``promtool test rules``) on synthetic series
shaped like the service's /metrics: what a healthy service reads (0, not "no data"), that the error ratio
and the latency percentiles count scoring requests only, p95 and process CPU. Each query is taken from the
dashboard JSON by panel title and legend, so a changed query is the one tested."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from app.engine.calibration.profile import Profile
from app.service.metrics import SCORE_BUCKETS, SCORING_ENDPOINTS
from tests.helpers import metric_value, require_tool
from tests.test_deploy_monitoring import all_panels, load_dashboard

ROOT = Path(__file__).resolve().parent.parent
EVAL_AT = "20m"


def query(title: str, legend: str | None = None) -> str:
    """A dashboard query with Grafana's variables as Grafana would send them (a 5-minute rate window)."""
    for panel in all_panels(load_dashboard()["panels"]):
        if panel.get("title") != title:
            continue
        for target in panel["targets"]:
            if legend is None or target.get("legendFormat") == legend:
                expr = target["expr"].replace("$__rate_interval", "5m")
                return re.sub(r"\$\{?\w+\}?", ".*", expr)
    raise AssertionError(f"no panel {title!r} with legend {legend!r}")


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ",".join(f'{k}="{v}"' for k, v in {**labels, "instance": "a"}.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def requests(endpoint: str, code: str, per_minute: int) -> dict[str, str]:
    return series("anomaly_requests_total", f"0+{per_minute}x30", endpoint=endpoint, code=code)


def latency(endpoint: str, cumulative: dict[str, int]) -> list[dict[str, str]]:
    """Bucket series of anomaly_request_latency_seconds: requests per minute at or under each bound."""
    return [
        series("anomaly_request_latency_seconds_bucket", f"0+{n}x30", endpoint=endpoint, le=le)
        for le, n in cumulative.items()
    ]


# what a fresh Metrics exports before any traffic, as series (the zero-valued 5xx and refusal series)
START_UP = [
    *(requests(endpoint, "500", 0) for endpoint in SCORING_ENDPOINTS),
    series("anomaly_refusals_total", "0x30", reason="queue_full"),
    series("anomaly_refusals_total", "0x30", reason="timeout"),
]
# the traffic besides scoring: Prometheus scrapes and health probes, fast, and readiness 503s while loading
NOISE = [
    requests("/metrics", "200", 600),
    requests("/readyz", "503", 60),
    *latency("/metrics", {"0.005": 600, "0.25": 600, "0.5": 600, "+Inf": 600}),
]


def promtool_test(tmp_path: Path, cases: list[dict[str, Any]]) -> None:
    promtool = require_tool("promtool", hint="Debian package `prometheus`; .ci/run installs it")
    rules = tmp_path / "none.yml"
    rules.write_text("groups: []\n")
    spec = {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": cases}
    path = tmp_path / "dashboard.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def expect(expr: str, *samples: tuple[str, float]) -> dict[str, Any]:
    """``expr`` must give these samples, to 1/1000 (promtool compares floats exactly; interpolation in
    histogram_quantile leaves the last bit)."""
    return {
        "expr": f"round(1000 * ({expr}))",
        "eval_time": EVAL_AT,
        "exp_samples": [{"labels": labels, "value": round(1000 * value)} for labels, value in samples],
    }


def test_a_healthy_service_reads_zero_errors_and_zero_refusals(tmp_path: Path) -> None:
    healthy = {
        "interval": "1m",
        "input_series": [
            *START_UP,
            *NOISE,
            requests("/v1/score", "200", 60),
            *latency("/v1/score", {"0.005": 0, "0.25": 54, "0.5": 60, "+Inf": 60}),
            series("process_cpu_seconds_total", "0+30x30"),
        ],
        "promql_expr_test": [
            expect(query("5xx ratio"), ("{}", 0.0)),  # a number, not "no data"; /readyz 503s not counted
            expect(query("Score requests / s"), ("{}", 1.0)),
            expect(
                query("Refusals by reason"),
                ('{reason="queue_full"}', 0.0),
                ('{reason="timeout"}', 0.0),
            ),
            # p95 of scoring requests only: the 57th of 60 a minute lies in (0.25, 0.5]; with the fast
            # /metrics scrapes counted it would be under 0.25
            expect(query("Scoring latency percentiles", "p95"), ("{}", 0.375)),
            expect(query("Process CPU (cores)"), ('{instance="a"}', 0.5)),
        ],
    }
    promtool_test(tmp_path, [healthy])


def test_the_error_ratio_is_over_scoring_requests(tmp_path: Path) -> None:
    failing = {
        "interval": "1m",
        "input_series": [
            *START_UP[1:],
            *NOISE,
            requests("/v1/score", "200", 50),
            requests("/v1/score", "500", 4),
            requests("/v2/models/{model_name}/infer", "200", 4),
            requests("/v2/models/{model_name}/infer", "503", 2),
        ],
        # 6 of 60 scoring requests failed; 600 scrapes and 60 readiness 503s a minute change nothing
        "promql_expr_test": [expect(query("5xx ratio"), ("{}", 0.1))],
    }
    promtool_test(tmp_path, [failing])


def test_score_quantiles_resolve_the_threshold_region(tmp_path: Path) -> None:
    """The default buckets put several bounds between the shipped profile's median normal score and its
    threshold, so the median and p95 panels tell a face from a borderline one."""
    profile = Profile.load(ROOT / "model_store" / "celeba32-ref" / "profiles" / "default.json")
    median = float(profile.calibration_scores[len(profile.calibration_scores) // 2])
    inside = [b for b in SCORE_BUCKETS if median - 2.5 <= b <= profile.threshold + 2.5]
    assert len(inside) >= 5, (median, profile.threshold, inside)

    # and what the dashboard computes from them: 60 scores a minute, 15 under -35, 45 under -32.5
    def under(bound: float) -> int:
        return 0 if bound < -35 else 15 if bound < -32.5 else 45 if bound < -30 else 60

    bucket_series = [
        series("anomaly_score_bucket", f"0+{under(b)}x30", profile="default", le=str(float(b)))
        for b in SCORE_BUCKETS
    ]
    bucket_series.append(series("anomaly_score_bucket", "0+60x30", profile="default", le="+Inf"))
    case = {
        "interval": "1m",
        "input_series": bucket_series,
        "promql_expr_test": [
            expect(query("Median score per profile", "p50 {{profile}}"), ('{profile="default"}', -33.75))
        ],
    }
    promtool_test(tmp_path, [case])


def test_the_pre_created_series_name_the_real_routes(tmp_path: Path) -> None:
    """Each scoring route counts its requests under the name its zero series was created with (a renamed
    route would leave that series at 0 forever), and static assets count as ``static``."""
    from fastapi.testclient import TestClient

    from app.settings import Settings
    from app.web.app import create_app
    from tests.service_fakes import FakeEngine

    app = create_app(Settings(profiles_dir=tmp_path), engine=FakeEngine())
    concrete = ("/v1/score", "/v2/models/m/infer", "/v2/models/m/versions/1/infer")
    with TestClient(app, raise_server_exceptions=False) as client:
        codes = [client.post(path, content=b"{}").status_code for path in concrete]
        assert client.get("/static/ui/ui.js").status_code == 200
        text = client.get("/metrics").text
    for endpoint, code in zip(SCORING_ENDPOINTS, codes, strict=True):
        assert (
            code < 500
            and metric_value(text, "anomaly_requests_total", endpoint=endpoint, code=str(code)) == 1
        )
        assert metric_value(text, "anomaly_requests_total", endpoint=endpoint, code="500") == 0
    assert metric_value(text, "anomaly_requests_total", endpoint="static", code="200") == 1
