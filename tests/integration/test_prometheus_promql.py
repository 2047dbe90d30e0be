"""Every PromQL expression of every dashboard and rule, run on the real Prometheus
against a real pipeline.

The module-scoped ``pipeline_run`` fixture runs the product, not stand-ins: a
``weir worker SPEC --role all`` (scores, joins labels, learns) and a ``weir monitor
SPEC`` subprocess on the real Kafka and Redis, each serving ``/metrics`` on its own
free port registered as a scrape target of the stack's Prometheus. ``weir produce``
(:func:`streams.produce.produce`) replays an Agrawal stream with an abrupt concept
change (function 6 -> 7), delayed labels and malformed messages, and a few late
events follow. The spec is examples/demo.yaml with fresh topics and a short retrain
loop (small cooldown, fresh-label, shadow and rollback counts), so within the run the
monitor publishes feature, prediction and performance drift statistics, detects the
change, retrains a challenger and shadows it to a verdict (promoted or rejected),
whatever model the demo spec uses. The fixture waits for all of that through
Prometheus' HTTP API.

Then each dashboard query (Grafana variables replaced by concrete values) and each
rule expression must parse and return data, and rule expressions with their
threshold comparisons removed (the measured value, not only the firing series) must
return data for this run's pipeline or targets: a dashboard or rule naming a metric
no process exports fails. Series of rare events (a rollback, a failed retrain, a
dead-letter reason) have data because every process creates the series it knows at
start at 0 (``init_series`` in weir/metrics.py).

The module takes 30-40 s on a 2-core machine: ~10 s until the worker is scraped, 16 s
of replay (6,000 events at 400/s), a few seconds for the last labels and the shadow
verdict; the recording rules (a 30 s group) have data by then or soon after. The
fixture prints what the run produced (drift detections, retrains, promotions, dead
letters by reason, model versions); see it with ``pytest -s``.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from streams.admin import delete_keys
from streams.produce import produce
from tests.integration.conftest import TopicFactory
from tests.integration.processes import Monitor, Worker, free_port
from weir.dashboards import (
    Query,
    dashboard_queries,
    grafana_variables,
    load_dashboards,
    metric_names,
    recorded_names,
    rule_queries,
    variable_queries,
)
from weir.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules"
DASHBOARDS = REPO / "dashboards"
RULES_TIMEOUT = 90.0  # the recording group runs every 30 s
START_TIMEOUT = 60.0  # a cold Faust worker on a busy 2-core machine
RUN_TIMEOUT = 120.0  # from the first event to the shadow verdict

# The stream: an abrupt concept change at CHANGE_AT, enough labels after it for the
# detector, min_fresh_labels, the shadow gate and the rollback watch.
EVENTS = 6000
CHANGE_AT = 2000
RATE = 400.0
LABEL_DELAY = 1.0
BAD_EVERY = 250  # one malformed message every 250 events: 5 kinds, 24 in all
LATE_EVENTS = 3

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


def _wait(check: Callable[[], Any], timeout: float, what: str, on_timeout: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{on_timeout()}", pytrace=False)
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


@dataclass
class PipelineRun:
    """A running pipeline whose processes Prometheus scrapes."""

    spec: PipelineSpec
    targets: list[str]
    produced: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline(self) -> str:
        return self.spec.name

    def template_values(self) -> dict[str, str]:
        return {"pipeline": self.pipeline, "model": self.spec.model.name, **GRAFANA_VALUES}

    def mine(self, series: dict[str, Any]) -> bool:
        """A result series of this run: its pipeline, or one of its scrape targets."""
        labels = series.get("metric", {})
        return labels.get("pipeline") == self.pipeline or labels.get("instance") in self.targets


def _spec(topics: TopicFactory) -> PipelineSpec:
    """examples/demo.yaml (whatever its model) with fresh topics and a short retrain loop."""
    base = load_spec(REPO / "examples/demo.yaml")
    base = base.model_copy(
        update={
            "learner": base.learner.model_copy(
                update={"snapshot_every_labels": 200, "snapshot_every_seconds": 1.0}
            ),
            "drift": base.drift.model_copy(update={"reference_size": 500, "window": 500, "min_samples": 100}),
            "retrain": base.retrain.model_copy(
                update={
                    "cooldown": 5.0,
                    "min_fresh_labels": 500,
                    "window_labels": 1000,
                    "shadow_labels": 300,
                    "rollback_labels": 200,
                }
            ),
        }
    )
    return topics.for_spec(base, partitions=2)


def _values(stack: Any, promql: str) -> dict[str, float]:
    """``{"label=value,...": value}`` of an instant query, without the run's own labels."""
    out = {}
    for r in stack.query(promql):
        own = ("__name__", "instance", "job", "pipeline")
        labels = {k: v for k, v in r["metric"].items() if k not in own}
        out[",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"] = float(r["value"][1])
    return out


