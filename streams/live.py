"""Where a scoring worker's model comes from, and the in-process learner of role ``all``.

* :class:`LiveModel` (role ``all``): the scorer reads the very model object an embedded
  :class:`models.learner.LearnerCore` learns, in the same event loop, so there is one
  writer and every prediction uses everything learned so far. Predictions name the
  model version (``v1``...). The embedded learner is :class:`streams.learner.LearnerLoop`,
  the same crash-safe step as role ``learner`` (manual assignment at the snapshot's
  offsets, flush before snapshot, retries through outages), run as a Faust app task: its
  Kafka and Redis calls on a thread of its own, its learning on the event loop's thread
  (River models are not thread-safe; the scorer only reads the model). If it fails for
  good (not an outage: a bug), the worker exits with status 70 like a failed agent
  (:func:`streams.worker.exit_process`), for its supervisor to restart it: it never stays
  alive without learning. With ``scoring.max_idle`` > 0 it is an
  :class:`OrderedLearnerLoop`: labels and events are taken in event-time order with the
  scorer (:mod:`streams.sync`).
* :class:`SnapshotFollower` (role ``scorer``): between batches, at most every
  ``poll_seconds``, one Redis GET asks for the learner's latest snapshot; a newer one is
  loaded (its sha256/HMAC checked first) and swapped in atomically for the next batch.
  Predictions name the snapshot (``v1.42``: version 1, 42nd snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from models.learner import LabelMessage, LearnerCore
from streams.learner import LearnerLoop
from streams.sync import EmptyFetches, EventTimeSync, consumed_all, merge_by_time, message_time
from weir.errors import ModelError
from weir.metrics import LearnerMetrics
from weir.settings import Settings
from weir.spec import PipelineSpec

log = logging.getLogger("weir.worker")


class LiveModel:
    """The embedded learner's live model (role ``all``)."""

    def __init__(self, core: Any, name: str) -> None:
        self.core: LearnerCore = core
        self.name = name
        self._version = str(core.version_id)

    def current(self) -> tuple[Any, str, str]:
        return self.core.model, self.name, str(self.core.version_id)

    def refresh(self) -> bool:
        # A promotion or rollback moves the champion alias; the embedded learner follows
        # it (every second, off the event loop). Here no Redis call: True once it swapped.
        version = str(self.core.version_id)
        if version == self._version:
            return False
        self._version = version
        return True

    def age_seconds(self) -> float:
        return 0.0

    def attach_metrics(self, registry: Any) -> None:
        """The embedded learner exports its metrics on the worker's registry."""
        self.core.metrics = LearnerMetrics(registry).init_series(self.core.spec)


class SnapshotFollower:
    """Scores with the learner's newest snapshot (role ``scorer``)."""

    def __init__(self, registry: Any, name: str, poll_seconds: float = 0.5) -> None:
        self.registry = registry
        self.name = name
        self.poll_seconds = poll_seconds
        self.model: Any = None
        self.snapshot_id: str | None = None
        self.created = time.time()
        self._checked = 0.0

    def load_initial(self, timeout: float = 120.0) -> None:
        """Wait for the learner's first snapshot (or the champion) before scoring."""
        deadline = time.time() + timeout
        warned = False
        while True:
            if self._load_latest():
                return
            champion = self.registry.alias("champion")
            if champion is not None:
                self.model, mv = self.registry.load(champion)
                self.snapshot_id, self.created = champion, mv.created
                return
            if time.time() > deadline:
                raise ModelError(
                    f"no model to score with after {timeout:.0f}s: no snapshot and no champion in the "
                    "registry; start the learner (`weir worker SPEC --role learner`) or run one worker "
                    "with `--role all`"
                )
            if not warned:
                log.warning(
                    "waiting for the learner's first snapshot (start `weir worker SPEC --role learner`)"
                )
                warned = True
            time.sleep(0.5)

    def _load_latest(self) -> bool:
        sid = self.registry.latest_snapshot()
        if sid is None or sid == self.snapshot_id:
            return False
        model, meta = self.registry.load_snapshot(sid)
        self.model, self.snapshot_id, self.created = model, sid, float(meta["created"])
        return True

    def current(self) -> tuple[Any, str, str]:
        return self.model, self.name, str(self.snapshot_id)

    def refresh(self) -> bool:
        now = time.time()
        if now - self._checked < self.poll_seconds:
            return False
        self._checked = now
        try:
            return self._load_latest()
        except ModelError as exc:  # a pruned or refused snapshot: keep scoring with ours
            log.error("keeping snapshot %s: %s", self.snapshot_id, exc)
            return False

    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created)


