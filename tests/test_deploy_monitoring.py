"""Monitoring deployment files: Prometheus config and alerts, Grafana provisioning and dashboard,
prometheus-adapter rules. Every metric a query names must be one the service really exports: the names
come from ``app.service.metrics.Metrics`` built on a fresh registry, never from a second list."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from app.service.metrics import Metrics
from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ddm-anomaly.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "ddm-anomaly.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"

# Labels the scrape adds (static config / Prometheus Operator), not the service.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "endpoint", "container"}
# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for every collector of a fresh ``Metrics``."""
    metrics = Metrics(CollectorRegistry())
    series: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = set(collector._labelnames)  # no public accessor; an unlabelled-yet family has no samples
        for family in collector.collect():
            for suffix in _SUFFIXES[family.type]:
                series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for family in metrics.process.collect():  # process_* (prometheus_client's process collector)
        series[family.name + ("_total" if family.type == "counter" else "")] = set()
    assert series, "Metrics registered no collectors"
    return series


# ---- a small PromQL reader: enough to find metric selectors and label names, not a parser ---------------

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "inf", "nan", "atan2",
}  # fmt: skip
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def _strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every vector selector in ``expr``."""
    text = _strip_strings(expr)
    found: list[tuple[str, set[str]]] = []
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    grouping = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
    text = grouping.sub(lambda m: m.group(1), text)
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", text):
        labels = {lm.group(1) for lm in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2))}
        if m.group(1) and m.group(1) not in _KEYWORDS:
            found.append((m.group(1), labels))
    bare = re.sub(r"\{[^}]*\}", " ", text)
    for m in _IDENT.finditer(bare):
        name = m.group(1)
        rest = bare[m.end() :].lstrip()
        if name in _KEYWORDS or rest.startswith("("):
            continue
        if not any(name == n for n, _ in found):
            found.append((name, set()))
    return found


def grouping_labels(expr: str) -> set[str]:
    text = _strip_strings(expr)
    labels: set[str] = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return labels


def check_expr(expr: str, series: dict[str, set[str]], extra_series: set[str] = frozenset()) -> list[str]:
    """Problems with ``expr``: unknown metric names or label names the metrics do not carry."""
    problems = []
    known_labels = set(TARGET_LABELS)
    sels = selectors(expr)
    if not sels:
        problems.append(f"no metric in {expr!r}")
    for name, labels in sels:
        if name in extra_series:
            continue
        if name not in series:
            problems.append(f"{name} is not exported by app.service.metrics (in {expr!r})")
            continue
        known_labels |= series[name]
        unknown = labels - series[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{name} has no label(s) {sorted(unknown)} (in {expr!r})")
    unknown_grouping = grouping_labels(expr) - known_labels
    if unknown_grouping:
        problems.append(f"grouping by unknown label(s) {sorted(unknown_grouping)} in {expr!r}")
    return problems


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables the way Grafana would before sending a query."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # dashboard variables only appear inside =~ matchers


def promtool_check_exprs(exprs: dict[str, str], tmp_path: Path) -> None:
    """Let Prometheus' own parser judge every expression, as recording rules through ``promtool``."""
    promtool = require_tool("promtool", hint="Debian package `prometheus`; .ci/run installs it")
    rules = {
        "groups": [
            {
                "name": "syntax-check",
                "rules": [{"record": f"check:{key}", "expr": expr} for key, expr in exprs.items()],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- dashboard ----------------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> dict[str, str]:
    """'<panel title>/<refId>' -> expr, plus the template variables' queries."""
    dash = load_dashboard()
    queries = {}
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            queries[f"{panel['title']}/{target['refId']}"] = target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {var['name']}: unexpected query {query!r}"
            queries[f"variable {var['name']}"] = m.group(1)
            assert m.group(2) in exported_series().get(m.group(1), set()) | TARGET_LABELS
    return queries


def test_dashboard_queries_use_only_exported_metrics() -> None:
    series = exported_series()
    queries = dashboard_queries()
    assert len(queries) >= 15
    problems = [p for expr in queries.values() for p in check_expr(expr, series)]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_what_operators_watch() -> None:
    """Request rate, latency percentiles, queue depth, batch size, anomaly rate per profile, device memory."""
    exprs = " ".join(dashboard_queries().values())
    for needle in (
        "rate(anomaly_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(anomaly_request_latency_seconds_bucket",
        "anomaly_queue_images",
        "anomaly_batch_size_bucket",
        "anomaly_verdicts_total",
        "anomaly_device_memory_bytes",
    ):
        assert needle in exprs, needle
    anomaly_rate = [e for e in dashboard_queries().values() if "anomaly_verdicts_total" in e]
    assert any("by (profile)" in e for e in anomaly_rate)


def test_dashboard_queries_parse_in_prometheus(tmp_path: Path) -> None:
    exprs = {
        f"q{i}": grafana_to_promql(expr)
        for i, expr in enumerate(dashboard_queries().values())
        if not expr.startswith("anomaly_")  # the label_values() selectors are bare names
    }
    promtool_check_exprs(exprs, tmp_path)


def test_dashboard_structure_and_datasource() -> None:
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dash["panels"]):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# ---- Grafana provisioning --------------------------------------------------------------------------------


def test_grafana_datasource_provisioning() -> None:
    data = yaml.safe_load(DATASOURCES.read_text())
    assert data["apiVersion"] == 1
    (ds,) = data["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["isDefault"] is True
    assert ds["url"] == "http://prometheus:9090", "the compose service name and port of Prometheus"
    scrape_interval = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape_interval


def test_grafana_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    data = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert DASHBOARD.parent == ROOT / "deploy/grafana/dashboards"


# ---- Prometheus config and alerts -------------------------------------------------------------------------


def test_prometheus_config_scrapes_the_service() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ddm-anomaly"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["api"]  # the GPU override changes neither
    assert host in service["networks"]["default"]["aliases"]
    assert service["environment"]["DDM_PORT"] == port


def test_prometheus_config_and_alerts_pass_promtool() -> None:
    promtool = require_tool("promtool", hint="Debian package `prometheus`; .ci/run installs it")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_alerts_use_only_exported_metrics() -> None:
    series = exported_series()
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert rules
    problems = [p for r in rules for p in check_expr(r["expr"], series, PROMETHEUS_SERIES)]
    assert not problems, "\n".join(problems)


# ---- prometheus-adapter (custom metrics for the HorizontalPodAutoscaler) ----------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rules


def adapter_rule_promql(rule: dict[str, Any]) -> str:
    """The query the adapter would send for two pods of one namespace."""
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
    assert series
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series.group(0))
        .replace("<<.LabelMatchers>>", 'namespace="ddm-anomaly",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_adapter_rules_query_exported_metrics(tmp_path: Path) -> None:
    series = exported_series()
    exprs = {}
    for i, rule in enumerate(adapter_rules()):
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        for expr in (rule["seriesQuery"], adapter_rule_promql(rule)):
            problems = check_expr(expr, series)
            assert not problems, "\n".join(problems)
        assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
        exprs[f"adapter{i}"] = adapter_rule_promql(rule)
    promtool_check_exprs(exprs, tmp_path)


def test_hpa_metrics_are_served_by_the_adapter() -> None:
    served = {rule["name"]["as"] for rule in adapter_rules()}
    for path in (ROOT / "k8s").rglob("hpa*.yaml"):
        hpa = yaml.safe_load(path.read_text())
        names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert names and names <= served, (path, names - served)


# ---- the PromQL reader itself ------------------------------------------------------------------------------


def test_selector_reader() -> None:
    expr = (
        'sum by (le, profile) (rate(anomaly_score_bucket{profile=~"$p",instance=~"a"}[5m]))'
        " / clamp_min(sum(rate(anomaly_batch_size_count[1m])), 1e-9) > bool up"
    )
    assert selectors(expr) == [
        ("anomaly_score_bucket", {"profile", "instance"}),
        ("anomaly_batch_size_count", set()),
        ("up", set()),
    ]
    assert grouping_labels(expr) == {"le", "profile"}
    series = exported_series()
    assert check_expr("rate(anomaly_nope_total[1m])", series)
    assert check_expr('anomaly_queue_images{profile="x"}', series)
    assert check_expr("sum by (verdict) (anomaly_queue_images)", series)
    assert not check_expr('sum by (verdict) (rate(anomaly_verdicts_total{profile="x"}[1m]))', series)
