"""The monitor over the real Kafka and Redis: concept change -> retrain -> promotion.

A champion trained on Agrawal classification_function 6 serves (frozen) a stream that
switches to function 7 at label 2,000; its joined examples go to the training-log
topic and its predictions to the predictions topic. The monitor must detect the
performance drift within 1,000 labels, fit a challenger, shadow it and promote it in
the real registry. The same length of stationary stream must cause no retrain.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
from confluent_kafka import Producer

from models.drift import DriftRecord
from models.monitor import Monitor
from models.registry import ModelRegistry
from streams.admin import delete_keys
from streams.delivery import Delivery
from streams.monitor import request_retrain, run_monitor
from tests.integration.conftest import wait_for
from tests.integration.test_delivery_renew import stuck_producer
from tests.unit.test_retrain_monitor import agrawal_examples, make_spec, trained_champion
from weir.settings import Settings
from weir.spec import PipelineSpec

N = 5000
CHANGE_AT = 2000


def _produce(settings: Settings, spec: PipelineSpec, records: list[dict[str, Any]]) -> None:
    producer = Producer({**settings.confluent_config(), "linger.ms": 20})
    for r in records:
        key = r["event_id"].encode()
        pred = {
            "event_id": r["event_id"],
            "entity_id": r["event_id"],
            "ts": r["ts"],
            "model": spec.model.name,
            "model_version": r["model_version"],
            "prediction": r["prediction"],
            "proba": None,
            "features": r["features"],
            "scored_at": r["ts"],
        }
        producer.produce(spec.topics.predictions, orjson.dumps(pred), key)
        producer.produce(spec.topics.training_log, orjson.dumps(r), key)
        producer.poll(0)
    assert producer.flush(30) == 0


class Running:
    """run_monitor in a thread; ``stop()`` joins it. ``options`` go to run_monitor."""

    def __init__(self, spec: PipelineSpec, settings: Settings, registry: Any, **options: Any) -> None:
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.monitor: Monitor | None = None
        self.error: BaseException | None = None

        def ready(m: Monitor) -> None:
            self.monitor = m
            self.ready.set()

        def target() -> None:
            try:
                run_monitor(
                    spec,
                    settings,
                    self.stop_event,
                    registry=registry,
                    on_ready=ready,
                    **{"metrics_port": 0, "check_every": 100, **options},
                )
            except BaseException as exc:  # surfaced by stop()
                self.error = exc
                self.ready.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert self.ready.wait(60), "monitor did not start"

    def stop(self) -> Monitor:
        self.stop_event.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "monitor did not stop within 20 s"
        if self.error is not None:
            raise self.error
        assert self.monitor is not None
        return self.monitor


def drift_records(settings: Settings, consume_all: Any, spec: PipelineSpec) -> list[DriftRecord]:
    """Every record on the drift topic up to its end now (read until the high watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**settings.confluent_config(), "group.id": f"{spec.name}-watermarks"})
    try:
        md = c.list_topics(spec.topics.drift, timeout=10).topics[spec.topics.drift]
        ends = [
            c.get_watermark_offsets(TopicPartition(spec.topics.drift, p), timeout=10) for p in md.partitions
        ]
    finally:
        c.close()
    msgs = consume_all(spec.topics.drift, sum(high - low for low, high in ends), timeout=60.0)
    return [DriftRecord.from_dict(orjson.loads(m.value())) for m in msgs]


def _setup(make_topics: Any, redis_client: Any) -> tuple[PipelineSpec, Any, ModelRegistry]:
    spec = make_topics.for_spec(make_spec(), partitions=1)
    champion = trained_champion(spec)
    registry = ModelRegistry(redis_client, spec)
    v = registry.save(champion, parent=None, trigger="initial", reason="trained on function 6")
    registry.set_alias("champion", v.id)
    return spec, champion, registry


def _cleanup(redis_client: Any, spec: PipelineSpec) -> None:
    delete_keys(redis_client, spec.redis_prefix)


