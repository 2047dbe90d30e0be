"""Every metric named by an alert rule or a dashboard is one Weir exports.

The catalogue is weir/metrics.py: the three metric classes are built on fresh
registries and their exported sample names (with the _total, _bucket, _count,
_sum, _created and _info suffixes) collected. A name outside it, a Prometheus
built-in (``up``) and the recording rules fails here, with no server needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from weir.dashboards import (
    PROMETHEUS_BUILTINS,
    Query,
    catalogue_metric_names,
    dashboard_queries,
    load_dashboards,
    metric_names,
    recorded_names,
    rule_queries,
    unknown_metric_problems,
    variable_queries,
)
from weir.metrics import LearnerMetrics, MonitorMetrics, WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/rules"
DASHBOARDS = REPO / "dashboards"


@pytest.fixture(scope="module")
def known() -> set[str]:
    return catalogue_metric_names() | PROMETHEUS_BUILTINS | recorded_names(RULES)


def test_catalogue_names_match_what_a_populated_registry_exports() -> None:
    """The type-derived names equal the samples of registries with every metric touched."""
    exported: set[str] = set()
    for cls in (WorkerMetrics, LearnerMetrics, MonitorMetrics):
        registry = CollectorRegistry()
        metrics = cls(registry)
        for attr in vars(metrics).values():
            labelnames = getattr(attr, "_labelnames", None)
            if labelnames:
                attr.labels(*["x"] * len(labelnames))
        exported |= {s.name for fam in registry.collect() for s in fam.samples}
    assert exported <= catalogue_metric_names()
    assert {
        "weir_events_total",
        "weir_event_to_prediction_seconds_bucket",
        "weir_event_to_prediction_seconds_count",
        "weir_event_to_prediction_seconds_sum",
        "weir_build_info",
        "weir_online_metric",
        "weir_retrains_total",
    } <= exported


def _all_queries() -> list[Query]:
    queries = rule_queries(RULES)
    for _, dash in load_dashboards(DASHBOARDS):
        queries += dashboard_queries(dash) + variable_queries(dash)
    return queries


@pytest.mark.parametrize("query", _all_queries(), ids=lambda q: q.where)
def test_every_metric_is_known(query: Query, known: set[str]) -> None:
    names = metric_names(query.expr)
    assert names, f"{query.where}: no metric found in {query.expr!r}"
    assert names <= known, f"{query.where}: unknown {sorted(names - known)}"


def test_every_alert_named_in_the_brief_exists() -> None:
    doc = yaml.safe_load((RULES / "weir.rules.yml").read_text())
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    for name in (
        "WeirDriftDetected",
        "WeirOnlineMetricDropped",
        "WeirConsumerLagGrowing",
        "WeirDeadLettersHigh",
        "WeirTargetDown",
        "WeirSnapshotTooOld",
        "WeirRetrainFailed",
    ):
        rule = alerts[name]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == name.lower()


def test_unknown_metric_fails() -> None:
    known = catalogue_metric_names() | PROMETHEUS_BUILTINS
    bad = [Query("rules: X", "rate(weir_event_total[5m]) > 0 and up == 0")]
    assert unknown_metric_problems(bad, known) == [
        "rules: X: unknown metric 'weir_event_total' (not in weir/metrics.py, "
        "not a Prometheus built-in, not a recording rule)"
    ]


def test_every_metric_and_alert_is_documented() -> None:
    doc = (REPO / "docs/observability.md").read_text()
    for name in sorted(catalogue_metric_names()):
        if name.endswith(("_created", "_count", "_sum")):
            continue
        name = name.removesuffix("_bucket")  # a histogram is documented by its base name
        assert f"`{name}`" in doc, f"{name} is not described in docs/observability.md"
    rules = yaml.safe_load((RULES / "weir.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert f"### {rule['alert']}\n" in doc, f"alert {rule['alert']} has no section"