def _registry(spec: PipelineSpec, settings: Settings) -> Any:
    from models.registry import ModelRegistry, registry_key

    return ModelRegistry(settings.redis(), spec, key=registry_key(settings))


def snapshot_wiring(spec: PipelineSpec, settings: Settings) -> tuple[SnapshotFollower, Any]:
    """Role ``scorer``: the learner's snapshots, and the served store the learner joins on."""
    from models.join import ServedStore

    follower = SnapshotFollower(_registry(spec, settings), spec.model.name)
    follower.load_initial()
    return follower, ServedStore(spec)


class OrderedLearnerLoop(LearnerLoop):
    """The embedded learner of role ``all``, taking labels in event-time order with the
    scorer (:mod:`streams.sync`).

    It holds the labels it fetched in a buffer (ordered across partitions by ts, each
    partition's order kept) and hands the learning step only those due: a label at ``ts``
    once every event before ``ts`` is scored. It publishes the labels' frontier to the
    scorer: the ts of the next label to learn, or "caught up" when the buffer is empty and
    the consumer at the high watermark. The buffered labels are not in the offsets yet: a
    snapshot never skips them.
    """

    def __init__(self, *args: Any, sync: EventTimeSync, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync = sync
        self.buffer: list[tuple[float, LabelMessage]] = []
        self.partitions: list[int] = []
        #: per partition: the offset after the last label fetched, and the low watermark
        self._fetched: dict[int, int] = {}
        self._low: dict[int, int] = {}
        self._high: dict[int, int] = {}
        self._at_end = False
        self._asked = 0.0
        #: fetches finding nothing while the labels are not caught up (:meth:`_stuck`)
        self._empty = EmptyFetches(sync.max_idle)
        self._said_stuck = False

    def open(self) -> list[tuple[int, int]]:
        placed = super().open()
        self.partitions = [p for p, _ in placed]
        return placed

    def poll(self, timeout: float = 0.2) -> list[LabelMessage]:
        """The next labels due (see the class doc), waiting at most ``timeout`` seconds for
        labels, then for the events they are due after."""
        t0 = time.monotonic()
        if not self.buffer:
            fetched = super().poll(timeout)
            for m in fetched:
                self._fetched[m.partition] = max(self._fetched.get(m.partition, 0), m.offset + 1)
            timed = [(message_time(m.value, self.spec, m.timestamp), m) for m in fetched]
            self.buffer = merge_by_time(timed, lambda t: t[1].partition, lambda t: t[0])
            done = self._consumed_all()
            self._at_end = self._stuck(bool(fetched) or done) or done
            self._publish()
            if not self.buffer:
                return []
        left = max(0.0, timeout - (time.monotonic() - t0))
        n = self.sync.wait_events([ts for ts, _ in self.buffer], left)
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return [m for _, m in taken]

    def learned(self, batch: list[LabelMessage]) -> None:
        self._publish()

    def fill_seconds(self) -> float:
        """No waiting to fill a batch while the scorer waits for the labels: each step is
        a hand-off it waits for."""
        return 0.0 if self.sync.scorer_waiting else super().fill_seconds()

    def _publish(self) -> None:
        """The labels' frontier. With nothing in hand and not at the end, the learner is
        behind (between two fetches of a backlog, or flushing, snapshotting, sweeping): the
        scorer waits for it as for a busy side. A partition that returns nothing for
        ``max_idle`` is taken as caught up here (:meth:`_stuck`), not by the scorer."""
        if self.buffer:
            self.sync.publish_labels(self.buffer[0][0])
        else:
            self.sync.publish_labels(None, caught_up=self._at_end, behind=not self._at_end)

    def _stuck(self, fetched: bool) -> bool:
        """The labels are behind but nothing came for as long as the scorer waits for a busy
        side (:class:`streams.sync.EmptyFetches`): a partition that cannot be read (its
        leader down, its watermarks unknown) counts as caught up until it can, like a
        partition Kafka Streams stopped idling for; else the scorer would wait for it again
        every time the other partitions move. Logged, as the scorer's own give-ups are."""
        stuck = self._empty.stuck(fetched, time.monotonic())
        if stuck and not self._said_stuck:
            log.warning(
                "learner: the labels topic %s returned nothing for %gs while behind (offsets %s); "
                "taking it as caught up until it returns labels: the scorer goes on without "
                "waiting for them (scoring.max_idle)",
                self.topic,
                self._empty.limit,
                self._fetched or "none fetched yet",
            )
        self._said_stuck = stuck
        return stuck

    def _consumed_all(self) -> bool:
        """Every label partition read up to its high watermark (the last known one).

        librdkafka caches each partition's high watermark from its fetches; a partition
        not fetched from yet is asked once (at most every second), with its low watermark
        as the position of an empty one.
        """
        from confluent_kafka import KafkaException, TopicPartition

        consumer, offsets = self.consumer, self.core.offsets
        positions: dict[int, int] = {}
        highs: dict[int, int | None] = {}
        for p in self.partitions:
            tp = TopicPartition(self.topic, p)
            cached = consumer.get_watermark_offsets(tp, cached=True)
            high = cached[1] if cached and cached[1] >= 0 else self._high.get(p, -1)
            pos = max(self._fetched.get(p, -1), offsets.get(p, -1), self._low.get(p, -1))
            if (high < 0 or pos < 0) and time.monotonic() - self._asked >= 1.0:
                self._asked = time.monotonic()
                try:
                    asked = consumer.get_watermark_offsets(tp, timeout=2.0)
                except KafkaException as exc:
                    log.debug("learner: watermarks of %s[%d]: %s", self.topic, p, exc)
                    return False
                if not asked:
                    return False
                low, high = asked
                self._low[p], self._high[p] = low, high
                pos = max(pos, low)
            positions[p], highs[p] = pos, high
        return consumed_all(positions, highs)


def live_wiring(
    spec: PipelineSpec, settings: Settings, sync: EventTimeSync | None = None
) -> tuple[LiveModel, Any, Any]:
    """Role ``all``: an embedded learner on the labels topic sharing the scorer's model.

    With ``sync`` (:func:`streams.sync.sync_for`), it takes labels in event-time order
    with the scorer (:class:`OrderedLearnerLoop`).
    """
    from models.join import ServedStore
    from streams.learner import start_core
    from weir.resilience import DependencyHealth

    core = start_core(spec, settings)
    live = LiveModel(core, spec.model.name)

    def hook(app: Any) -> None:
        # Metrics are attached (live.attach_metrics) before the hook runs.
        registry = core.metrics.registry if core.metrics is not None else None
        health = DependencyHealth(registry, spec.name)
        learner = (
            LearnerLoop(spec, settings, core, health=health, linger_ms=5)
            if sync is None
            else OrderedLearnerLoop(spec, settings, core, health=health, linger_ms=5, sync=sync)
        )

        @app.task
        async def learn_labels() -> None:
            try:
                await learner.run_async()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # not an outage (those are retried): a bug
                from streams.worker import exit_process

                exit_process("the embedded learner", exc)

    return live, ServedStore(spec), hook
