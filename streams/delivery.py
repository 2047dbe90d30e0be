"""Producing records with confluent-kafka until Kafka has acknowledged every one of them.

The worker's predictions and dead letters (:class:`streams.worker.KafkaOutput`) go through
:class:`Delivery`; so can any producer whose caller must not move its offsets (or a
snapshot) past a record that was lost. A delivery attempt is :meth:`Delivery.send` (hand the
pending records to the producer, as many as its local queue takes) then
:meth:`Delivery.wait` (``flush``, then count what is not acknowledged yet). A record whose
delivery failed goes back to the pending list and is produced again by the next attempt, so
retrying attempts (:func:`weir.resilience.retry_async`) until none is left delivers everything.
A record Kafka refuses for good (too large, not authorised, a fatal producer error) raises
:class:`OutputRejected` instead: retrying could not help.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from weir.errors import WeirError

#: ``(topic, value, key)``
Record = tuple[str, bytes, bytes | None]


class OutputRejected(WeirError):
    """Kafka refused a record for good (retrying cannot help)."""


def refused_for_good(err: Any) -> bool:
    """A produce error (a ``KafkaError``) retrying cannot cure: the record or the topic is
    wrong, or the producer is unusable (a fatal error of the idempotent producer)."""
    from confluent_kafka import KafkaError

    permanent = {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError._INVALID_ARG,
    }
    return bool(err.fatal()) or err.code() in permanent


def _rejected(topic: str, err: Any) -> OutputRejected:
    return OutputRejected(
        f"Kafka refused a record for topic {topic!r} for good: {err}; check the topic "
        "(max.message.bytes, ACLs) and the broker, then restart the worker"
    )


class Delivery:
    """Keeps each record until Kafka acknowledges it; see the module doc.

    Args:
        producer: a ``confluent_kafka.Producer`` (enable idempotence: a retried batch is
            then written once).
    """

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        #: Records to produce on the next :meth:`send`: never handed over, or failed.
        self.pending: list[Record] = []
        self._failed: list[tuple[Record, Any]] = []  # reported since the last wait
        self._lock = threading.Lock()  # delivery reports run in whichever thread flushes

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            with self._lock:
                self._failed.append(((msg.topic(), msg.value(), msg.key()), err))

    def add(self, records: Iterable[Record]) -> None:
        """Queue records for the next :meth:`send` (no I/O)."""
        with self._lock:
            self.pending.extend(records)

    def send(self) -> None:
        """Hand the pending records to the producer; those its full queue does not take, or
        that it refuses for a while, stay pending."""
        from confluent_kafka import KafkaException

        with self._lock:
            todo, self.pending = self.pending, []
        keep: list[Record] = []
        for i, rec in enumerate(todo):
            try:
                self.producer.produce(*rec, on_delivery=self._on_delivery)
            except BufferError:  # the local queue is full: the next wait drains it
                keep.extend(todo[i:])
                break
            except KafkaException as exc:
                if refused_for_good(exc.args[0]):
                    # Not chained: the KafkaException would make it look transient.
                    raise _rejected(rec[0], exc.args[0]) from None
                keep.append(rec)
        if keep:
            with self._lock:
                self.pending[:0] = keep

    def wait(self, timeout: float) -> tuple[int, list[str]]:
        """Wait up to ``timeout`` seconds for the acknowledgements (blocking: ``flush``).

        Returns:
            ``(unacknowledged, errors)``: how many records are not acknowledged yet (still
            in flight, or pending for the next :meth:`send`), and up to three distinct
            delivery errors seen.
        """
        left: int = self.producer.flush(timeout)
        with self._lock:
            failed, self._failed = self._failed, []
            for rec, err in failed:
                if refused_for_good(err):
                    raise _rejected(rec[0], err)
                self.pending.append(rec)
            unacknowledged = left + len(self.pending)
        return unacknowledged, sorted({str(err) for _, err in failed})[:3]


__all__ = ["Delivery", "OutputRejected", "Record", "refused_for_good"]
