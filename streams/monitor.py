"""The monitor process: drift statistics and the retrain loop, off the scoring hot path.

``weir monitor SPEC`` runs :func:`run_monitor`: one confluent-kafka consumer reads

* the predictions topic: feature drift (the features as served) and prediction drift;
* the training-log topic (joined examples): performance drift, fresh-label counting,
  the window a challenger is fitted on, and the shadow / rollback comparisons;
* the model-control topic: ``{"command": "retrain", "reason": ...}`` requests
  (``weir retrain SPEC``).

Every ``check_every`` records (and at least every ``check_seconds`` while anything
arrives) it publishes a :class:`~weir.contracts.DriftRecord` per ready statistic to the
drift topic, updates :class:`~weir.metrics.MonitorMetrics`, and asks the
:class:`~models.retrain.RetrainPolicy`. When that fires: fit a challenger on the
training log, read back from Kafka up to the offsets the trigger saw
(:mod:`streams.history`) -> ``registry.save`` (with an idempotency token) -> alias
``challenger``; the challenger then predicts on the served features of every prediction
record (serve time, as the champion did) and learns the incoming joined examples; at each
label the :class:`~models.shadow.ShadowGate` compares that with the champion's served
prediction for the same event and promotes it (alias ``champion``) or rejects it;
after a promotion the :class:`~models.shadow.RollbackGuard` may point ``champion``
back at the predecessor. The per-record logic is :class:`models.monitor.Monitor`, which
needs no Kafka; :func:`run_monitor` is the loop around it. See ``docs/drift.md``.

Durable state and outages (a restart, even a kill -9, loses nothing; an outage of Redis
or Kafka pauses the monitor, it never exits): see :mod:`streams.recovery`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# _Shadow and _Guard: checkpoints written before the core moved to models.monitor pickled
# them under this module's name; importing them here keeps those checkpoints readable.
from models.monitor import Intake, Monitor, _Guard, _Shadow  # noqa: F401
from streams.delivery import Delivery, renewing
from streams.recovery import CHECKPOINT, Offsets, RetryingRegistry, restore
from weir.contracts import DriftRecord, encode_drift_record, encode_retrain_request
from weir.errors import StackError
from weir.heap import freeze_startup_heap
from weir.resilience import Backoff, DependencyHealth, retry_sync

if TYPE_CHECKING:
    from weir.settings import Settings
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.monitor")


# --------------------------------------------------------------------------------------
# The Kafka loop
# --------------------------------------------------------------------------------------


def run_monitor(
    spec: PipelineSpec,
    settings: Settings,
    stop: threading.Event | None = None,
    *,
    registry: Any = None,
    metrics_registry: Any = None,
    metrics_port: int | None = None,
    check_every: int = 500,
    check_seconds: float = 5.0,
    checkpoint_seconds: float = 2.0,
    backoff: Backoff = Backoff(),
    on_ready: Callable[[Monitor], None] | None = None,
    delivery: Delivery | None = None,
) -> Monitor:
    """Run the monitor until ``stop`` is set (or SIGTERM/SIGINT in the main thread).

    Args:
        registry: the model registry; default ``ModelRegistry(settings.redis(), spec, key)``.
        metrics_registry: a prometheus ``CollectorRegistry``; default a fresh one.
        metrics_port: port of ``/metrics``; default ``settings.metrics_port``.
        check_every: records between two checks.
        check_seconds: at most this long between checks while records arrive.
        checkpoint_seconds: at most this long between checkpoints while records arrive
            (a decision that moved the registry checkpoints at once).
        backoff: the retry backoff while Redis or Kafka is unreachable.
        on_ready: called with the :class:`Monitor` once it is built and restored from
            its checkpoint (tests watch it).
        delivery: what publishes the drift records; default a :func:`streams.delivery.renewing`
            producer (tests give one whose first producer is stuck).

    Returns:
        The Monitor, after a clean stop (consumer closed, producer flushed).
    """
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
    from prometheus_client import CollectorRegistry

    from weir.metrics import MetricsServer, MonitorMetrics

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    if registry is None:
        from models.registry import ModelRegistry, registry_key

        registry = ModelRegistry(settings.redis(), spec, key=registry_key(settings))
    metrics = MonitorMetrics(metrics_registry or CollectorRegistry()).init_series(spec)
    health = DependencyHealth(metrics.registry, spec.name)
    reg = RetryingRegistry(registry, health, stop, backoff)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = MetricsServer(metrics.registry, settings.metrics_host, port)
    log.info("monitor %s: /metrics on %s", spec.name, server.url)

    # Every drift record is kept until Kafka acknowledges it (streams.delivery): one that
    # failed is produced again, a producer stuck after a broker restart is replaced, and a
    # checkpoint waits for them all. message.timeout.ms 0: a record waits for Kafka's
    # return instead of expiring; idempotence: the retries of an outage write it once.
    out = delivery if delivery is not None else renewing(settings, {"linger.ms": 20, "message.timeout.ms": 0})

    def publish(rec: DriftRecord) -> None:
        out.add([(spec.topics.drift, encode_drift_record(rec), rec.key)])
        out.send()  # what the producer's full queue does not take waits for the next send
        out.producer.poll(0)

    def flush_producer() -> None:
        out.send()
        left, errors = out.wait(5)
        if left:
            health.failed("kafka")
            raise StackError(
                f"{left} drift records not yet delivered to {spec.topics.drift!r} "
                f"({errors[0] if errors else 'kafka'}); is Kafka at {settings.kafka_bootstrap} up?"
            )

    def read_history(upto: dict[int, int]) -> Any:
        # The retrain's window, read back from the training log (durable across restarts);
        # a failure (Kafka away past the timeout) makes the Monitor fit on its buffer.
        from streams.history import read_training_window

        return read_training_window(settings, spec, upto, timeout=60.0)

    monitor = Monitor(spec, reg, publish, metrics, check_every=check_every, history=read_history)
    offsets: Offsets = restore(monitor, reg, settings, spec)
    if on_ready is not None:
        on_ready(monitor)
    t = spec.topics

    def on_assign(consumer: Any, partitions: list[Any]) -> None:
        # Resume where the checkpointed state ends, not at Kafka's committed offsets.
        for tp in partitions:
            off = offsets.get(tp.topic, {}).get(tp.partition)
            if off is not None:
                tp.offset = off
        consumer.assign(partitions)

    instance_id = settings.instance_id or f"{spec.consumer_group}-monitor"
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"{spec.consumer_group}-monitor",
            # Static membership (one monitor per pipeline): a restarted monitor gets its
            # partitions back at once instead of after the dead one's session timeout;
            # a second monitor started by mistake fences the first out.
            "group.instance.id": instance_id,
            "session.timeout.ms": int(settings.kafka_session_timeout * 1000),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    consumer.subscribe([t.predictions, t.training_log, t.model_control], on_assign=on_assign)
    # Records at or past the checkpoint's offsets only: a replay is skipped, never re-applied.
    intake = Intake(monitor, offsets)
    applied = 0  # records applied since the last checkpoint
    replayed_logged = 0
    last_checkpoint = time.monotonic()
    checkpointed_transitions = monitor.transitions

    def checkpoint() -> None:
        nonlocal applied, last_checkpoint, checkpointed_transitions
        retry_sync(flush_producer, what="drift records flush", health=health, backoff=backoff, stop=stop)
        covered = {topic: dict(parts) for topic, parts in offsets.items()}
        info = {
            "offsets": {topic: {str(p): o for p, o in parts.items()} for topic, parts in covered.items()},
            "spec_hash": spec.spec_hash(),
            "examples_seen": monitor.examples_seen,
            "predictions_seen": monitor.predictions_seen,
            "shadow": monitor.shadow.version_id if monitor.shadow else None,
            "guard": monitor.guard.champion_id if monitor.guard else None,
        }
        reg.save_checkpoint(
            CHECKPOINT, {"monitor": monitor.state(), "offsets": covered, "spec_hash": spec.spec_hash()}, info
        )
        applied = 0
        last_checkpoint = time.monotonic()
        checkpointed_transitions = monitor.transitions
        # Kafka's committed offsets follow the checkpoint (they are not what a restart
        # reads: the checkpoint is); a failed commit is retried at the next checkpoint.
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        tps = [TopicPartition(tp, p, o) for tp, parts in covered.items() for p, o in parts.items()]
        tps = [tp for tp in tps if (tp.topic, tp.partition) in assigned]
        if tps:
            try:
                consumer.commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                log.warning("offset commit failed (kept in the checkpoint): %s", exc)

    freeze_startup_heap()  # the state restored: later full collections skip it (weir.heap)
    kafka_errors = 0
    clean = False
    try:
        try:
            while not stop.is_set():
                batch = consumer.consume(500, timeout=0.2)
                failed = False
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        # e.g. fenced: another monitor took this one's place (librdkafka reports
                        # it as code _FATAL with fatal() False on the message).
                        if err.fatal() or err.code() == KafkaError._FATAL:
                            raise StackError(
                                f"monitor {spec.name}: fatal Kafka error {err.str()}; is another "
                                f"monitor running for this pipeline (group.instance.id "
                                f"{instance_id!r})? Run exactly one"
                            )
                        if err.code() != KafkaError._PARTITION_EOF:
                            failed = True
                            kafka_errors += 1
                            health.failed("kafka")
                            if kafka_errors <= 3 or kafka_errors % 100 == 0:
                                log.warning("consume error (%d so far): %s", kafka_errors, err.str())
                        continue
                    topic, part, off = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
                    if not intake.add(topic, part, off, msg.value()):
                        continue
                    applied += 1
                    if monitor.transitions != checkpointed_transitions:
                        checkpoint()  # a decision moved the registry: make it durable now
                intake.flush()
                if intake.replayed != replayed_logged:
                    log.info(
                        "skipped %d records the monitor's state already covers (a replay); %d so far",
                        intake.replayed - replayed_logged,
                        intake.replayed,
                    )
                    replayed_logged = intake.replayed
                if batch and not failed:
                    health.ok("kafka")
                if monitor.since_check and time.time() - monitor.last_check >= check_seconds:
                    monitor.check()
                if monitor.transitions != checkpointed_transitions or (
                    applied and time.monotonic() - last_checkpoint >= checkpoint_seconds
                ):
                    checkpoint()
                out.producer.poll(0)
            clean = True
        except Exception:
            if not stop.is_set():
                raise
            # Stopped while a call was being retried through an outage: the state in hand
            # may be half-applied, so it is not checkpointed; the restart resumes from the last.
            log.warning("monitor %s stopped during an outage; it resumes from its last checkpoint", spec.name)
    finally:
        try:
            if clean and applied and not reg.interrupted:
                checkpoint()
        except Exception as exc:  # stopped during an outage: the last checkpoint stands
            log.warning("no final checkpoint (%s); the restart resumes from the previous one", exc)
        consumer.close()
        try:
            out.send()
            left, _ = out.wait(10)
            if left:
                log.warning("%d drift records not delivered at the stop (the restart publishes again)", left)
        except Exception as exc:  # refused for good: said, and the stop goes on
            log.error("drift records not delivered at the stop: %s", exc)
        server.stop()
        log.info(
            "monitor %s stopped: %d predictions, %d examples (%d kept out of the performance "
            "statistics: served by another version), %d replayed records skipped, "
            "%d retrains",
            spec.name,
            monitor.predictions_seen,
            monitor.examples_seen,
            monitor.stale_examples,
            intake.replayed,
            monitor.retrains,
        )
    return monitor


def request_retrain(spec: PipelineSpec, settings: Settings, reason: str) -> None:
    """Ask the monitor for a manual retrain (a message on the model-control topic)."""
    from confluent_kafka import Producer

    producer = Producer(settings.producer_config())
    errors: list[str] = []
    producer.produce(
        spec.topics.model_control,
        encode_retrain_request(reason, time.time()),
        b"retrain",
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    left = producer.flush(10)
    if left or errors:
        raise StackError(
            f"could not send the retrain request to {spec.topics.model_control!r} "
            f"({errors[0] if errors else 'timed out'}); is Kafka at "
            f"{settings.kafka_bootstrap} up (`make up`)?"
        )
