"""Every metric named by an alert rule or a dashboard is one Weir exports.

Also: the label values ``init_series`` creates at 0 are the ones the code emits.

The catalogue is weir/metrics.py: the three metric classes are built on fresh
registries and their exported sample names (with the _total, _bucket, _count,
_sum, _created and _info suffixes) collected. A name outside it, a Prometheus
built-in (``up``) and the recording rules fails here, with no server needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from prometheus_client import CollectorRegistry

from models import drift, join, retrain
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
from weir.metrics import (
    DRIFT_KINDS,
    EVENT_DEAD_LETTER_REASONS,
    JOIN_OUTCOMES,
    LABEL_DEAD_LETTER_REASONS,
    RETRAIN_OUTCOMES,
    RETRAIN_TRIGGERS,
    LearnerMetrics,
    MonitorMetrics,
    WorkerMetrics,
)
from weir.resilience import DependencyHealth
from weir.spec import parse_spec

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
    health = CollectorRegistry()
    DependencyHealth(health, "p")  # every process reports its servers' health too
    exported |= {s.name for fam in health.collect() for s in fam.samples}
    assert exported <= catalogue_metric_names()
    assert {"weir_dependency_up", "weir_dependency_retries_total"} <= exported
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
        "WeirDependencyDown",
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


# -- series created at start (init_series) ---------------------------------------------------


def _strings(path: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, (REPO / path).read_text()))


def test_known_label_values_match_the_code_that_produces_them() -> None:
    """The enumerations init_series uses are the values the processes really emit."""
    assert JOIN_OUTCOMES == join.OUTCOMES
    assert set(RETRAIN_TRIGGERS) == set(get_args(retrain.Trigger))
    assert set(DRIFT_KINDS) == set(get_args(drift.DriftKind)) - {"decision"}
    emitted = _strings("models/monitor.py", r'_count_retrain\([^()]*"(\w+)"\)') | _strings(
        "models/monitor.py", r'retrains\.labels\([^()]*"(\w+)"\)'
    )
    assert emitted == set(RETRAIN_OUTCOMES)
    raised = _strings("weir/contracts.py", r'InvalidMessage\(\s*"(\w+)"')
    raised |= _strings("models/factory.py", r'InvalidMessage\(\s*"(\w+)"')
    raised |= _strings("streams/scoring.py", r'(?:DeadLetter|dead_letter)\(\s*"(\w+)"')
    label_only = {"label_type", "label_class"}
    assert raised == set(EVENT_DEAD_LETTER_REASONS) | label_only
    assert set(LABEL_DEAD_LETTER_REASONS) == raised - {"late"}
    readme = (REPO / "README.md").read_text()
    listed = re.search(r"Reasons: (.*?)\.\n", readme, re.S)
    assert listed, "README.md lists the dead-letter reasons after 'Reasons: '"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == raised


def test_init_series_creates_the_known_series_at_zero() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}],
            "late_events": "ignore",
            "model": {"name": "m", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )
    registry = CollectorRegistry()
    worker = WorkerMetrics(registry).init_series(spec)
    learner = LearnerMetrics(registry).init_series(spec)  # role "all": one registry
    monitor = MonitorMetrics(CollectorRegistry()).init_series(spec)
    assert isinstance(worker, WorkerMetrics) and isinstance(learner, LearnerMetrics)
    get = registry.get_sample_value
    assert get("weir_events_total", {"pipeline": "p"}) == 0
    assert get("weir_duplicate_events_total", {"pipeline": "p"}) == 0
    assert get("weir_late_events_total", {"pipeline": "p", "policy": "ignore"}) == 0
    assert get("weir_late_events_total", {"pipeline": "p", "policy": "dead_letter"}) is None
    for reason in set(EVENT_DEAD_LETTER_REASONS) | set(LABEL_DEAD_LETTER_REASONS):
        assert get("weir_dead_letters_total", {"pipeline": "p", "reason": reason}) == 0
    # either role alone creates its own reasons
    alone = LearnerMetrics(CollectorRegistry()).init_series(spec).registry.get_sample_value
    assert alone("weir_dead_letters_total", {"pipeline": "p", "reason": "label_class"}) == 0
    assert alone("weir_dead_letters_total", {"pipeline": "p", "reason": "late"}) is None
    assert get("weir_redis_roundtrip_seconds_count", {"pipeline": "p", "op": "served"}) == 0
    assert get("weir_event_to_prediction_seconds_count", {"pipeline": "p"}) == 0
    for outcome in JOIN_OUTCOMES:
        assert get("weir_label_joins_total", {"pipeline": "p", "outcome": outcome}) == 0
    assert get("weir_label_expiries_total", {"pipeline": "p"}) == 0
    assert get("weir_snapshots_published_total", {"pipeline": "p", "model": "m"}) == 0
    mget = monitor.registry.get_sample_value
    for trigger in RETRAIN_TRIGGERS:
        for outcome in RETRAIN_OUTCOMES:
            labels = {"pipeline": "p", "trigger": trigger, "outcome": outcome}
            assert mget("weir_retrains_total", labels) == 0
    for kind in DRIFT_KINDS:
        assert mget("weir_drift_events_total", {"pipeline": "p", "kind": kind}) == 0
    assert mget("weir_promotions_total", {"pipeline": "p"}) == 0
    assert mget("weir_rollbacks_total", {"pipeline": "p"}) == 0
    # Gauges whose value is only known later are not invented.
    assert mget("weir_drift_detected", {"pipeline": "p", "kind": "feature", "name": "x"}) is None
