"""How the monitor survives restarts and outages: its checkpoint, the training buffer
read back from Kafka, and a registry whose calls wait out an outage.

Durable state (a restart, even a kill -9, loses nothing):

* The monitor checkpoints its state to the registry (``checkpoint:monitor``, pickled
  and signed like a model): the drift statistics, the retrain policy, the challenger in
  shadow with its gate, the rollback watch with its model, and the Kafka offsets the
  state covers. It checkpoints right after every decision that moved the registry
  (retrain, promotion, rejection, rollback), every ``checkpoint_seconds`` while records
  arrive, and on a clean stop. Drift records are flushed to Kafka first; offsets are
  committed to Kafka only after the checkpoint is written.
* The training buffer (up to ``retrain.window_labels`` joined examples) is not copied
  into the checkpoint: it holds the training-log positions of the buffered records and
  a restart reads them back from the training-log topic.
* On start the monitor seeks every partition to the checkpoint's offsets and applies
  the records from there on to the restored state, including those the stopped process
  had applied after its last checkpoint (at-least-once: a drift record may be published
  twice). A record below those offsets, which Kafka may still deliver (a rebalance, a
  fetch reset), is one the state covers: :class:`models.monitor.Intake` skips it, so no
  record is applied twice to one state. A retrain saved in the few milliseconds
  between a registry write and its checkpoint is adopted from the ``challenger`` alias.

Outages: every registry call, the checkpoint, and the drift records' flush are retried
with :func:`weir.resilience.retry_sync` (bounded exponential backoff) while Redis or
Kafka is down or paused: the monitor pauses consumption, reports
``weir_dependency_up{dependency}`` 0 and counts ``weir_dependency_retries_total``,
and goes on where it stopped when the server returns. It does not exit.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson

from models.monitor import CHECKPOINT_FORMAT, Monitor, Offsets, Position
from weir.contracts import TrainingRecord, decode_training_record
from weir.errors import ModelError, ModelKeyError, StackError
from weir.resilience import Backoff, DependencyHealth, retry_sync

if TYPE_CHECKING:
    from weir.settings import Settings
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.monitor")

#: The registry checkpoint the monitor keeps its state in.
CHECKPOINT = "monitor"


class RetryingRegistry:
    """The registry with every call retried while Redis is unreachable or paused.

    The monitor's thread blocks inside the call (consumption pauses) and goes on with
    the same call when Redis answers again; only ``stop`` ends the wait (the call then
    raises and ``interrupted`` is set, so no half-made state is checkpointed).
    """

    def __init__(
        self,
        registry: Any,
        health: DependencyHealth | None,
        stop: threading.Event,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.registry = registry
        self.health = health
        self.stop = stop
        self.backoff = backoff
        self.interrupted = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.registry, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return retry_sync(
                    lambda: attr(*args, **kwargs),
                    what=f"registry.{name}",
                    health=self.health,
                    backoff=self.backoff,
                    stop=self.stop,
                )
            except Exception:
                if self.stop.is_set():
                    self.interrupted = True
                raise

        return call


def read_back(
    settings: Settings, spec: PipelineSpec, positions: list[Position], timeout: float = 30.0
) -> dict[Position, TrainingRecord]:
    """The training-log records at ``positions`` (the checkpointed buffer), by position.

    Records the topic's retention deleted are missing from the result. Raises StackError
    (retried by the caller) when a partition's end could not be reached: Kafka is away.
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    topic = spec.topics.training_log
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for part, off in positions:
        first[part] = min(off, first.get(part, off))
        last[part] = max(off, last.get(part, off))
    if not first:
        return {}
    wanted = set(positions)
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"{spec.consumer_group}-monitor-readback",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    out: dict[Position, TrainingRecord] = {}
    done: set[int] = set()
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in first.items()])
        deadline = time.monotonic() + timeout
        while len(done) < len(first) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                err = msg.error()
                p = msg.partition()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and p is not None:
                        done.add(p)  # records deleted by retention end here
                    continue
                o = msg.offset()
                if p is None or o is None:
                    continue
                if (p, o) in wanted:
                    try:
                        rec = decode_training_record(msg.value())
                    except orjson.JSONDecodeError:
                        continue
                    if rec is not None:
                        out[(p, o)] = rec
                if o >= last[p]:
                    done.add(p)
    finally:
        consumer.close()
    if len(done) < len(first):
        raise StackError(
            f"could not read the monitor's buffer back from {topic!r} within {timeout:g}s "
            f"({len(out)} of {len(wanted)} records); is Kafka at {settings.kafka_bootstrap} up?"
        )
    return out


def restore(monitor: Monitor, registry: RetryingRegistry, settings: Settings, spec: PipelineSpec) -> Offsets:
    """Take up the last checkpoint, if any: state, buffer (read back) and offsets."""
    try:
        found = registry.load_checkpoint(CHECKPOINT)
    except ModelKeyError:  # this process has another key than the pipeline: stop, say so
        raise
    except ModelError as exc:  # refused (integrity): start afresh rather than trust it
        log.error("ignoring the monitor checkpoint: %s", exc)
        found = None
    if found is None:
        monitor.reconcile()
        return {}
    payload, meta = found
    state = payload.get("monitor") or {}
    if payload.get("spec_hash") != spec.spec_hash() or state.get("format") != CHECKPOINT_FORMAT:
        log.warning(
            "ignoring the monitor checkpoint of %s: written for another spec or format; "
            "starting afresh from the committed offsets",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(meta.get("created", 0)))),
        )
        monitor.reconcile()
        return {}
    positions = [tuple(p) for p in state["positions"] if p is not None]
    records = retry_sync(
        lambda: read_back(settings, spec, positions),  # type: ignore[arg-type]
        what="reading the training buffer back",
        health=registry.health,
        backoff=registry.backoff,
        stop=registry.stop,
    )
    missing = monitor.restore(state, records)
    if missing:
        log.warning(
            "%d buffered training-log records could not be read back (deleted by the "
            "topic's retention?); the buffer holds %d",
            missing,
            len(monitor.buffer),
        )
    monitor.reconcile()
    offsets: Offsets = {
        topic: {int(p): int(o) for p, o in parts.items()} for topic, parts in payload["offsets"].items()
    }
    log.info(
        "monitor %s restored from its checkpoint: %d examples seen, buffer %d, shadow %s, rollback watch %s",
        spec.name,
        monitor.examples_seen,
        len(monitor.buffer),
        monitor.shadow.version_id if monitor.shadow else None,
        monitor.guard.champion_id if monitor.guard else None,
    )
    return offsets
