"""The learner process: one per pipeline, the only writer of the live model.

``run_learner(spec, settings)`` consumes the labels topic with a confluent-kafka consumer
and *manual* partition assignment, hands each batch to :class:`models.learner.LearnerCore`
(parse, join with the served records, prequential evaluation, learning), produces the
joined examples to the training-log topic and bad labels to the dead-letter topic, and
publishes model snapshots the scorers pick up (``registry.latest_snapshot()``).

Crash safety. Each snapshot records the labels topic's next offsets; on start the
learner loads the latest snapshot and seeks there, so after a SIGKILL the labels learned
since that snapshot (lost with the process) are read and learned again, and none before
it is. The learned markers in Redis are the second line of defence (their lineage tells a
marker of a lost model state from one the snapshot contains; see :mod:`models.join`).
The training-log records of a batch are delivered (producer flush) *before* a snapshot
moves the offsets past it: the training log is at-least-once, keyed by ``event_id``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from models.learner import LabelMessage, LearnerCore, StepOutput
from models.registry import ModelRegistry, registry_key
from weir.metrics import LearnerMetrics, MetricsServer

if TYPE_CHECKING:
    from weir.settings import Settings
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.learner")

#: Labels per consumer batch; one Redis pipeline per batch for the join.
BATCH = 500
#: Seconds between sweeps (expiries, held early labels) and status writes.
SWEEP_EVERY = 1.0


class StepEmitter:
    """Produces what a :class:`LearnerCore` step asks for: training-log records and dead
    letters. ``flush`` waits for delivery and raises if anything was not delivered, so a
    caller never moves offsets (or a snapshot) past records that were lost.
    """

    def __init__(self, spec: PipelineSpec, settings: Settings, linger_ms: int = 20) -> None:
        from confluent_kafka import Producer

        self.spec = spec
        self.producer = Producer(
            {**settings.confluent_config(), "linger.ms": linger_ms, "enable.idempotence": True}
        )
        self.errors: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def emit(self, out: StepOutput) -> None:
        t = self.spec.topics
        # Keyed by the model: one partition, in the order the learner learned them. The
        # monitor's detectors read the loss sequence in that order; spread over partitions,
        # a monitor catching up would read them in partition-sized blocks, replaying the
        # model's learning curve once per partition (each one a "rise" in loss).
        key = self.spec.model.name.encode()
        for rec in out.training_log:
            self.producer.produce(t.training_log, rec, key, on_delivery=self._on_delivery)
        for dl in out.dead_letters:
            self.producer.produce(t.dead_letters, dl, on_delivery=self._on_delivery)
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        from confluent_kafka import KafkaException

        remaining = self.producer.flush(timeout)
        if remaining or self.errors:
            errors, self.errors = self.errors[:3], []
            raise KafkaException(
                f"learner: {remaining} training-log/dead-letter records undelivered ({errors}); "
                "not moving past them"
            )


def learner_group(spec: PipelineSpec) -> str:
    """Consumer group the learner commits its offsets to (for lag monitoring only)."""
    return f"{spec.consumer_group}-learner"


def run_learner(
    spec: PipelineSpec,
    settings: Settings,
    stop: threading.Event | None = None,
    metrics_port: int | None = None,
    *,
    metrics_registry: Any = None,
    ready: threading.Event | None = None,
) -> int:
    """Run the learner until ``stop`` is set or SIGTERM/SIGINT; returns an exit code.

    Args:
        spec: the pipeline spec.
        settings: process settings (Kafka, Redis, WEIR_MODEL_KEY, metrics address).
        stop: set it to stop cleanly (a final snapshot is published).
        metrics_port: port of ``/metrics``; default ``settings.metrics_port`` (0 = any).
        metrics_registry: a prometheus ``CollectorRegistry``; default a fresh one.
        ready: set once partitions are assigned and the model is loaded.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
    from prometheus_client import CollectorRegistry

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    client = settings.redis()
    registry = ModelRegistry(client, spec, key=registry_key(settings))
    metrics = LearnerMetrics(metrics_registry or CollectorRegistry()).init_series(spec)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = MetricsServer(metrics.registry, settings.metrics_host, port)
    log.info("learner metrics on %s", server.url)

    core = LearnerCore.start(spec, registry, client, metrics)
    log.info(
        "learner of %s: version %s, snapshot %s, %d labels learned, offsets %s",
        spec.name,
        core.version_id,
        core.snapshot_id,
        core.labels_learned,
        core.offsets,
    )
    topic = spec.topics.labels
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": learner_group(spec),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    emitter = StepEmitter(spec, settings)
    produce = emitter.emit

    def snapshot(force: bool = False) -> None:
        if not (force or core.snapshot_due()):
            return
        # Deliver the training log first: once the offsets move on it is never re-produced.
        emitter.flush(30)
        sid = core.maybe_snapshot(force=force)
        if sid is not None and core.offsets:
            consumer.commit(
                offsets=[TopicPartition(topic, p, o) for p, o in core.offsets.items()],
                asynchronous=True,
            )

    try:
        md = consumer.list_topics(topic, timeout=10)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise KafkaException(
                f"labels topic {topic!r} does not exist; `weir worker SPEC` and `weir produce SPEC` "
                "create the pipeline's topics"
            )
        assignment = [
            TopicPartition(topic, p, core.offsets.get(p, OFFSET_BEGINNING)) for p in sorted(meta.partitions)
        ]
        consumer.assign(assignment)
        log.info("assigned %s", [(tp.partition, tp.offset) for tp in assignment])
        if ready is not None:
            ready.set()
        last_sweep = 0.0
        while not stop.is_set():
            msgs = consumer.consume(num_messages=BATCH, timeout=0.2)
            batch = []
            for m in msgs:
                if m.error() is not None:
                    log.warning("labels topic error: %s", m.error())
                    continue
                batch.append(LabelMessage(m.value(), m.partition() or 0, m.offset() or 0, m.key()))
            if batch:
                produce(core.process(batch, snapshot=False))
            now = time.time()
            if now - last_sweep >= SWEEP_EVERY:
                produce(core.sweep(now, snapshot=False))
                core.write_status(now)
                last_sweep = now
            snapshot()
        snapshot(force=True)
        log.info("learner stopped: %d labels learned, snapshot %s", core.labels_learned, core.snapshot_id)
        return 0
    finally:
        try:
            emitter.producer.flush(10)
        finally:
            consumer.close()
            server.stop()
            client.close()
