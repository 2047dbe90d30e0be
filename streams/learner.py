"""The learner: one per pipeline, the only writer of the live model.

:class:`LearnerLoop` is the learner's crash-safe step, the same for both roles that learn:
``weir worker SPEC --role learner`` (:func:`run_learner`, a thread of its own) and role
``all`` (:mod:`streams.live`, on the scoring worker's event loop). It consumes the labels
topic with a confluent-kafka consumer and *manual* partition assignment (no consumer group
decides where it starts), hands each batch to :class:`models.learner.LearnerCore` (parse,
join with the served records, prequential evaluation, learning), produces the joined
examples to the training-log topic and bad labels to the dead-letter topic, and publishes
model snapshots the scorers pick up (``registry.latest_snapshot()``).

The sequence, per batch: process (join, learn, queue the marks of learned labels: the next
batch's join or the snapshot writes them) -> hand the training-log
records and dead letters to the producer -> every second, the sweep (expiries, held early
labels) and the status; between sweeps, the next chunk of held labels while the last one
was full and resolved some -> when a snapshot is due: **flush** (every record delivered) ->
**snapshot** with the labels topic's next offsets. On start it loads the latest snapshot
and assigns the partitions at the snapshot's offsets. So after a SIGKILL the labels learned
since that snapshot (lost with the process) are read and learned again, and none before it
is; the lineage of the markers on served records (:mod:`models.join`) tells a marker of a
lost model state from one the snapshot contains. The training log is at-least-once, keyed by ``event_id``.

Outages. Every call to Redis or Kafka in the sequence is retried where it failed, with
bounded exponential backoff (:mod:`weir.resilience`), until the server is back: the
learner pauses, it does not exit, and it does not redo a step it half did (a batch already
learned is not joined again; the retried call is idempotent). While it waits,
``weir_dependency_up{dependency}`` is 0 and ``weir_dependency_retries_total`` counts.
The consumer itself rides out broker outages (librdkafka reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from models.learner import Io, LabelMessage, LearnerCore, Step, StepOutput, run_step
from models.registry import ModelRegistry, registry_key
from streams.delivery import Record, renewing
from weir.errors import StackError
from weir.heap import freeze_startup_heap
from weir.metrics import LearnerMetrics, MetricsServer
from weir.resilience import Backoff, DependencyHealth, is_transient, retry_async, retry_sync

if TYPE_CHECKING:
    from models.join import JoinResult
    from weir.settings import Settings
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.learner")

#: Labels per consumer batch; one Redis pipeline per batch for the join.
BATCH = 500
#: After a poll's first label, how long it waits for more to fill the batch (see
#: :meth:`LearnerLoop.poll`): about 40 labels at 800/s, a step's fixed costs (a Redis
#: round trip, a produce, hand-offs between threads) shared among them.
FILL_SECONDS = 0.05
#: Seconds between sweeps (expiries, held early labels) and status writes.
SWEEP_EVERY = 1.0
#: Seconds between looks at the held (early) labels while some wait for their events
#: (``joiner.held_waiting``), between sweeps: see :meth:`LearnerLoop.held_due`. Doubled
#: after each look that resolved none, up to :data:`SWEEP_EVERY`.
HELD_EVERY = 0.2
#: How long a poll waits for the first label when there is nothing else to do.
POLL_SECONDS = 0.2
#: How long the split roles' learner waits before its next poll after a batch whose labels
#: were mostly early (their events not served yet): see :func:`early_pause`.
EARLY_PAUSE = 0.05
#: Bytes fetched per labels partition per fetch request (librdkafka's
#: ``max.partition.fetch.bytes``, 1 MiB by default). A labels topic's backlog was read a
#: partition at a time, each 1 MiB fetch ~10,000 labels of one partition, so the learner
#: ran far ahead of the scorers on that partition's labels (events keyed by entity, labels
#: by event id): most went early, held and joined again. With 64 KiB each fetch takes a
#: few hundred of each partition (at least one producer batch): split roles in
#: ``bench/e2e.py`` held 10-13k of 60,000 labels instead of 22k, and learned the last one
#: 0.8-1.4 s after the last prediction instead of 2.2-2.7 s (issue #12).
PARTITION_FETCH_BYTES = 64 * 1024
#: Retries of the learner's calls: 0.1 s doubling to 2 s, so it resumes within ~2.5 s of
#: a server's return (plus the call itself).
LEARNER_BACKOFF = Backoff(initial=0.1, maximum=2.0, jitter=0.2)


class StepEmitter:
    """Produces what a :class:`LearnerCore` step asks for, training-log records and dead
    letters, through a :class:`streams.delivery.Delivery` (as the worker's output does).

    ``flush`` waits for delivery and raises (a transient ``KafkaException``) while anything
    is unacknowledged, so a caller never moves offsets (or a snapshot) past records that
    were lost; records whose delivery failed are produced again by the next ``flush``, so
    retrying it until it succeeds delivers everything. A record Kafka refuses for good (too
    large, not authorised) raises :class:`streams.delivery.OutputRejected`: retrying cannot
    help.
    """

    def __init__(self, spec: PipelineSpec, settings: Settings, linger_ms: int = 20) -> None:
        self.spec = spec
        # acks=all, idempotent; a producer stuck after a broker restart is replaced
        # (streams.delivery.RENEW_AFTER).
        self.delivery = renewing(settings, {"linger.ms": linger_ms})

    @property
    def producer(self) -> Any:
        return self.delivery.producer

    @property
    def pending(self) -> list[Record]:
        """Records not yet handed to the producer, or handed and failed."""
        return self.delivery.pending

    def add(self, out: StepOutput) -> None:
        """Queue a step's records (no I/O); :meth:`send` or :meth:`flush` produces them."""
        t = self.spec.topics
        # Keyed by the model: one partition, in the order the learner learned them. The
        # monitor's detectors read the loss sequence in that order; spread over partitions,
        # a monitor catching up would read them in partition-sized blocks, replaying the
        # model's learning curve once per partition (each one a "rise" in loss).
        key = self.spec.model.name.encode()
        self.delivery.add([(t.training_log, rec, key) for rec in out.training_log])
        self.delivery.add([(t.dead_letters, dl, None) for dl in out.dead_letters])

    def send(self, timeout: float = 30.0) -> None:
        """Hand the queued records to the producer, waiting while its queue is full (the
        learner slows down with the broker instead of piling records up)."""
        from confluent_kafka import KafkaException

        delivery = self.delivery
        deadline = time.monotonic() + timeout
        delivery.send()
        while delivery.pending:
            if time.monotonic() > deadline:
                raise KafkaException(
                    f"learner: the producer's queue stayed full for {timeout:g}s "
                    f"({len(delivery.pending)} records waiting); is the broker up?"
                )
            self.producer.poll(0.1)
            delivery.send()
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Deliver everything queued; raises while anything is undelivered."""
        from confluent_kafka import KafkaException

        self.send(timeout)
        left, errors = self.delivery.wait(timeout)
        if left:
            raise KafkaException(
                f"learner: {left} training-log/dead-letter records undelivered "
                f"({errors or 'delivery timed out'}); not moving past them, retrying"
            )


def learner_group(spec: PipelineSpec) -> str:
    """Consumer group the learner commits its offsets to (for lag monitoring only)."""
    return f"{spec.consumer_group}-learner"


def start_core(
    spec: PipelineSpec,
    settings: Settings,
    metrics: LearnerMetrics | None = None,
    health: DependencyHealth | None = None,
    stop: threading.Event | None = None,
) -> LearnerCore:
    """:meth:`LearnerCore.start` on the pipeline's registry, retried while Redis is down."""
    client = settings.redis()
    registry = ModelRegistry(client, spec, key=registry_key(settings))
    core = retry_sync(
        lambda: LearnerCore.start(spec, registry, client, metrics),
        what="learner: loading the latest snapshot",
        health=health,
        backoff=LEARNER_BACKOFF,
        stop=stop,
    )
    log.info(
        "learner of %s: version %s, snapshot %s, %d labels learned, offsets %s",
        spec.name,
        core.version_id,
        core.snapshot_id,
        core.labels_learned,
        core.offsets,
    )
    return core


class LearnerLoop:
    """The crash-safe learner step, for role ``learner`` and role ``all``.

    Args:
        spec: the pipeline spec.
        settings: Kafka settings of the consumer and producer.
        core: the learner core (its model is the one learned; its offsets where to start).
        health: ``weir_dependency_up`` of the process; None for no metrics.
        stop: set to stop; also ends a retry in progress (the loop then stops without a
            final snapshot: a restart replays from the last one).
        linger_ms: the producer's linger.

    Drive it with :meth:`run` (blocking, its own thread) or :meth:`run_async` (on an
    event loop: the label path awaited on an asyncio Redis client, the other blocking
    calls on one worker thread, the learning on the loop's thread). Both run the same
    :meth:`iteration`.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        settings: Settings,
        core: LearnerCore,
        *,
        health: DependencyHealth | None = None,
        stop: threading.Event | None = None,
        linger_ms: int = 20,
        backoff: Backoff = LEARNER_BACKOFF,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.core = core
        self.health = health
        self.stop = stop or threading.Event()
        self.backoff = backoff
        self.topic = spec.topics.labels
        self.emitter = StepEmitter(spec, settings, linger_ms=linger_ms)
        self.consumer: Any = None
        #: the asyncio Redis client of :meth:`run_async`, which awaits the calls that have an
        #: asyncio variant (:attr:`models.steps.Io.acall`: the label path) on it
        self.aredis: Any = None
        self.last_sweep = 0.0
        self.last_held = 0.0
        #: the wait between looks at waiting held labels (:meth:`held_due`)
        self.held_every = HELD_EVERY
        #: the wait before the next poll (:func:`early_pause` of the last batch)
        self.early_pause = 0.0
        #: False while an iteration is half done (then no final snapshot may be taken)
        self.consistent = True

    # -- the blocking calls --------------------------------------------------------

    def _retry(self, op: Io) -> Any:
        return retry_sync(
            op.call, what=f"learner: {op.what}", health=self.health, backoff=self.backoff, stop=self.stop
        )

    async def _aretry(self, op: Io) -> Any:
        """:meth:`_retry` of ``op``'s asyncio variant on :attr:`aredis`."""
        assert op.acall is not None
        return await retry_async(
            functools.partial(op.acall, self.aredis),
            what=f"learner: {op.what}",
            health=self.health,
            backoff=self.backoff,
            stop=self.stop.is_set,
        )

    def open(self) -> list[tuple[int, int]]:
        """Create the consumer and assign every partition at the snapshot's offsets."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer(
            {
                **self.settings.confluent_config(),
                "group.id": learner_group(self.spec),
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "max.partition.fetch.bytes": PARTITION_FETCH_BYTES,
            }
        )
        topic = self.topic
        meta = self._labels_metadata()
        if meta is None:
            # A learner started first on a new pipeline (split roles: the scorers wait for
            # its first snapshot) creates the pipeline's topics, as `weir worker SPEC` and
            # `weir produce SPEC` do; it stopped with "does not exist" before.
            from streams.admin import ensure_topics

            made = ensure_topics(self.settings, self.spec)
            log.info("learner: created the pipeline's topics: %s", made)
            meta = self._labels_metadata()
            if meta is None:
                raise StackError(
                    f"labels topic {topic!r} still has no partitions after creating it on "
                    f"{self.settings.kafka_bootstrap}; check the broker's log (`make logs`)"
                )
        offsets = self.core.offsets
        assignment = [
            TopicPartition(topic, p, offsets.get(p, OFFSET_BEGINNING)) for p in sorted(meta.partitions)
        ]
        self.consumer.assign(assignment)
        placed = [(tp.partition, tp.offset) for tp in assignment]
        log.info("learner assigned %s at %s (the snapshot's offsets)", topic, placed)
        return placed

    def _labels_metadata(self) -> Any:
        """The labels topic's metadata, or None when it does not exist (yet)."""
        topic = self.topic
        md = self._retry(Io(lambda: self.consumer.list_topics(topic, timeout=10), "labels topic metadata"))
        meta = md.topics.get(topic)
        return None if meta is None or meta.error is not None or not meta.partitions else meta

    def poll(self, timeout: float = 0.2) -> list[LabelMessage]:
        """Up to :data:`BATCH` label messages: the first to come within ``timeout`` seconds
        (at once if one is fetched already), then those that come within
        :meth:`fill_seconds` more.

        librdkafka's ``consume(n, timeout)`` waits until ``n`` messages are there or the
        timeout passed: asked for a whole batch at once, with labels flowing slower than
        :data:`BATCH` per ``timeout`` every step waited the whole timeout (200 ms) to
        fill up, and role ``all``'s scorer, when it waits for the labels due before its
        events (:mod:`streams.sync`), waited that long for each step (issue #12: a live
        worker 1 s behind kept falling behind). Taking only what is there made a step per
        handful of labels: +20% CPU per event live. The fill window keeps steps of tens of
        labels at moderate rates (a backlog fills a batch at once).
        """
        got = self.consumer.consume(num_messages=1, timeout=timeout)
        if got:
            got += self.consumer.consume(num_messages=BATCH - 1, timeout=self.fill_seconds())
        batch = []
        for m in got:
            if m.error() is not None:
                log.warning("labels topic error: %s", m.error())
                continue
            kind, ms = m.timestamp()
            batch.append(
                LabelMessage(
                    m.value(), m.partition() or 0, m.offset() or 0, m.key(), ms / 1000 if kind else None
                )
            )
        return batch

    def fill_seconds(self) -> float:
        """How long a poll that has its first label waits for more (:data:`FILL_SECONDS`)."""
        return FILL_SECONDS

    def poll_seconds(self) -> float:
        """How long the next poll waits for a label: :data:`POLL_SECONDS`, or nothing while
        a backlog of held labels is being resolved (``joiner.more_held``: the next chunk is
        due at once). Each step of that backlog waited 200 ms for labels that had all been
        read: held labels were resolved at most 500 per 200 ms, and ``bench/e2e.py``'s
        role ``all`` learned its 60,000 backlog labels 26 s after the last prediction
        (34,203 of them early), split roles 35 s (issue #12)."""
        return 0.0 if self.core.joiner.more_held else POLL_SECONDS

    def _commit(self) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = self.core.offsets
        if not offsets:
            return
        try:  # for lag monitoring only: the learner starts from its snapshot's offsets
            self.consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()], asynchronous=True
            )
        except KafkaException as exc:
            log.debug("learner: offset commit skipped: %s", exc)

    # -- the sequence ----------------------------------------------------------------

    def iteration(self, batch: list[LabelMessage], now: float) -> Step[None]:
        """One step: the batch, the sweep when due, the snapshot when due."""
        core = self.core
        self.consistent = False
        if batch:
            out = yield from core.process_step(batch, now)
            if any(r.outcome == "early" for r in out.results):
                self.held_every = HELD_EVERY  # new holds: look soon again
            self.early_pause = early_pause(out.results)
            self.learned(batch)
            yield from self._produce(out)
        if now - self.last_sweep >= SWEEP_EVERY:
            yield from self._produce((yield from core.sweep_step(now)))
            # A promotion or rollback moves the champion alias: the learner follows it
            # (in role all the scorer then scores with the new champion).
            yield Io(core.follow_champion, "champion alias")
            status = core.status(now)
            yield Io(lambda: core.put_status(status), "status")
            self.last_sweep = self.last_held = now
        elif self.held_due(now):
            self.last_held = now
            held = yield from core.held_step(now)
            resolved = any(r.outcome == "resolved" for r in held.results)
            self.held_every = HELD_EVERY if resolved else min(2 * self.held_every, SWEEP_EVERY)
            yield from self._produce(held)
        self.consistent = True
        if core.snapshot_due(now):
            yield from self.snapshot_step(now)

    def held_due(self, now: float) -> bool:
        """Whether to look at the held labels between two sweeps: at once while a backlog
        of them is being resolved (``joiner.more_held``), and every :attr:`held_every`
        seconds while some wait for their events (``joiner.held_waiting``): :data:`HELD_EVERY`
        after new holds or a look that resolved some, doubled after each look that resolved
        none, up to :data:`SWEEP_EVERY` (labels whose events never come, held until their
        horizon, cost no more than before).

        A held label waited for the next sweep once its walk stopped: split roles' learner
        learned the last of a 60,000-label backlog up to a second after the scorer answered
        its event (issue #12).

        Examples:
            >>> class J: more_held = False; held_waiting = True
            >>> class C: joiner = J()
            >>> loop = object.__new__(LearnerLoop); loop.core = C()
            >>> loop.last_held, loop.held_every = 10.0, HELD_EVERY
            >>> loop.held_due(10.1), loop.held_due(10.3)
            (False, True)
            >>> loop.held_every = 0.8
            >>> loop.held_due(10.3), loop.held_due(10.9)
            (False, True)
            >>> J.held_waiting = False
            >>> loop.held_due(11.0)
            False
        """
        joiner = self.core.joiner
        return joiner.more_held or (joiner.held_waiting and now - self.last_held >= self.held_every)

    def _produce(self, out: StepOutput) -> Step[None]:
        """Hand a step's records to the producer; no trip to the thread when there are none
        (a batch of early labels only)."""
        self.emitter.add(out)
        if self.emitter.pending:
            yield Io(self.emitter.send, "training-log produce")

    def learned(self, batch: list[LabelMessage]) -> None:
        """Called on the learning thread once ``batch`` is learned, before its records are
        produced. Does nothing here; role ``all`` tells its scorer (:mod:`streams.live`)."""

    def snapshot_step(self, now: float | None = None, force: bool = False) -> Step[str | None]:
        """Flush (every record of the learned labels delivered), then snapshot."""
        core = self.core
        # Deliver the training log first: once the offsets move on it is never re-produced.
        yield Io(self.emitter.flush, "training-log delivery")
        sid: str | None = yield Io(lambda: core.maybe_snapshot(now, force=force), "snapshot")
        if sid is not None:
            yield Io(self._commit, "offset commit")
        return sid

    # -- drivers ---------------------------------------------------------------------

    def _drive(self, step: Step[Any]) -> Any:
        return run_step(step, self._retry)

    async def _drive_async(self, step: Step[Any], call: Callable[..., Any]) -> Any:
        result: Any = None
        while True:
            try:
                op = step.send(result)
            except StopIteration as done:
                return done.value
            if op is None:
                result = None
                await asyncio.sleep(0)  # let the scorer run between chunks of learning
            elif op.acall is not None and self.aredis is not None:
                result = await self._aretry(op)
            else:
                result = await call(self._retry, op)

    def run(self, ready: threading.Event | None = None) -> None:
        """Run until ``stop`` is set (blocking); a final snapshot on a clean stop."""
        try:
            self.open()
            if ready is not None:
                ready.set()
            while not self.stop.is_set():
                if self.early_pause and not self.core.joiner.more_held:
                    self.stop.wait(self.early_pause)  # ahead of the scorers: let them serve
                batch = self.poll(self.poll_seconds())
                self._drive(self.iteration(batch, time.time()))
        except Exception as exc:
            if not (self.stop.is_set() and is_transient(exc)):
                raise
            log.warning("learner: stopped while %s was failing; no final snapshot", exc)
        finally:
            self.close()

    async def run_async(self) -> None:
        """Run on the running event loop until cancelled or ``stop`` is set.

        The label path (the join, the sweep, the held labels) is awaited on an asyncio Redis
        client of its own: one round trip per label batch without a thread hop (issue #12).
        The consumer, the producer and the other Redis calls run on one worker thread of
        this loop's own. The learning (and so every write to the model) stays on the loop's
        thread, where the scorer reads the model between its awaits.
        """
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-learner")
        self.aredis = self.settings.redis_async()

        def call(fn: Callable[..., Any], *args: Any) -> Any:
            return loop.run_in_executor(executor, fn, *args)

        try:
            await call(self.open)
            while not self.stop.is_set():
                batch = await call(self.poll, self.poll_seconds())
                await self._drive_async(self.iteration(batch, time.time()), call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not (self.stop.is_set() and is_transient(exc)):
                log.exception("learner crashed; the worker stops so that a supervisor restarts it")
                raise
        finally:
            self.stop.set()  # ends a retry in progress on the worker thread
            executor.shutdown(wait=True)
            self.close()
            if self.aredis is not None:
                client, self.aredis = self.aredis, None
                with contextlib.suppress(Exception):  # closing: nothing left to lose
                    await client.aclose()

    def close(self) -> None:
        """A final snapshot if the last step finished (and the servers answer), then close."""
        try:
            if self.consistent and self.consumer is not None:
                step = self.snapshot_step(force=True)
                sid = self._drive(step)
                log.info("learner stopped: %d labels learned, snapshot %s", self.core.labels_learned, sid)
            else:
                log.warning("learner stopped mid-step: no final snapshot (a restart replays from the last)")
        except Exception as exc:
            log.error("learner: no final snapshot (%s); a restart replays from the last one", exc)
        finally:
            try:
                self.emitter.producer.flush(5)
            finally:
                if self.consumer is not None:
                    self.consumer.close()
                    self.consumer = None


def early_pause(results: Sequence[JoinResult]) -> float:
    """How long the learner of split roles waits before its next poll: :data:`EARLY_PAUSE`
    after a batch at least half of whose labels were early, else nothing.

    An early label (its event not served yet) is held in Redis and joined later by the
    sweep: written, read and joined again. When the learner reads labels faster than the
    scorers serve their events (a backlog in both topics, the labels topic read at several
    times the scorers' rate), most labels went that way: ``bench/e2e.py``'s split roles held
    43-53k of 60,000 and learned the last one 4 s after the last prediction (issue #12).
    Waiting lets the scorers get ahead again; the labels wait in Kafka meanwhile, at no
    cost. Role ``all`` orders its two sides by event time instead (:mod:`streams.sync`).

    Examples:
        >>> from models.join import JoinResult
        >>> early_pause([JoinResult("early", "e1"), JoinResult("hit", "e2")]) == EARLY_PAUSE
        True
        >>> early_pause([JoinResult("hit", "e1"), JoinResult("hit", "e2"), JoinResult("early", "e3")])
        0.0
    """
    if not results:
        return 0.0
    early = sum(1 for r in results if r.outcome == "early")
    return EARLY_PAUSE if 2 * early >= len(results) else 0.0


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
    from prometheus_client import CollectorRegistry

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    metrics = LearnerMetrics(metrics_registry or CollectorRegistry()).init_series(spec)
    health = DependencyHealth(metrics.registry, spec.name)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = MetricsServer(metrics.registry, settings.metrics_host, port)
    log.info("learner metrics on %s", server.url)
    try:
        try:
            core = start_core(spec, settings, metrics, health, stop)
        except Exception as exc:
            if stop.is_set() and is_transient(exc):
                return 0
            raise
        freeze_startup_heap()  # the model loaded: later full collections skip it (weir.heap)
        try:
            LearnerLoop(spec, settings, core, health=health, stop=stop).run(ready)
        finally:
            core.client.close()
        return 0
    finally:
        server.stop()
