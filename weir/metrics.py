"""Every Prometheus metric of every Weir process, built in one place.

Each process builds its metrics from an injected :class:`CollectorRegistry`
(a fresh one per test), so names are defined once and the dashboards and alert
rules in ``dashboards/`` and ``deploy/prometheus/`` can be checked against them.
Names carry their units (``_seconds``, ``_messages``, ``_total``); every series
has a ``pipeline`` label so one Prometheus can watch many pipelines.

A labelled metric has no series until a label set is first used, so a counter of a
rare event (a failed retrain, a rollback, one dead-letter reason) would be absent
until it happens, and ``increase()`` would miss its first increment. Each class's
:meth:`init_series` therefore creates, at 0, every series whose label values are
known when the process starts: the pipeline, the model name and the enumerations
below (the Prometheus convention). ``tests/unit/test_rules_metrics.py`` checks the
enumerations against the code that produces the values.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

import weir
from weir.errors import ConfigError

if TYPE_CHECKING:
    from weir.spec import PipelineSpec

# Latency buckets (event-to-prediction and batch time), in seconds. histogram_quantile
# interpolates linearly inside the bucket a quantile falls in, so a quantile is only as
# precise as that bucket is narrow. The targets and alerts live below 100 ms (p99 <= 50 ms
# at 60% of the max rate), where a 1-2-5 or doubling series is too coarse: a p99 anywhere
# between 20 and 50 ms would read as one interpolation inside a single bucket. So: 1 ms
# steps up to 5 ms, then steps of at most ~50% (5 ms at most up to 50 ms) to 100 ms, then
# 1-1.5-2-2.5-3-4-5-7.5 per decade up to 10 s, and 30 s for a backlog after a restart.
# 35 buckets per series: still cheap to scrape and store (one series per pipeline).
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.045,
    0.05,
    0.06,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    30.0,
)
# Redis round trips are sub-millisecond on loopback, tens of ms under load; the same
# reasoning as LATENCY_BUCKETS: p50 and p99 must be readable below 10 ms.
REDIS_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    5.0,
)
# Batches are 1..scoring.batch_size events (default 500).
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# Feature ages (features/freshness.py), event-time seconds. Most are exactly 0 (the event
# itself brought the value): the first bucket is 0, so the fresh share is one bucket. The
# alert compares the median with half the feature's window (1 min to days): a bucket
# boundary at or near half of each usual window (30 s, 7.5 min, 30 min, 12 h) and steps of
# at most ~2.5x between, so the interpolated median is within a bucket of the truth.
AGE_BUCKETS = (
    *(0.0, 1, 5, 15, 30, 60, 120, 300, 450, 900, 1800, 3600, 7200),
    *(4 * 3600, 12 * 3600, 86400, 7 * 86400),
)
# Label delays range from seconds (tests) to the label horizon (hours).
DELAY_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)

# Label values known before anything happens (see init_series).
#: Dead-letter reasons of the events topic (weir/contracts.py parse_event, and
#: ``late`` and ``model_error`` (a poison event: scoring it raised) from streams/scoring.py).
EVENT_DEAD_LETTER_REASONS: tuple[str, ...] = (
    "not_json",
    "not_finite",
    "not_object",
    "empty",
    "missing_field",
    "bad_type",
    "bad_timestamp",
    "absurd_timestamp",
    "too_large",
    "late",
    "model_error",
)
#: Dead-letter reasons of the labels topic (weir/contracts.py parse_label, then
#: models/factory.py coerce_label): the message faults events have too, and the label's own.
LABEL_DEAD_LETTER_REASONS: tuple[str, ...] = (
    *(r for r in EVENT_DEAD_LETTER_REASONS if r != "late"),
    "label_type",
    "label_class",
)
#: weir_label_joins_total{outcome}: models/join.py OUTCOMES.
JOIN_OUTCOMES: tuple[str, ...] = ("hit", "early", "duplicate", "expired", "invalid", "resolved", "unknown")
#: weir_redis_roundtrip_seconds{op}: streams/scoring.py.
REDIS_OPS: tuple[str, ...] = ("features", "served")
#: weir_event_order_wait_seconds_total{waiter}: streams/sync.py WAITERS.
ORDER_WAITERS: tuple[str, ...] = ("scorer", "learner")
#: weir_drift_statistic{kind}, weir_drift_events_total{kind}: models/drift/ (DriftKind in weir/contracts.py).
DRIFT_KINDS: tuple[str, ...] = ("feature", "prediction", "performance", "estimate")
#: weir_retrains_total{trigger}: models/retrain.py Trigger.
RETRAIN_TRIGGERS: tuple[str, ...] = ("manual", "performance", "features", "schedule")
#: weir_retrains_total{outcome}: models/monitor.py.
RETRAIN_OUTCOMES: tuple[str, ...] = ("skipped", "trained", "failed", "promoted", "rejected")


def _existing(registry: CollectorRegistry, name: str) -> Any:
    """A collector already registered under ``name``: a process with two roles
    (``weir worker --role all`` scores and learns) shares the metrics both define."""
    return registry._names_to_collectors.get(name)


def _build_info(registry: CollectorRegistry, role: str) -> Info:
    found = _existing(registry, "weir_build_info")
    if found is not None:
        return found  # type: ignore[no-any-return]
    info = Info("weir_build", "Weir version and process role.", registry=registry)
    info.info({"version": weir.__version__, "role": role})
    return info


def _model_version_gauge(registry: CollectorRegistry, help_text: str) -> Gauge:
    found = _existing(registry, "weir_model_version_info")
    if found is not None:
        return found  # type: ignore[no-any-return]
    return Gauge(
        "weir_model_version_info",
        help_text,
        ["pipeline", "model", "model_version"],
        registry=registry,
    )


def _dead_letters_counter(registry: CollectorRegistry) -> Counter:
    """Bad events (worker) and bad labels (learner) count in one counter, by reason."""
    found = _existing(registry, "weir_dead_letters_total")
    if found is not None:
        return found  # type: ignore[no-any-return]
    return Counter(
        "weir_dead_letters_total",
        "Messages sent to the dead-letter topic, by reason.",
        ["pipeline", "reason"],
        registry=registry,
    )


@dataclass
class DependencyMetrics:
    """``weir_dependency_up`` and ``weir_dependency_retries_total``, which every process has
    (set by :class:`weir.resilience.DependencyHealth`); built once per registry."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.up: Gauge = _existing(r, "weir_dependency_up") or Gauge(
            "weir_dependency_up",
            "1 while the last call to this server succeeded, 0 while it is being retried.",
            ["pipeline", "dependency"],
            registry=r,
        )
        self.retries: Counter = _existing(r, "weir_dependency_retries_total") or Counter(
            "weir_dependency_retries_total",
            "Retries of a call to a server that failed transiently (outage, timeout).",
            ["pipeline", "dependency"],
            registry=r,
        )