@pytest.fixture(scope="module")
def pipeline_run(
    stack: Any, settings: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelineRun]:
    """A real worker and monitor, fed a drifting stream, scraped by the stack's Prometheus.

    Module-scoped: the processes keep serving (and Prometheus scraping) for the whole
    module. Ready once the monitor has shadowed a retrained challenger to a verdict.
    """
    t0 = time.monotonic()
    unique = f"t{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("promql")
    topics = TopicFactory(settings, unique)
    spec = _spec(topics)
    p = spec.name
    worker_port, monitor_port = free_port(), free_port()
    worker = Worker(spec, tmp, role="all", metrics_port=worker_port)
    monitor = Monitor(worker.spec_path, tmp, monitor_port, check_every=200)
    run = PipelineRun(spec, [f"127.0.0.1:{worker_port}", f"127.0.0.1:{monitor_port}"])
    names = {"worker": f"{unique}-worker", "monitor": f"{unique}-monitor"}
    stop = threading.Event()
    producer: threading.Thread | None = None

    def logs() -> str:
        return f"\n--- worker log\n{worker.tail()}\n--- monitor log\n{monitor.tail()}"

    def alive() -> None:
        for proc in (worker, monitor):
            assert proc.alive(), f"a pipeline process exited ({proc.proc.returncode}){logs()}"

    def has(promql: str) -> Callable[[], bool]:
        def check() -> bool:
            alive()
            return bool(stack.query(promql))

        return check

    try:
        for role, target in zip(("worker", "monitor"), run.targets, strict=True):
            stack.add_scrape_target(names[role], target, wait_up=True, timeout=START_TIMEOUT)
        source = f"river:agrawal-drift?position={CHANGE_AT}&before=6&after=7&seed=11"

        def replay() -> None:
            run.produced.update(
                produce(
                    spec,
                    settings,
                    source,
                    rate=RATE,
                    limit=EVENTS,
                    label_delay=LABEL_DELAY,
                    entities=200,
                    bad_every=BAD_EVERY,
                    run_id=unique,
                    progress=False,
                    stop=stop,
                )
            )

        producer = threading.Thread(target=replay, daemon=True)
        producer.start()
        run.outcome["started_s"] = round(time.monotonic() - t0, 1)
        _wait(
            has(f'weir_drift_statistic{{pipeline="{p}", kind="feature"}}'),
            RUN_TIMEOUT,
            "feature drift statistics",
            logs,
        )
        producer.join(RUN_TIMEOUT)
        assert not producer.is_alive() and run.produced.get("events") == EVENTS, run.produced
        _send_late_events(settings, spec)
        _wait(
            has(f'sum(weir_predictions_total{{pipeline="{p}"}}) >= {EVENTS}'),
            RUN_TIMEOUT,
            f"predictions of all {EVENTS} events",
            logs,
        )
        _wait(
            has(f'weir_dead_letters_total{{pipeline="{p}", reason="late"}} >= {LATE_EVENTS}'),
            RUN_TIMEOUT,
            "the late events dead-lettered",
            logs,
        )
        for kind in ("prediction", "performance"):
            _wait(
                has(f'weir_drift_statistic{{pipeline="{p}", kind="{kind}"}}'),
                RUN_TIMEOUT,
                f"{kind} drift statistics",
                logs,
            )
        _wait(
            has(f'sum(weir_retrains_total{{pipeline="{p}", outcome=~"promoted|rejected"}}) > 0'),
            RUN_TIMEOUT,
            "a retrained challenger shadowed to a verdict (promoted or rejected)",
            logs,
        )
        run.outcome.update(
            ready_s=round(time.monotonic() - t0, 1),
            produced=run.produced,
            drift_detections=_values(stack, f'weir_drift_events_total{{pipeline="{p}"}} > 0'),
            retrains=_values(stack, f'weir_retrains_total{{pipeline="{p}"}} > 0'),
            promotions=_values(stack, f'weir_promotions_total{{pipeline="{p}"}}'),
            rollbacks=_values(stack, f'weir_rollbacks_total{{pipeline="{p}"}}'),
            dead_letters=_values(stack, f'weir_dead_letters_total{{pipeline="{p}"}} > 0'),
            model_versions=_values(stack, f'weir_model_version_info{{pipeline="{p}"}} == 1'),
        )
        print(f"\npipeline run {p}: {json.dumps(run.outcome)}", file=sys.stderr)
        yield run
    finally:
        stop.set()
        if producer is not None:
            producer.join(30)
        for name in names.values():
            stack.remove_scrape_target(name)
        codes = {"worker": worker.stop(), "monitor": monitor.stop()}
        topics.cleanup()
        _delete_keys(settings, spec)
        bad = {k: c for k, c in codes.items() if c not in (0, -signal.SIGTERM)}
        assert not bad, f"exit codes {bad}{logs()}"


