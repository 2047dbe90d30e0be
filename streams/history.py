"""The retrainer's durable input: a window of the training log read back from Kafka.

A retrain (:meth:`models.monitor.Monitor._retrain`) fits its challenger on the training
log itself, not on the monitor's memory, so it survives a restart and a replay gives the
same data. :func:`read_training_window` reads, per training-log partition, the offsets

* ending at the offset the trigger saw (``upto``: the next offset the monitor had not
  applied when the retrain fired; a partition it never saw ends at its high watermark);
* starting ``retrain.window_labels`` records before that end (the fit keeps the newest
  ``window_labels`` rows of the union by event time, so no partition can need more), or
  later: with ``retrain.window_seconds`` set, at the first record Kafka timestamped
  within ``window_seconds`` before the newest record in the window (``offsets_for_times``),
  so the window does not depend on when the read runs;

and returns the records with what it read (:class:`History`), which goes into the new
version's lineage. A long read shows a progress bar (tqdm, on a terminal) or logs its
rate and ETA every few seconds (a service's log).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from weir.contracts import TrainingRecord, decode_training_record
from weir.errors import StackError

if TYPE_CHECKING:
    from weir.settings import Settings
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.retrain")

#: Reads of at least this many records show progress.
PROGRESS_MIN = 20_000


@dataclass
class History:
    """Training-log records read for a retrain, and where from."""

    topic: str
    records: list[TrainingRecord]
    #: partition -> [first offset read, end offset (exclusive)].
    offsets: dict[int, list[int]] = field(default_factory=dict)
    count: int = 0
    seconds: float | None = None
    #: Kafka timestamp (ms) the time window is counted back from (the newest record's).
    anchor_ms: int | None = None
    read_seconds: float = 0.0
    skipped: int = 0  # records that were not a JSON object
    duplicates: int = 0  # an event logged again (the learner's at-least-once): last kept

    def lineage(self) -> dict[str, Any]:
        """What the version's metadata records about the read."""
        ts = [float(r["ts"]) for r in self.records if _finite(r.get("ts"))]
        return {
            "source": "kafka",
            "topic": self.topic,
            "offsets": {str(p): list(v) for p, v in sorted(self.offsets.items())},
            "records_read": len(self.records),
            "records_skipped": self.skipped,
            "duplicates": self.duplicates,
            "window_labels": self.count,
            "window_seconds": self.seconds,
            "anchor_ms": self.anchor_ms,
            "first_ts": min(ts) if ts else None,
            "last_ts": max(ts) if ts else None,
            "read_seconds": round(self.read_seconds, 3),
        }


class Progress:
    """A progress report for a long read: a tqdm bar on a terminal, else a log line with
    the rate and ETA every ``every`` seconds. Silent below :data:`PROGRESS_MIN` records."""

    def __init__(self, total: int, what: str, every: float = 5.0, tty: bool | None = None) -> None:
        self.total = total
        self.what = what
        self.every = every
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self._bar: Any = None
        active = total >= PROGRESS_MIN
        if active and (sys.stderr.isatty() if tty is None else tty):
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=what, unit="rec", unit_scale=True, leave=False)
            except ImportError:  # tqdm is optional: the log line does
                self._bar = None
        self.active = active

    def update(self, n: int) -> None:
        self.done += n
        if not self.active:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (time.monotonic() if now is None else now) - self.t0)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        eta = f"{left:.0f}s" if math.isfinite(left) else "?"
        return f"{self.what}: {self.done}/{self.total} records, {rate:.0f}/s, ETA {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def window_bounds(
    watermarks: Mapping[int, tuple[int, int]], upto: Mapping[int, int], count: int
) -> dict[int, list[int]]:
    """Per partition, [start, end): ``end`` the offset the trigger saw (capped by the high
    watermark; the high watermark where it saw none), ``start`` ``count`` records before,
    not below the low watermark.

    Examples:
        >>> window_bounds({0: (0, 100), 1: (50, 60), 2: (0, 0)}, {0: 90}, count=30)
        {0: [60, 90], 1: [50, 60], 2: [0, 0]}
    """
    out: dict[int, list[int]] = {}
    for p, (low, high) in sorted(watermarks.items()):
        end = max(low, min(int(upto.get(p, high)), high))
        out[p] = [max(low, end - count), end]
    return out


def read_training_window(
    settings: Settings,
    spec: PipelineSpec,
    upto: Mapping[int, int],
    *,
    timeout: float = 120.0,
) -> History:
    """Read the retrain window of the training log (see the module's doc).

    Raises:
        StackError: the topic is unknown or a partition's end was not reached within
            ``timeout`` (Kafka is away); the caller falls back to its buffer.
    """
    from confluent_kafka import Consumer, TopicPartition

    t0 = time.monotonic()
    topic = spec.topics.training_log
    count = spec.retrain.window_labels
    seconds = spec.retrain.window_seconds
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"{spec.consumer_group}-retrain-history",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    hist = History(topic, [], count=count, seconds=seconds)
    try:
        marks = partition_marks(
            consumer, topic, "training-log", "is the learner running (`weir worker SPEC --role learner`)?"
        )
        bounds = window_bounds(marks, upto, count)
        if seconds is not None:
            hist.anchor_ms = _newest_timestamp(consumer, topic, bounds, timeout)
            if hist.anchor_ms is not None:
                since = hist.anchor_ms - int(seconds * 1000)
                tps = [TopicPartition(topic, p, since) for p, (s, e) in bounds.items() if e > s]
                for tp in consumer.offsets_for_times(tps, timeout=10) if tps else []:
                    s, e = bounds[tp.partition]
                    # -1: no record at or after the time: nothing of this partition is in it.
                    first = e if tp.offset < 0 else tp.offset
                    bounds[tp.partition][0] = min(e, max(s, first))
        hist.offsets = bounds
        records, hist.skipped = _read(consumer, topic, bounds, t0 + timeout, settings)
        hist.records, hist.duplicates = dedupe(records)
    finally:
        consumer.close()
    hist.read_seconds = time.monotonic() - t0
    log.info(
        "read %d training-log records of %s for the retrain in %.2fs (offsets %s)",
        len(hist.records),
        topic,
        hist.read_seconds,
        {p: tuple(b) for p, b in hist.offsets.items() if b[1] > b[0]},
    )
    return hist