def test_concept_change_is_detected_retrained_and_promoted(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any
) -> None:
    t0 = time.monotonic()
    spec, champion, registry = _setup(make_topics, redis_client)
    first = registry.alias("champion")
    try:
        records = agrawal_examples(spec, champion, [(6, CHANGE_AT), (7, N - CHANGE_AT)])
        running = Running(spec, settings, registry)
        _produce(settings, spec, records)
        mon = running.monitor
        assert mon is not None
        # Both topics: one consumer reads them, and librdkafka may hand over one
        # partition's backlog well before the other's; the feature and prediction
        # statistics need the predictions.
        wait_for(
            lambda: mon.examples_seen >= N and mon.predictions_seen >= N,
            40,
            f"the monitor to read {N} examples and {N} predictions",
        )
        running.stop()
        champion_now = registry.alias("champion")
        assert champion_now != first, "no promotion"
        promoted = registry.get(str(champion_now))
        assert promoted.trigger == "performance" and promoted.parent == first
        assert promoted.meta["shadow"]["labels"] == spec.retrain.shadow_labels
        assert promoted.meta["data_sha256"] and promoted.meta["window"]["since_ts"] is not None
        # Fitted on the training log read back from Kafka (#16.4), not on the monitor's buffer.
        hist = promoted.meta["history"]
        assert hist["source"] == "kafka" and hist["offsets"]["0"][1] > hist["offsets"]["0"][0], hist
        assert registry.alias("challenger") is None

        out = drift_records(settings, consume_all, spec)
        perf = [r for r in out if r.kind == "performance" and r.drifted]
        assert perf, "no performance drift record on the drift topic"
        seen = (perf[0].detail or {})["labels_seen"]
        assert CHANGE_AT < seen <= CHANGE_AT + 1000, f"detected at label {seen}"
        names = [(r.name, r.statistic) for r in out if r.kind == "decision" and r.drifted]
        assert ("retrain", "performance") in names
        assert ("challenger", "trained") in names
        assert ("promotion", "promote") in names
        assert {r.kind for r in out} >= {"feature", "prediction", "performance", "decision"}
        m = mon.metrics
        assert m is not None
        assert m.registry.get_sample_value("weir_promotions_total", {"pipeline": spec.name}) == 1
    finally:
        _cleanup(redis_client, spec)
    assert time.monotonic() - t0 < 60


def test_stationary_stream_causes_no_retrain(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any
) -> None:
    spec, champion, registry = _setup(make_topics, redis_client)
    first = registry.alias("champion")
    try:
        records = agrawal_examples(spec, champion, [(6, N)])
        running = Running(spec, settings, registry)
        _produce(settings, spec, records)
        mon = running.monitor
        assert mon is not None
        wait_for(
            lambda: mon.examples_seen >= N and mon.predictions_seen >= N,
            40,
            f"the monitor to read {N} examples and predictions",
        )
        running.stop()
        assert mon.retrains == 0 and mon.promotions == []
        assert registry.alias("champion") == first and len(registry.list()) == 1
        out = drift_records(settings, consume_all, spec)
        decisions = [r for r in out if r.kind == "decision"]
        assert decisions and not any(r.drifted for r in decisions)
        assert not any(r.kind == "performance" and r.drifted for r in out)
    finally:
        _cleanup(redis_client, spec)


def test_drift_records_land_when_the_producer_is_stuck_and_replaced(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any
) -> None:
    """The monitor's drift records go through a Delivery (streams/delivery.py): a producer
    that acknowledges nothing (as the learner's once did after a Kafka restart) is replaced
    and every record it held lands. Before, the monitor's own producer was kept: its
    checkpoints retried the flush for as long as it ran, and its drift records never came."""
    spec, champion, registry = _setup(make_topics, redis_client)
    stuck = stuck_producer(settings)
    delivery = Delivery(stuck, make=lambda: Producer(settings.producer_config()), renew_after=1.0)
    try:
        running = Running(spec, settings, registry, delivery=delivery)
        _produce(settings, spec, agrawal_examples(spec, champion, [(6, N)]))
        mon = running.monitor
        assert mon is not None
        wait_for(lambda: mon.examples_seen >= N, 40, f"the monitor to read {N} examples")
        wait_for(lambda: delivery.renewals >= 1, 30, "the stuck producer to be replaced")
        running.stop()  # its final checkpoint waits for every drift record
        assert delivery.producer is not stuck
        out = drift_records(settings, consume_all, spec)
        assert [r for r in out if r.kind == "decision"], "no decision record on the drift topic"
        assert delivery.wait(1) == (0, []), "drift records left undelivered"
    finally:
        stuck.purge()
        _cleanup(redis_client, spec)


def test_manual_retrain_request_over_kafka(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any
) -> None:
    spec, champion, registry = _setup(make_topics, redis_client)
    try:
        records = agrawal_examples(spec, champion, [(6, 800)])
        running = Running(spec, settings, registry)
        _produce(settings, spec, records)
        mon = running.monitor
        assert mon is not None
        wait_for(lambda: mon.examples_seen >= 800, 30, "the monitor to read 800 examples")
        request_retrain(spec, settings, "integration test")
        wait_for(lambda: registry.alias("challenger") is not None, 20, "a challenger")
        running.stop()
        assert registry.get(str(registry.alias("challenger"))).trigger == "manual"
    finally:
        _cleanup(redis_client, spec)
