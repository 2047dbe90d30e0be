"""Every PromQL expression of every dashboard and rule, run on the real Prometheus.

The ``metric_source`` fixture exports all three metric classes of
weir/metrics.py (worker, learner, monitor: three ``MetricsServer`` on free
ports, each a scrape target of the stack's Prometheus) with sample values that
keep moving. It is a fixture so that it can be swapped for a real pipeline: any
fixture yielding a :class:`MetricSource` whose series Prometheus scrapes works.

Each dashboard query (Grafana variables replaced by concrete values) and each
rule expression (with its threshold comparisons removed, so it returns the
measured value rather than only the firing series) must parse and return data.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from weir.dashboards import (
    Query,
    dashboard_queries,
    grafana_variables,
    load_dashboards,
    rule_queries,
    variable_queries,
)
from weir.metrics import LearnerMetrics, MetricsServer, MonitorMetrics, WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules"
DASHBOARDS = REPO / "dashboards"
SCRAPED_TIMEOUT = 60.0
RULES_TIMEOUT = 90.0  # the recording group runs every 30 s

# Values for Grafana's own variables: wide enough to hold several 2 s scrapes.
GRAFANA_VALUES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
    "__range_s": "300",
    "__interval_ms": "60000",
    "__range_ms": "300000",
}

# A comparison with a number literal: `> 0.05`, `== 1`, `> bool 0`.
_THRESHOLD = re.compile(
    r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])"
)


def strip_thresholds(expr: str) -> str:
    """The expression without its comparisons against numbers.

    >>> strip_thresholds('a - ignoring(w) b{m!~"x"} > 0.05 and c > 1e-3')
    'a - ignoring(w) b{m!~"x"} and c'
    """
    return _THRESHOLD.sub("", expr)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) by concrete values."""
    missing = grafana_variables(expr) - set(values)
    assert not missing, f"no test value for {sorted(missing)} in {expr!r}"
    for name in sorted(values, key=len, reverse=True):  # $__range_s before $__range
        v = values[name]
        expr = re.sub(r"\$\{" + name + r"(?::[^}]*)?\}|\[\[" + name + r"\]\]", v, expr)
        expr = re.sub(r"\$" + name + r"(?!\w)", v, expr)
    return expr


@dataclass
class MetricSource:
    """Where the series the queries need come from."""

    pipeline: str
    model: str
    targets: list[str]

    def template_values(self) -> dict[str, str]:
        return {"pipeline": self.pipeline, "model": self.model, **GRAFANA_VALUES}


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(0.5)