def _newest_timestamp(
    consumer: Any, topic: str, bounds: Mapping[int, list[int]], timeout: float
) -> int | None:
    """The largest Kafka timestamp of the last record before each partition's end."""
    from confluent_kafka import TopicPartition

    want = {p: e - 1 for p, (s, e) in bounds.items() if e > 0 and e > s}
    if not want:
        return None
    consumer.assign([TopicPartition(topic, p, o) for p, o in want.items()])
    newest: int | None = None
    left = set(want)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for msg in consumer.consume(len(want), timeout=0.5):
            p = msg.partition()
            if msg.error() is not None or p not in left:
                continue
            left.discard(p)
            _, ts = msg.timestamp()
            if ts is not None and ts >= 0:
                newest = ts if newest is None else max(newest, ts)
    consumer.unassign()
    if left:
        raise StackError(f"could not read the newest training-log records of {topic!r} within {timeout:g}s")
    return newest


def partition_marks(consumer: Any, topic: str, what: str, hint: str) -> dict[int, tuple[int, int]]:
    """The (low, high) watermarks of each partition of ``topic``.

    Raises:
        StackError: the topic is unknown (naming ``what`` and ``hint``) or Kafka does not answer.
    """
    from confluent_kafka import KafkaException, TopicPartition

    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise StackError(
                f"{what} topic {topic!r} not found ({meta.error if meta else 'no metadata'}); {hint}"
            )
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in sorted(meta.partitions)
        }
    except KafkaException as exc:
        raise StackError(f"cannot read {what} topic {topic!r}: {exc}") from exc


def read_ranges(
    consumer: Any,
    topic: str,
    bounds: Mapping[int, Sequence[int]],
    deadline: float,
    late: Callable[[int, int], str],
) -> list[tuple[int, int, bytes | None]]:
    """The records of ``topic`` at offsets [start, end) of each partition in ``bounds``:
    (partition, offset, value) in the order they arrived (each partition's in offset order),
    with a :class:`Progress` report. A partition whose end moved back (retention) ends at its
    EOF when the consumer reports them.

    Raises:
        StackError: ``late(records read, records wanted)`` once ``deadline`` (monotonic) passed.
    """
    from confluent_kafka import KafkaError, TopicPartition

    todo = {p: (int(s), int(e)) for p, (s, e) in bounds.items() if e > s}
    out: list[tuple[int, int, bytes | None]] = []
    if not todo:
        return out
    progress = Progress(sum(e - s for s, e in todo.values()), f"reading {topic}")
    consumer.assign([TopicPartition(topic, p, s) for p, (s, _) in todo.items()])
    done: set[int] = set()
    try:
        while len(done) < len(todo):
            if time.monotonic() > deadline:
                raise StackError(late(len(out), progress.total))
            n = 0
            for msg in consumer.consume(1000, timeout=0.5):
                p, o, err = msg.partition(), msg.offset(), msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and p in todo:
                        done.add(p)  # the end moved back (retention, truncation)
                    continue
                if p not in todo or o is None or p in done:
                    continue
                end = todo[p][1]
                if o < end:
                    out.append((p, o, msg.value()))
                    n += 1
                if o >= end - 1:
                    done.add(p)
            progress.update(n)
    finally:
        progress.close()
    return out


def _read(
    consumer: Any, topic: str, bounds: Mapping[int, list[int]], deadline: float, settings: Settings
) -> tuple[list[TrainingRecord], int]:
    """The window's training-log records (decoded) and how many were not a JSON object."""

    def late(n: int, total: int) -> str:
        return (
            f"could not read the retrain window of {topic!r} in time ({n} records "
            f"of {total}); is Kafka at {settings.kafka_bootstrap} up?"
        )

    out: list[TrainingRecord] = []
    skipped = 0
    for _, _, raw in read_ranges(consumer, topic, bounds, deadline, late):
        try:
            rec = decode_training_record(raw)
        except orjson.JSONDecodeError:
            rec = None
        if rec is None:
            skipped += 1
        else:
            out.append(rec)
    return out, skipped


def dedupe(records: list[TrainingRecord]) -> tuple[list[TrainingRecord], int]:
    """The training log is at-least-once (a learner restarted after its snapshot logs the
    labels since again): one record per ``event_id``, the last, at its first place.

    Examples:
        >>> recs, n = dedupe([{"event_id": "a", "label": 0}, {"event_id": "b"},
        ...                   {"event_id": "a", "label": 1}])
        >>> [(r["event_id"], r.get("label")) for r in recs], n
        ([('a', 1), ('b', None)], 1)
    """
    by_id: dict[Any, TrainingRecord] = {}
    anonymous: list[TrainingRecord] = []
    for r in records:
        eid = r.get("event_id")
        if eid is None:
            anonymous.append(r)
        else:
            by_id[eid] = r
    return [*by_id.values(), *anonymous], len(records) - len(by_id) - len(anonymous)


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