@dataclass
class WorkerMetrics:
    """Metrics of a scoring worker (``weir worker SPEC``)."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        _build_info(r, "worker")
        self.events = Counter(
            "weir_events_total", "Events read from the events topic.", ["pipeline"], registry=r
        )
        self.predictions = Counter(
            "weir_predictions_total",
            "Predictions published, by model version (v1; the snapshot is in weir_model_version_info).",
            ["pipeline", "model", "model_version"],
            registry=r,
        )
        self.dead_letters = _dead_letters_counter(r)
        self.duplicates = Counter(
            "weir_duplicate_events_total",
            "Redelivered events (same event_id) served from stored features.",
            ["pipeline"],
            registry=r,
        )
        self.late_events = Counter(
            "weir_late_events_total",
            "Events later than the spec's lateness, by what was done with them.",
            ["pipeline", "policy"],
            registry=r,
        )
        self.batch_size = Histogram(
            "weir_batch_size_events",
            "Events per processed batch.",
            ["pipeline"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "weir_batch_processing_seconds",
            "Wall time of one batch, taken to acked: validate, features, score, produce, served "
            "records (and the wait for the batch before it).",
            ["pipeline"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "weir_event_to_prediction_seconds",
            "From the event's Kafka timestamp to its prediction being sent.",
            ["pipeline"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "weir_consumer_lag_messages",
            "Messages behind the partition's high watermark.",
            ["pipeline", "topic", "partition"],
            registry=r,
        )
        self.redis_seconds = Histogram(
            "weir_redis_roundtrip_seconds",
            "Redis round trips, by operation.",
            ["pipeline", "op"],
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.model_version = _model_version_gauge(r, "1 for the model version this process uses.")
        self.snapshot_age = Gauge(
            "weir_snapshot_age_seconds",
            "Age of the model snapshot this process scores with (0 with a live model).",
            ["pipeline", "model"],
            registry=r,
        )
        self.feature_freshness = Gauge(
            "weir_feature_last_event_timestamp_seconds",
            "Event time of the newest event whose features were computed.",
            ["pipeline"],
            registry=r,
        )
        self.feature_age = Histogram(
            "weir_feature_age_seconds",
            "Per windowed feature, event-time seconds from the newest event that contributed to "
            "it to the event scored (no contribution in the window counts as the window).",
            ["pipeline", "feature"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.feature_stale_after = Gauge(
            "weir_feature_stale_after_seconds",
            "Age past which a feature of a field counts as stale: half its window (WeirFeatureStale).",
            ["pipeline", "feature"],
            registry=r,
        )
        self.order_wait = Counter(
            "weir_event_order_wait_seconds",
            "Role all: seconds spent waiting to take events and labels in event-time order "
            "(scorer: for labels due before its next event; learner: for events due before its next label).",
            ["pipeline", "waiter"],
            registry=r,
        )

    def init_series(self, spec: PipelineSpec) -> Self:
        """Create every series known at start at 0 (counters, histograms); returns self."""
        p = spec.name
        for waiter in ORDER_WAITERS:
            self.order_wait.labels(p, waiter)
        for metric in (self.events, self.duplicates, self.batch_size, self.batch_seconds, self.latency):
            metric.labels(p)
        for reason in EVENT_DEAD_LETTER_REASONS:
            self.dead_letters.labels(p, reason)
        self.late_events.labels(p, spec.late_events)
        for op in REDIS_OPS:
            self.redis_seconds.labels(p, op)
        from features.freshness import freshness_names, stale_after

        for name in freshness_names(spec):
            self.feature_age.labels(p, name)
        for name, seconds in stale_after(spec).items():
            self.feature_stale_after.labels(p, name).set(seconds)
        return self


@dataclass
class LearnerMetrics:
    """Metrics of the learner (label join, online learning, online evaluation)."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        _build_info(r, "learner")
        self.labels = Counter(
            "weir_labels_total", "Labels read from the labels topic.", ["pipeline"], registry=r
        )
        self.joins = Counter(
            "weir_label_joins_total",
            "Label join outcomes: hit, early (held), duplicate, unknown, expired, invalid.",
            ["pipeline", "outcome"],
            registry=r,
        )
        self.expiries = Counter(
            "weir_label_expiries_total",
            "Served events whose label never came within the horizon.",
            ["pipeline"],
            registry=r,
        )
        self.label_delay = Histogram(
            "weir_label_delay_seconds",
            "From an event's time to its label's time.",
            ["pipeline"],
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.learned = Counter(
            "weir_labels_learned_total",
            "Labels the model learned from.",
            ["pipeline", "model"],
            registry=r,
        )
        self.online_metric = Gauge(
            "weir_online_metric",
            "Prequential metric of a model version; window is 'all' or 'rolling'.",
            ["pipeline", "model", "model_version", "metric", "window"],
            registry=r,
        )
        self.dead_letters = _dead_letters_counter(r)
        self.snapshots = Counter(
            "weir_snapshots_published_total",
            "Model snapshots published for the scorers.",
            ["pipeline", "model"],
            registry=r,
        )
        self.model_version = _model_version_gauge(r, "1 for the model version this process uses.")
        # Sampled on a timer by weir/footprint.py (one SCAN step per sweep), never per event.
        self.redis_keys = Gauge(
            "weir_redis_keys",
            "Keys of the pipeline in Redis by kind (win, meta, served, ...), at the last full SCAN pass.",
            ["pipeline", "kind"],
            registry=r,
        )
        self.redis_memory = Gauge(
            "weir_redis_memory_bytes",
            "Redis memory of the pipeline's keys by kind: keys x mean MEMORY USAGE of a sample.",
            ["pipeline", "kind"],
            registry=r,
        )
        self.redis_maxmemory = Gauge(
            "weir_redis_maxmemory_bytes",
            "The Redis server's maxmemory (0: no limit), read with the footprint.",
            ["pipeline"],
            registry=r,
        )

    def init_series(self, spec: PipelineSpec) -> Self:
        """Create every series known at start at 0 (counters, histograms); returns self."""
        p, model = spec.name, spec.model.name
        for metric in (self.labels, self.expiries, self.label_delay):
            metric.labels(p)
        for outcome in JOIN_OUTCOMES:
            self.joins.labels(p, outcome)
        for reason in LABEL_DEAD_LETTER_REASONS:
            self.dead_letters.labels(p, reason)
        self.learned.labels(p, model)
        self.snapshots.labels(p, model)
        return self


@dataclass
class MonitorMetrics:
    """Metrics of drift monitoring and the retrain loop."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        _build_info(r, "retrainer")
        self.drift_statistic = Gauge(
            "weir_drift_statistic",
            "Latest drift statistic (kind: feature, prediction, performance).",
            ["pipeline", "kind", "name", "statistic"],
            registry=r,
        )
        self.drift_detected = Gauge(
            "weir_drift_detected",
            "1 while the latest check of this statistic is past its threshold.",
            ["pipeline", "kind", "name"],
            registry=r,
        )
        self.drift_events = Counter(
            "weir_drift_events_total",
            "Drift detections.",
            ["pipeline", "kind"],
            registry=r,
        )
        self.retrains = Counter(
            "weir_retrains_total",
            "Retrain decisions by trigger and outcome (skipped, trained, failed, promoted, rejected).",
            ["pipeline", "trigger", "outcome"],
            registry=r,
        )
        self.promotions = Counter(
            "weir_promotions_total", "Challengers promoted to champion.", ["pipeline"], registry=r
        )
        self.rollbacks = Counter(
            "weir_rollbacks_total",
            "Champions rolled back to their predecessor.",
            ["pipeline"],
            registry=r,
        )
        self.estimated_performance = Gauge(
            "weir_estimated_performance",
            "Label-free (CBPE) estimate of a model version's metric on its last served predictions.",
            ["pipeline", "model_version", "metric"],
            registry=r,
        )
        self.estimate_error = Gauge(
            "weir_estimate_error",
            "Estimated minus realised accuracy of a model version, over its last labelled predictions.",
            ["pipeline", "model_version"],
            registry=r,
        )

    def init_series(self, spec: PipelineSpec) -> Self:
        """Create every counter series known at start at 0; returns self.

        ``weir_retrains_total{outcome="failed"}`` at 0 is what lets the WeirRetrainFailed
        alert (an ``increase()``) see the first failure.
        """
        p = spec.name
        for kind in DRIFT_KINDS:
            self.drift_events.labels(p, kind)
        for trigger in RETRAIN_TRIGGERS:
            for outcome in RETRAIN_OUTCOMES:
                self.retrains.labels(p, trigger, outcome)
        self.promotions.labels(p)
        self.rollbacks.labels(p)
        return self


class MetricsServer:
    """``/metrics`` over HTTP for one registry; ``stop()`` shuts it down cleanly.

    Raises:
        ConfigError: the port is taken (two Weir processes on one host with the default
            port, say a scorer and a learner), naming the option that moves it.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        self._server: Any
        self._thread: threading.Thread
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(
                f"cannot serve /metrics on {host}:{port}: the port is in use (another Weir process "
                "on this host?). Give each process its own: --metrics-port N or WEIR_METRICS_PORT=N "
                "(0 picks a free port)"
            ) from exc
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
