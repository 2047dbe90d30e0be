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

A producer that acknowledges nothing for :data:`RENEW_AFTER` seconds of attempts is replaced
when the caller gave a way to make one (``make``): its records, queued or in flight, are
purged back to the pending list and produced again by the new one. After a Kafka restart in
CI the learner's idempotent producer (librdkafka 2.16) once stayed stuck on a partition whose
leader it had dropped from its cache ("new leader-1 not found in cache"): for over two
minutes it delivered none of its 9 records while every other client had recovered, and the
learner, which never moves past an undelivered record, learned nothing more. A record
purged in flight may have been written already: it is then written twice, which the
delivery contract allows (at least once; consumers de-duplicate by ``event_id``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from weir.errors import WeirError

if TYPE_CHECKING:
    from weir.settings import Settings

log = logging.getLogger("weir.delivery")

#: ``(topic, value, key)``
Record = tuple[str, bytes, bytes | None]

#: Seconds of delivery attempts acknowledging nothing before the producer is replaced.
RENEW_AFTER = 30.0


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
        make: makes a new producer like it; with it a producer that acknowledges nothing
            for ``renew_after`` seconds of :meth:`wait` is replaced (see the module doc).
        renew_after: see ``make``.
    """

    def __init__(
        self, producer: Any, make: Callable[[], Any] | None = None, renew_after: float = RENEW_AFTER
    ) -> None:
        self.producer = producer
        self.make = make
        self.renew_after = renew_after
        #: since when the waits have timed out with records unacknowledged (None: they did not)
        self._stuck_since: float | None = None
        self.renewals = 0
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
        now = time.monotonic()
        if not left:
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        elif self.make is not None and now - self._stuck_since >= self.renew_after:
            left = self._renew(self.make, left, now - self._stuck_since)
        with self._lock:
            failed, self._failed = self._failed, []
            for rec, err in failed:
                if refused_for_good(err):
                    raise _rejected(rec[0], err)
                self.pending.append(rec)
            unacknowledged = left + len(self.pending)
        return unacknowledged, sorted({str(err) for _, err in failed})[:3]

    def _renew(self, make: Callable[[], Any], left: int, stuck: float) -> int:
        """Replace the producer: purge its records (their reports put them back in the
        pending list, as failures) and make a new one for the next :meth:`send`.

        Returns what the old producer still holds unreported (0 once replaced). A producer
        that has not reported every purged record within 5 s is kept (dropping it would
        drop those records) and replaced at a later attempt.
        """
        old = self.producer
        log.warning(
            "the Kafka producer acknowledged none of %d record(s) for %.0fs; replacing it "
            "(its records are produced again by the new one; a record it wrote before "
            "may then be written twice)",
            left,
            stuck,
        )
        old.purge(in_queue=True, in_flight=True, blocking=True)
        unreported: int = old.flush(5.0)  # serves the purged records' reports: pending again
        if unreported:
            log.warning("the old producer still holds %d record(s); kept for now", unreported)
            return unreported
        self.producer = make()
        self._stuck_since = None
        self.renewals += 1
        return 0


def renewing(settings: Settings, overrides: dict[str, Any], renew_after: float = RENEW_AFTER) -> Delivery:
    """A :class:`Delivery` over a new ``confluent_kafka.Producer`` of
    ``settings.producer_config()`` (acks=all, idempotent) with ``overrides``, replaced by
    another of the same configuration when it acknowledges nothing for ``renew_after`` s."""
    from confluent_kafka import Producer

    conf = {**settings.producer_config(), **overrides}
    return Delivery(Producer(conf), make=lambda: Producer(conf), renew_after=renew_after)


__all__ = ["RENEW_AFTER", "Delivery", "OutputRejected", "Record", "refused_for_good", "renewing"]