def _query(prometheus_url: str, promql: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(error or None, result vector) of an instant query."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
    if body.get("status") != "success":
        return f"{body.get('errorType')}: {body.get('error')}", []
    return None, list(body["data"]["result"])


def _drive(worker: WorkerMetrics, learner: LearnerMetrics, monitor: MonitorMetrics, p: str, m: str) -> None:
    """One tick of a small, plausible pipeline."""
    worker.events.labels(p).inc(50)
    worker.predictions.labels(p, m, "v1").inc(48)
    worker.dead_letters.labels(p, "schema").inc(1)
    worker.dead_letters.labels(p, "late").inc(1)
    worker.duplicates.labels(p).inc(1)
    worker.late_events.labels(p, "dead_letter").inc(1)
    worker.batch_size.labels(p).observe(50)
    worker.batch_seconds.labels(p).observe(0.02)
    for latency in (0.004, 0.008, 0.015, 0.3):
        worker.latency.labels(p).observe(latency)
    for part in ("0", "1"):
        worker.lag.labels(p, f"{p}.events", part).set(1000 + 10 * time.time() % 500)
    worker.redis_seconds.labels(p, "features").observe(0.0008)
    worker.redis_seconds.labels(p, "served").observe(0.0003)
    worker.model_version.labels(p, m, "v1").set(1)
    worker.snapshot_age.labels(p, m).set(4.0)
    worker.feature_freshness.labels(p).set(time.time() - 2)

    learner.labels.labels(p).inc(45)
    for outcome in ("hit", "early", "expired"):
        learner.joins.labels(p, outcome).inc(15)
    learner.expiries.labels(p).inc(1)
    learner.label_delay.labels(p).observe(5.0)
    learner.label_delay.labels(p).observe(30.0)
    learner.learned.labels(p, m).inc(44)
    for metric, all_time, rolling in (("accuracy", 0.9, 0.82), ("log_loss", 0.3, 0.42)):
        learner.online_metric.labels(p, m, "v1", metric, "all").set(all_time)
        learner.online_metric.labels(p, m, "v1", metric, "rolling").set(rolling)
    learner.snapshots.labels(p, m).inc()
    learner.model_version.labels(p, m, "v1").set(1)

    monitor.drift_statistic.labels(p, "feature", "salary", "psi").set(0.31)
    monitor.drift_statistic.labels(p, "prediction", "score", "psi").set(0.05)
    monitor.drift_detected.labels(p, "feature", "salary").set(1)
    monitor.drift_detected.labels(p, "prediction", "score").set(0)
    monitor.drift_events.labels(p, "feature").inc()
    for outcome in ("trained", "failed", "promoted"):
        monitor.retrains.labels(p, "performance", outcome).inc()
    monitor.promotions.labels(p).inc()
    monitor.rollbacks.labels(p).inc()


@pytest.fixture(scope="module")
def metric_source(stack: Any) -> Iterator[MetricSource]:
    """Synthetic exporters of all three metric classes, scraped by the stack's Prometheus.

    Module-scoped: the series keep moving for the whole module, so later tests need
    not wait for new scrapes. Override this fixture to measure a real pipeline.
    """
    unique = f"t{uuid.uuid4().hex[:8]}"
    pipeline, model = f"promql-{unique}", "lr"
    registries = [CollectorRegistry() for _ in range(3)]
    worker, learner, monitor = (
        WorkerMetrics(registries[0]),
        LearnerMetrics(registries[1]),
        MonitorMetrics(registries[2]),
    )
    _drive(worker, learner, monitor, pipeline, model)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            _drive(worker, learner, monitor, pipeline, model)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    servers = [MetricsServer(r) for r in registries]
    targets = [f"{s.host}:{s.port}" for s in servers]
    try:
        for role, target in zip(("worker", "learner", "monitor"), targets, strict=True):
            stack.add_scrape_target(f"{unique}-{role}", target, wait_up=True)
        yield MetricSource(pipeline=pipeline, model=model, targets=targets)
    finally:
        for role in ("worker", "learner", "monitor"):
            stack.remove_scrape_target(f"{unique}-{role}")
        stop.set()
        ticker.join(timeout=5)
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def scraped(stack: Any, metric_source: MetricSource) -> MetricSource:
    """The source, once Prometheus holds a few scrapes of every process (rates need two)."""
    p = metric_source.pipeline
    for metric in ("weir_events_total", "weir_labels_total", "weir_promotions_total"):
        promql = f'count_over_time({metric}{{pipeline="{p}"}}[1m])'

        def three_scrapes(promql: str = promql) -> bool:
            return any(float(r["value"][1]) >= 3 for r in _query(stack.prometheus_url, promql)[1])

        _wait(
            three_scrapes,
            SCRAPED_TIMEOUT,
            f"three scrapes of {metric}{{pipeline={p!r}}}",
        )
    return metric_source


def _all_dashboard_queries() -> list[Query]:
    return [q for _, d in load_dashboards(DASHBOARDS) for q in dashboard_queries(d) + variable_queries(d)]


def test_every_dashboard_query_parses_and_returns_data(stack: Any, scraped: MetricSource) -> None:
    values = scraped.template_values()
    queries = _all_dashboard_queries()
    assert len(queries) > 30
    problems = []
    for q in queries:
        expr = strip_thresholds(substitute(q.expr, values)) if "annotation" in q.where else None
        expr = expr or substitute(q.expr, values)
        error, result = _query(stack.prometheus_url, expr)
        if error:
            problems.append(f"{q.where}: {error}\n    {expr}")
        elif not result:
            problems.append(f"{q.where}: no data\n    {expr}")
    assert not problems, "\n".join(problems)


def test_every_rule_expression_parses_and_returns_data(stack: Any, scraped: MetricSource) -> None:
    queries = rule_queries(RULES)
    assert len(queries) >= 8
    problems = []
    for q in queries:
        error, _ = _query(stack.prometheus_url, q.expr)
        if error:
            problems.append(f"{q.where}: {error}\n    {q.expr}")
            continue
        measured = strip_thresholds(q.expr)
        error, result = _query(stack.prometheus_url, measured)
        if error or not result:
            problems.append(f"{q.where}: {error or 'no data'} without thresholds\n    {measured}")
    assert not problems, "\n".join(problems)


def test_prometheus_loads_and_evaluates_the_rules(stack: Any, scraped: MetricSource) -> None:
    """The stack's Prometheus runs our rule file, every rule healthy, recordings have data."""
    expected = {q.where.split(": ", 1)[1] for q in rule_queries(RULES)}

    def loaded() -> dict[str, dict[str, Any]]:
        groups = stack.prometheus_get("/api/v1/rules")["groups"]
        return {r["name"]: r for g in groups if g["file"].startswith(str(RULES)) for r in g["rules"]}

    if not expected <= set(loaded()):
        # Prometheus re-reads rule files only on reload (stack.py reloads on config changes).
        urllib.request.urlopen(urllib.request.Request(f"{stack.prometheus_url}/-/reload", method="POST"))
    rules = _wait(
        lambda: (r := loaded()) and expected <= set(r) and all(x["health"] == "ok" for x in r.values()) and r,
        RULES_TIMEOUT,
        "every Weir rule loaded and evaluated healthy",
    )
    assert not [r["lastError"] for r in rules.values() if r.get("lastError")]
    p = scraped.pipeline
    for record in ("pipeline:weir_events:rate5m", "pipeline:weir_event_to_prediction_seconds:p99_5m"):
        promql = f'{record}{{pipeline="{p}"}}'

        def has_data(promql: str = promql) -> bool:
            return bool(_query(stack.prometheus_url, promql)[1])

        _wait(
            has_data,
            RULES_TIMEOUT,
            f"recording rule {record} to have data for {p}",
        )


def test_strip_and_substitute() -> None:
    assert strip_thresholds('up{job=~"weir.*"} == 0') == 'up{job=~"weir.*"}'
    assert strip_thresholds("sum(x) > bool 1.5e3") == "sum(x)"
    assert substitute(
        'rate(x{p=~"$pipeline"}[$__rate_interval]) ${pipeline:regex}', GRAFANA_VALUES | {"pipeline": "d"}
    ) == ('rate(x{p=~"d"}[1m]) d')
    assert substitute("x[$__range] $__range_s", GRAFANA_VALUES) == "x[5m] 300"