def _send_late_events(settings: Any, spec: PipelineSpec) -> None:
    """Events far behind their entity's newest one: dead-lettered with reason ``late``."""
    producer = Producer(settings.confluent_config())
    ts = time.time() - 10 * spec.lateness
    for i in range(LATE_EVENTS):
        entity = f"c{i}"  # every entity of the replay has newer events
        event = {
            "event_id": f"late-{i}",
            "entity_id": entity,
            "ts": ts,
            "data": dict.fromkeys(spec.fields, 1.0),
        }
        producer.produce(spec.topics.events, orjson.dumps(event), entity.encode())
    assert producer.flush(10) == 0


def _delete_keys(settings: Any, spec: PipelineSpec) -> None:
    client = settings.redis()
    try:
        delete_keys(client, spec.redis_prefix)
    finally:
        client.close()


def _all_dashboard_queries() -> list[Query]:
    return [q for _, d in load_dashboards(DASHBOARDS) for q in dashboard_queries(d) + variable_queries(d)]


def test_every_metric_named_is_exported_by_this_run(stack: Any, pipeline_run: PipelineRun) -> None:
    """Each metric a dashboard or rule names has a series from this run's processes.

    Independent of whatever else the shared Prometheus scrapes: a series of another
    pipeline or an earlier run does not count.
    """
    queries = _all_dashboard_queries() + rule_queries(RULES)
    recorded = recorded_names(RULES)
    names = {n for q in queries for n in metric_names(q.expr)} - recorded
    assert {"up", "weir_events_total", "weir_retrains_total", "weir_rollbacks_total"} <= names
    missing = []
    for name in sorted(names):
        result = stack.query(f'group by (pipeline, instance) ({{__name__="{name}"}})')
        if not any(pipeline_run.mine(r) for r in result):
            where = sorted({q.where for q in queries if name in metric_names(q.expr)})
            missing.append(f"{name}: no series from this run; named by {where}")
    assert not missing, "\n".join(missing)


def test_every_dashboard_query_parses_and_returns_data(stack: Any, pipeline_run: PipelineRun) -> None:
    values = pipeline_run.template_values()
    queries = _all_dashboard_queries()
    assert len(queries) > 30
    problems = []
    for q in queries:
        expr = substitute(q.expr, values)
        if "annotation" in q.where:  # an annotation fires on events: measure its value instead
            expr = strip_thresholds(expr)
        error, result = _query(stack.prometheus_url, expr)
        if error:
            problems.append(f"{q.where}: {error}\n    {expr}")
        elif not result:
            problems.append(f"{q.where}: no data\n    {expr}")
    assert not problems, "\n".join(problems)


def test_every_rule_expression_parses_and_returns_data(stack: Any, pipeline_run: PipelineRun) -> None:
    """Each rule parses; without its thresholds it returns data of this run's processes."""
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
        if error or not any(pipeline_run.mine(r) for r in result):
            why = error or f"no data for pipeline {pipeline_run.pipeline} or targets {pipeline_run.targets}"
            problems.append(f"{q.where}: {why} without thresholds\n    {measured}")
    assert not problems, "\n".join(problems)


def test_prometheus_loads_and_evaluates_the_rules(stack: Any, pipeline_run: PipelineRun) -> None:
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
    p = pipeline_run.pipeline
    for record in sorted(n for n in expected if ":" in n):
        promql = f'{record}{{pipeline="{p}"}}'

        def has_data(promql: str = promql) -> bool:
            return bool(_query(stack.prometheus_url, promql)[1])

        _wait(has_data, RULES_TIMEOUT, f"recording rule {record} to have data for {p}")


def test_strip_and_substitute() -> None:
    assert strip_thresholds('up{job=~"weir.*"} == 0') == 'up{job=~"weir.*"}'
    assert strip_thresholds("sum(x) > bool 1.5e3") == "sum(x)"
    assert substitute(
        'rate(x{p=~"$pipeline"}[$__rate_interval]) ${pipeline:regex}', GRAFANA_VALUES | {"pipeline": "d"}
    ) == ('rate(x{p=~"d"}[1m]) d')
    assert substitute("x[$__range] $__range_s", GRAFANA_VALUES) == "x[5m] 300"
