"""The Faust scoring worker: a thin agent around :class:`streams.scoring.Scorer`.

Roles:

* ``all`` (default, one process): scores events with the LIVE model and learns from
  labels in the same process, so every prediction uses everything learned so far. When
  the labels are behind (a backlog in both topics), a batch is scored in runs, in
  event-time order with the labels (:mod:`streams.sync`, ``scoring.max_idle``): a label
  due at or before an event is learned before the event is scored.
* ``scorer``: scores only, following the learner's snapshots (swapped in between
  batches); run as many as the events topic has partitions, in one consumer group.
* ``learner``: joins labels and learns (see :mod:`streams.learner`); run exactly one.

Delivery is at-least-once: a batch's offsets can only advance after its predictions and
dead letters are delivered to Kafka and its served records are stored in Redis, and
features are idempotent by ``event_id``, so a redelivered event is scored again from the
features first served for it. Consumers of the predictions topic de-duplicate by
``event_id``.

Faults (issue #11), what the score agent does:

* **A server fails for a while** (Redis down, hung or refusing; Kafka not taking the
  batch's records): the failed step is retried on the same batch with bounded exponential
  backoff (0.1 s doubling to 2 s), for as long as it takes. Consumption pauses meanwhile
  (the agent holds the batch; Faust stops fetching when its buffer is full) and resumes
  within about 2 s of the server's return. ``weir_dependency_up{dependency}`` is 0 and
  ``weir_dependency_retries_total`` counts while it lasts. The process does not exit. A
  SIGTERM meanwhile stops it within about ``WEIR_REDIS_TIMEOUT`` plus the usual shutdown
  (9 s measured, 4 s without an outage), the unfinished batch not acked (faust's shutdown
  would otherwise wait for it until the server is back).
* **One message is poison** (the model raises on it, a bug it triggers): the batch is
  bisected, that message is dead-lettered with reason ``model_error`` and the exception
  text, and the rest of the batch is scored (:func:`streams.scoring.isolate`).
* **Anything else escapes the batch** (a record Kafka refuses for good, such as one over
  the topic's ``max.message.bytes``; a bug outside the per-message code): faust 0.15.3
  would restart the agent (its ``OneForOneSupervisor``), and a restarted ``take_events``
  agent was seen to stay idle while the process looked alive. So the worker first marks
  the batch's messages so that they are never acked (the agent acks a batch only once it
  is done, :func:`take_batch`), logs the error and exits at once with
  status 70 (``EXIT_CRASHED``; ``os._exit``, like a kill -9: nothing more is committed).
  A supervisor (systemd ``Restart=on-failure``, Kubernetes) restarts it, and the
  uncommitted batches are redelivered. Every faust agent of the app exits the process
  this way if it raises (role ``all``'s learner is an app task: see :mod:`streams.live`).
* **Fast restart**: the worker joins its consumer group as a static member
  (``group.instance.id``, :func:`claim_instance_id`): a restarted process rejoins under
  the same id and gets its partitions back without waiting for a session timeout. The
  session timeout (``WEIR_KAFKA_SESSION_TIMEOUT``, 45 s) only bounds how long the
  partitions of a worker that does not come back (or was scaled down: a static member
  does not leave its group on shutdown) wait before the others take them over; it is
  longer than the 30 s broker pause the fault suite rides out, since a broker that
  resumes expires the sessions it did not hear from.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import logging
import os
import re
import socket
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from streams.delivery import renewing
from streams.scoring import BatchOutput, ModelSource, Prepared, RawMessage, Scorer
from streams.sync import UNTIMED, EventTimeSync, consumed_all, merge_by_time, message_time, sync_for
from weir.contracts import dead_letter_key, encode_dead_letter, encode_prediction
from weir.errors import StackError
from weir.heap import freeze_startup_heap
from weir.metrics import MetricsServer, WorkerMetrics
from weir.resilience import Backoff, DependencyHealth, dependency_of, is_transient, retry_async
from weir.settings import Settings
from weir.spec import PipelineSpec

log = logging.getLogger("weir.worker")

Role = Literal["all", "scorer"]

#: Exit status of a worker whose agent failed in a way it cannot ride out (EX_SOFTWARE).
EXIT_CRASHED = 70

#: Checks for a newer model after a failed one: 5 s doubling to 60 s (a newer model can wait).
FOLLOW_BACKOFF = Backoff(initial=5.0, maximum=60.0, jitter=0.0)

#: What to do when an agent fails for good: ``(what, exception)``; the default exits.
OnFatal = Callable[[str, BaseException], None]


def exit_process(what: str, exc: BaseException) -> None:
    """Log ``exc`` and end the process at once with :data:`EXIT_CRASHED` (see the module doc)."""
    log.critical(
        "%s failed: %s: %s. Exiting with status %d now, without committing, so that a "
        "supervisor restarts the worker; uncommitted batches will be redelivered.",
        what,
        type(exc).__name__,
        exc,
        EXIT_CRASHED,
        exc_info=exc,
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CRASHED)


# -- static membership --------------------------------------------------------------------

_held_slots: list[int] = []  # lock file descriptors, held for the life of the process


def claim_instance_id(settings: Settings, spec: PipelineSpec, role: str, lock_dir: Path | None = None) -> str:
    """A Kafka ``group.instance.id`` for this process: stable across restarts, unique in the group.

    ``WEIR_INSTANCE_ID`` if set. Otherwise ``<host>.<consumer group>.<role>.<n>`` where ``n``
    is the lowest slot whose lock file (``flock``, in a per-user directory under the system
    temp dir, shared by every process of the host) no live process holds. The kernel drops
    the lock when the process dies, kill -9 included, so the restarted process of a slot
    claims the same ``n``, while several processes of one pipeline and role on one host
    (``--role scorer`` scaled out) get different ones.
    """
    if settings.instance_id:
        return settings.instance_id
    base = re.sub(r"[^A-Za-z0-9._-]", "_", f"{socket.gethostname()}.{spec.consumer_group}.{role}")[:200]
    where = lock_dir or Path(tempfile.gettempdir()) / f"weir-instance-slots-{os.getuid()}"
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    for n in range(4096):
        fd = os.open(where / f"{base}.{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_slots.append(fd)
        return f"{base}.{n}"
    raise StackError(f"no free instance slot for {base!r} in {where}; set WEIR_INSTANCE_ID")


def release_instance_ids() -> None:
    """Give back the slots this process claimed (tests; a real worker holds them until exit)."""
    while _held_slots:
        os.close(_held_slots.pop())


# -- Kafka output -------------------------------------------------------------------------


class KafkaOutput:
    """Produces predictions and dead letters with confluent-kafka (:class:`Delivery`).

    :meth:`emit` queues a batch's records; :meth:`flush` is one delivery attempt that
    raises a transient :class:`StackError` until every queued record is acknowledged (those
    that failed are produced again on the next attempt); :meth:`deliver` retries it.
    """

    def __init__(self, spec: PipelineSpec, settings: Settings, flush_timeout: float = 5.0) -> None:
        # acks=all, idempotent; a producer stuck after a broker restart is replaced
        # (streams.delivery.RENEW_AFTER).
        self.delivery = renewing(settings, {"linger.ms": 5, "compression.type": "lz4"})
        self.spec = spec
        self.flush_timeout = flush_timeout

    @property
    def producer(self) -> Any:
        return self.delivery.producer

    def emit(self, out: BatchOutput) -> None:
        """Queue the batch's predictions and dead letters for the next :meth:`flush`."""
        t, add = self.spec.topics, self.delivery.add
        add((t.predictions, encode_prediction(p), p.entity_id.encode()) for p in out.predictions)
        add((t.dead_letters, encode_dead_letter(d), dead_letter_key(d)) for d in out.dead_letters)

    async def flush(self) -> None:
        """Produce what is pending and wait for every acknowledgement (one attempt)."""
        self.delivery.send()
        loop = asyncio.get_running_loop()
        left, errs = await loop.run_in_executor(None, self.delivery.wait, self.flush_timeout)
        if left:
            raise StackError(
                f"Kafka did not acknowledge {left} record(s) for "
                f"{self.spec.topics.predictions!r}/{self.spec.topics.dead_letters!r} within "
                f"{self.flush_timeout:g}s (errors: {errs}); retrying, the batch's offsets wait"
            )

    async def deliver(
        self,
        out: BatchOutput,
        health: DependencyHealth | None,
        backoff: Backoff,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Emit the batch's records and retry :meth:`flush` until all are acknowledged
        (or ``stop()`` turns true: the process is stopping)."""
        self.emit(out)
        n = len(out.predictions) + len(out.dead_letters)
        await retry_async(
            self.flush,
            what=f"delivery of {n} record(s) to Kafka",
            health=health,
            backoff=backoff,
            stop=stop,
        )


# -- the Faust app ------------------------------------------------------------------------


@types.coroutine
def _resume(coro: Any, yielded: Any) -> Generator[Any, Any, Any]:
    """Go on running ``coro``, which already ran up to its first suspension on ``yielded``.

    Hands ``yielded`` to the task driving this generator, then relays what the task sends
    or throws (a cancellation) to ``coro`` until it returns: the task runs ``coro`` as if
    it had started it.
    """
    while True:
        try:
            value = yield yielded
        except BaseException as exc:  # thrown in by the task: pass it on
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _resumed(coro: Any, yielded: Any) -> Any:
    return await _resume(coro, yielded)


def fast_drain_consumer(base: type, fetch_min_bytes: int = 1, fetch_max_wait_ms: int = 1500) -> type:
    """faust's consumer class with a cheaper hand-off of each fetched message, and fewer fetches.

    faust's fetcher hands every message to the app with
    ``await self.wait_first(callback(message), self.suspend_flow.wait())``: mode's
    ``wait_first`` makes four tasks (the callback, the flow, stopped, crashed), an
    ``asyncio.wait`` and three cancellations per message, the largest single cost of a
    scoring worker under load (issue #12). Almost always the callback (putting the event
    in the stream's buffer) finishes without waiting. So while the flow runs, the callback
    is first run inline up to its first suspension: if it finishes there, that is what
    ``wait_first`` would have returned (the callback the winner). If it has to wait (the
    stream's buffer is full), the rest of it goes through faust's ``wait_first`` as
    before, so a rebalance, a stop or a crash still interrupts it the same way.

    Fetches: faust gives aiokafka ``fetch_min_bytes`` 1 and ``fetch_max_wait_ms`` 1500, so
    while events flow at a moderate rate every fetch returns with the few that came since
    the last one, and the fetch (a request built and parsed in Python on the consumer's
    thread, then handed to the loop) costs more than those events: a third to a half of a
    scoring worker's CPU per event at a few hundred events a second (docs/performance.md).
    Here the broker holds a fetch until ``fetch_min_bytes`` arrived or
    ``fetch_max_wait_ms`` passed (``WEIR_KAFKA_FETCH_MIN_BYTES`` / ``_MAX_WAIT_MS``).
    """

    from mode.services import WaitResults

    class FastDrainConsumer(base):  # type: ignore[valid-type,misc]
        def _new_consumer_thread(self) -> Any:
            thread = super()._new_consumer_thread()
            create = thread._create_worker_consumer

            def with_fetch_wait(transport: Any) -> Any:
                consumer = create(transport)
                # Read by aiokafka when the consumer starts and makes its fetcher.
                consumer._fetch_min_bytes = fetch_min_bytes
                consumer._fetch_max_wait_ms = fetch_max_wait_ms
                return consumer

            thread._create_worker_consumer = with_fetch_wait
            return thread

        async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
            flow = getattr(self, "suspend_flow", None)
            if (
                len(coros) != 2
                or timeout is not None
                or flow is None
                or not inspect.iscoroutine(coros[0])
                or not inspect.iscoroutine(coros[1])
                or coros[1].cr_code is not getattr(type(flow).wait, "__code__", None)  # flow.wait()
                or flow.is_set()
                or self._stopped.is_set()
                or self._crashed.is_set()
            ):
                return await super().wait_first(*coros, timeout=timeout)
            coro, flow_wait = coros
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                flow_wait.close()  # never started: nothing to cancel
                return WaitResults([coro], [stop.value], False)
            except BaseException:
                flow_wait.close()
                raise
            return await super().wait_first(_resumed(coro, yielded), flow_wait, timeout=timeout)

    return FastDrainConsumer


def quiet_worker_class() -> type:
    """faust's worker class without its terminal spinner, so the root logger keeps its level.

    With ``-l warn`` (or any level from WARN up) faust's worker sets the root logger to
    DEBUG and adds a handler that spins a start-up spinner on every record: every debug
    call of aiokafka's fetcher and connections (several per fetch) then builds a log
    record, which Weir's redaction (:func:`weir.redact.install_log_redaction`) formats and
    scans, for the handlers to drop it. Profiled under a backlog with labels: 3.6% of the
    worker's busy samples (docs/performance.md, Profiles). Without the spinner the root
    logger stays at the level asked for and those calls return at once.
    """
    from faust.worker import Worker

    class QuietWorker(Worker):  # type: ignore[misc]
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            self.spinner = None  # faust skips the spinner and its DEBUG root when None
            super().on_setup_root_logger(logger, level)

    return QuietWorker


def raw_schema() -> Any:
    """A faust schema that hands the scorer each event as Kafka gave it, with no codec.

    The score agent reads ``event.message`` only (its key and value bytes); faust's
    schema would still run the raw codec on every key and value through its serializer
    registry (4% of a live scorer's busy samples, docs/performance.md). The event's
    ``key`` and ``value`` are the same bytes the raw codec returns.
    """
    from faust.serializers.schemas import Schema

    class RawSchema(Schema):  # type: ignore[misc]
        def compile(self, app: Any, **_: Any) -> Any:
            create_event = app.create_event

            async def decode(message: Any, *, propagate: bool = False) -> Any:
                return create_event(message.key, message.value, message.headers, message)

            return decode

    return RawSchema(key_serializer="raw", value_serializer="raw")


def without_monitor_sensor(app: Any) -> None:
    """Leave faust's ``Monitor`` out of the per-message sensor calls.

    faust adds its Monitor (stats for its web views, which Weir does not serve: Weir's
    metrics are its own) to the app's sensors when the worker starts, and calls it four
    times per message (in, stream in, stream out, out): 3% of a live scorer's busy samples.
    The consumer's direct calls to ``app.monitor`` (end offsets, commits) are unchanged.
    """
    init_dependencies = app.on_init_dependencies

    def on_init_dependencies() -> Any:
        deps = init_dependencies()  # adds the Monitor to app.sensors
        if app.monitor in app.sensors:
            app.sensors.remove(app.monitor)
        return deps

    app.on_init_dependencies = on_init_dependencies


@dataclass(slots=True)
class Ahead:
    """A batch taken by the score agent, its features computed (``prepared``); ``timed``,
    its events in event-time order, when it is to be scored in that order with the labels."""

    batch: list[Any]
    msgs: list[RawMessage]
    t0: float
    """When it was taken (``perf_counter``): the start of ``weir_batch_seconds``."""
    head: float
    """Its first event's time (``UNTIMED`` without the event-time sync)."""
    prepared: Prepared
    timed: list[tuple[float, RawMessage]] | None = None


def _hold(batch: Any) -> None:
    """Make sure the batch's messages are never acked by this process.

    A message marked acked is skipped by ``Message.ack`` (it tests ``acked`` first)
    without reaching the consumer, so its offset is never committed, whatever acks it
    later; and faust's shutdown, which waits for every message handed to the agent to be
    acked (``Consumer.wait_empty``), drops it from that wait.
    """
    for event in batch:
        event.message.acked = True


async def take_batch(app: Any, queue: Any, max_: int, within: float) -> list[Any]:
    """Up to ``max_`` events from the score agent's channel queue: the first as it comes,
    then those that come within ``within`` seconds of it (at once if they are there).

    What faust's ``take_events`` gives, without its stream: each message is tracked for
    the shutdown's wait (``Consumer.track_message``) and acked by the agent once its batch
    is durable (:func:`_ack`); a message fetched for an earlier assignment, or while a
    rebalance stops the flow, is acked and skipped, as faust's stream does.
    """
    loop = asyncio.get_running_loop()
    consumer = app.consumer
    flow = app.flow_control
    out: list[Any] = []
    deadline: float | None = None
    while len(out) < max_:
        if not queue.empty():
            event = queue.get_nowait()
        elif deadline is None:
            event = await queue.get()
        else:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                event = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                break
        if deadline is None:
            deadline = loop.time() + within
        message = event.message
        if not flow.is_active() or message.generation_id != app.consumer_generation_id:
            message.ack(consumer)
            continue
        if not message.tracked:
            message.tracked = True
            consumer.track_message(message)
        out.append(event)
    return out


async def run_batches(
    take: Callable[[], Awaitable[list[Any]]],
    idle: Callable[[], bool],
    prepare: Callable[[list[Any]], Awaitable[Ahead]],
    finish: Callable[[Ahead], Awaitable[None]],
    in_order: Callable[[Ahead], Awaitable[None]],
    stopping: Callable[[], bool],
) -> None:
    """The score agent's loop: each batch's features computed while the batch before it is
    scored, delivered, stored and acked (issue #12).

    A batch's features are one Redis round trip the event loop would otherwise only wait
    for; scoring, the Kafka delivery and the served records of the batch before it run
    meanwhile, in its own task (``finish``, which acks it). Two batches are in hand at most.
    Feature calls stay one at a time and in offset order (the feature script tells a
    redelivery by its offset); predictions, served records and acks stay in batch order
    (a batch's ``finish`` starts once the one before it ended).

    Args:
        take: the next batch (empty if every message it got was skipped).
        idle: True when nothing is waiting to be taken: the batch behind is then finished
            first (and its failure raised here) rather than left until the next event.
        prepare: the batch's features (``Ahead.prepared``), and its order (``Ahead.timed``)
            when it is to be scored in event-time order with the labels.
        finish: score, deliver and store a prepared batch, then ack it; it holds its batch
            (never acked) if it fails or is cancelled.
        in_order: the same for a batch to be scored in event-time order with the labels,
            run with nothing behind it.
        stopping: True once the process stops: the batch behind is finished, no more taken.

    Raises:
        Whatever a step raised, the batches in hand held (:func:`_hold`), never acked.
    """
    behind: asyncio.Future[None] | None = None
    batch: list[Any] = []
    try:
        while not stopping():
            if behind is not None and idle():
                task, behind = behind, None
                await task
                continue
            batch = await take()
            if not batch:
                continue
            ahead = await prepare(batch)
            if behind is not None:
                task, behind = behind, None
                await task
            if ahead.timed is not None:
                await in_order(ahead)
            else:
                behind = asyncio.ensure_future(finish(ahead))
            batch = []
        if behind is not None:
            task, behind = behind, None
            await task
    except BaseException:
        _hold(batch)
        if behind is not None:
            if behind.done():
                if not behind.cancelled():
                    behind.exception()  # retrieved: failed too, its batch held by finish
            else:
                behind.cancel()  # finish holds its batch when cancelled
        raise


def _ack(app: Any, batch: Any) -> None:
    """Ack a batch's messages: their offsets may be committed (in order)."""
    consumer = app.consumer
    for event in batch:
        event.message.ack(consumer)


def _release_unfinished(app: Any) -> None:
    """Stopping mid-batch: let faust's shutdown go on without acking what was not done.

    faust's shutdown waits (``Consumer.wait_empty``) until every message it handed to a
    stream is acked: the batch in hand and the ones buffered behind it. Marked acked here
    without reaching the consumer (see :func:`_hold`), they leave that wait, are not
    committed, and are redelivered after the restart.
    """
    for message in list(getattr(app.consumer, "_unacked_messages", ())):
        message.acked = True


def create_app(
    spec: PipelineSpec,
    settings: Settings,
    *,
    role: Role = "all",
    models: ModelSource | None = None,
    metrics: WorkerMetrics | None = None,
    instance_id: str | None = None,
    on_fatal: OnFatal = exit_process,
    backoff: Backoff = Backoff(),
) -> Any:
    """The Faust app of a scoring worker for ``spec``.

    Args:
        instance_id: Kafka static-membership id (:func:`claim_instance_id`), or None.
        on_fatal: Called when an agent fails for good; the default exits the process.
        backoff: Delays between retries of a failed Redis or Kafka call.
    """
    import faust

    from features.online import RedisFeatureStore

    datadir = (Path(settings.data_dir) / "faust" / spec.name).resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        spec.consumer_group,
        broker=settings.faust_broker(),
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=spec.topics.partitions,
        # Faust's own topics (the assignor's leader topic) replicated like Weir's.
        topic_replication_factor=settings.topic_replication_factor or spec.topics.replication_factor,
        consumer_auto_offset_reset="earliest",
        consumer_group_instance_id=instance_id,
        broker_session_timeout=settings.kafka_session_timeout,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 4 * spec.scoring.batch_size),
        Worker=quiet_worker_class(),
        **settings.faust_broker_options(),
    )
    events = app.topic(spec.topics.events, schema=raw_schema())
    without_monitor_sensor(app)
    # Before the consumer exists (it is made when the worker starts).
    app.transport.Consumer = fast_drain_consumer(  # type: ignore[misc]
        app.transport.Consumer, settings.kafka_fetch_min_bytes, settings.kafka_fetch_max_wait_ms
    )
    features = RedisFeatureStore(spec)
    health = DependencyHealth(metrics.registry if metrics is not None else None, spec.name)
    state: dict[str, Any] = {}

    served: Any = None
    learner_hook: Any = None
    sync: EventTimeSync | None = None
    if models is None:
        from streams.live import live_wiring, snapshot_wiring

        if role == "all":
            sync = sync_for(spec, metrics)
            live, served, learner_hook = live_wiring(spec, settings, sync)
            if metrics is not None:
                live.attach_metrics(metrics.registry)
            models = live
        else:
            models, served = snapshot_wiring(spec, settings)

    def stopping() -> bool:
        # A SIGTERM during an outage: faust's shutdown waits for the batch in hand to be
        # acked, so the retries give up and the batch is left for redelivery.
        return bool(app.should_stop)

    scorer = Scorer(spec, features, models, metrics, served, health=health, backoff=backoff, stop=stopping)
    _observe_model(spec, metrics, scorer.models)

    def redis_client() -> Any:
        if "redis" not in state:
            state["redis"] = settings.redis_async()
        return state["redis"]

    @app.agent(events, concurrency=1)
    async def score(stream: Any) -> None:
        output = KafkaOutput(spec, settings)
        if sync is not None:
            sync.bind(asyncio.get_running_loop())
        # The channel's queue, not the stream: faust's per-message stream machinery (a
        # sleep(0), sensors, a context variable and take_events' buffer for each event)
        # was about 43 µs per message on the loop (issue #12; take_batch).
        queue = stream.channel.queue
        # Started, the model loaded: later full collections skip the start-up heap (weir.heap).
        freeze_startup_heap()
        try:
            await run_batches(
                lambda: take_batch(app, queue, spec.scoring.batch_size, spec.scoring.batch_within),
                queue.empty,
                prepare,
                lambda ahead: finish(ahead, output),
                lambda ahead: score_in_order(ahead, output),
                lambda: bool(app.should_stop),
            )
        except (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit) as exc:
            # Stopping mid-batch (run_batches held the batches in hand): they are redelivered.
            if app.should_stop:
                _release_unfinished(app)
            else:  # faust would restart the agent ("Restarting on rebalance")
                on_fatal("the score agent (cancelled outside a shutdown)", exc)
            raise
        except BaseException as exc:
            if app.should_stop:  # retries given up for the shutdown
                log.warning(
                    "stopping with a batch of events not done (%s: %s); it will be redelivered",
                    type(exc).__name__,
                    exc,
                )
                _release_unfinished(app)
                return
            on_fatal("the score agent", exc)
            raise
        finally:
            output.producer.flush(1)
            if "redis" in state:
                await state.pop("redis").aclose()

    async def prepare(batch: Any) -> Ahead:
        """The batch's features (one Redis round trip), computed in event-time order with
        that order kept (``timed``) if it is to be scored in that order with the labels
        (role ``all`` with labels behind: :func:`score_in_order`). Features do not depend
        on the labels, only scores do: the runs share the batch's one feature call."""
        t0 = time.perf_counter()
        msgs = [
            RawMessage(
                e.message.value,
                e.message.key,
                e.message.topic,
                e.message.partition,
                e.message.offset,
                e.message.timestamp,
            )
            for e in batch
        ]
        head = UNTIMED
        if sync is not None:
            if sync.labels.caught_up:  # the usual live case: one ts read, no wait
                head = message_time(msgs[0].value, spec) if msgs else UNTIMED
            else:
                timed = merge_by_time(
                    [(message_time(m.value, spec), m) for m in msgs], lambda t: t[1].partition, lambda t: t[0]
                )
                head = min(ts for ts, _ in timed) if timed else UNTIMED
                if head < sync.live_from():  # live events never wait for labels
                    # A partition's events stay in offset order (the script tells a
                    # redelivery by its offset); an entity's events are in one partition.
                    prepared = await scorer.prepare([m for _, m in timed], redis_client())
                    return Ahead(batch, msgs, t0, head, prepared, timed)
        return Ahead(batch, msgs, t0, head, await scorer.prepare(msgs, redis_client()))

    async def finish(ahead: Ahead, output: KafkaOutput) -> None:
        """Score a prepared batch, deliver it and store what was served, then ack it."""
        try:
            follow()
            if sync is not None:
                sync.publish_events(ahead.head)  # labels due after the batch's first event wait for it
            out = await scorer.score(ahead.prepared)
            # Both durable before the batch is acked.
            await asyncio.gather(
                scorer.record_served(out, redis_client()), output.deliver(out, health, backoff, stopping)
            )
            done(ahead.batch, ahead.msgs, out, ahead.t0)
        except BaseException:
            _hold(ahead.batch)  # never acked: redelivered
            raise
        _ack(app, ahead.batch)  # its records durable: its offsets may be committed

    def done(batch: Any, msgs: list[RawMessage], out: BatchOutput, t0: float) -> None:
        if sync is not None:
            for e in batch:
                scored_to[e.message.tp] = e.message.offset + 1
            sync.publish_events(None, events_caught_up(full=len(batch) >= spec.scoring.batch_size))
        scorer.observe(msgs, out, time.perf_counter() - t0)
        _observe_lag(app, spec, metrics, batch)

    async def score_in_order(ahead: Ahead, output: KafkaOutput) -> None:
        """Role ``all`` with labels behind: the batch in event-time order with the labels
        (``ahead.timed``, ``(ts, message)`` in event-time order), the batch before it done.

        Each run of events with no label due before them is scored and its served records
        stored (the learner joins its labels to them) before the next run waits for the
        labels due before it (:mod:`streams.sync`). The features were computed for the whole
        batch in :func:`prepare`; the batch's records go to Kafka once, after all its runs.
        """
        assert sync is not None and ahead.timed is not None
        follow()
        redis = redis_client()
        timed, prepared = ahead.timed, ahead.prepared
        times = [ts for ts, _ in timed]
        place = {id(m): i for i, (_, m) in enumerate(timed)}
        computed = prepared.computed  # in timed's order, less the invalid and poison events
        outs = [BatchOutput(dead_letters=prepared.dead_letters)]
        i = k = 0
        while i < len(timed):
            sync.publish_events(times[i])
            n = await sync.wait_labels(times[i:])
            j = k
            while j < len(computed) and place[id(computed[j][0][1])] < i + n:
                j += 1
            out = await scorer.score(Prepared(prepared.now, computed[k:j], []))
            await scorer.record_served(out, redis)
            outs.append(out)
            i, k = i + n, j
        out = merge_outputs(outs)
        await output.deliver(out, health, backoff, stopping)
        done(ahead.batch, ahead.msgs, out, ahead.t0)
        _ack(app, ahead.batch)  # its records durable: its offsets may be committed

    scored_to: dict[Any, int] = {}  # per events partition: the offset after the last scored

    def events_caught_up(full: bool) -> bool:
        """No event waiting to be scored, as far as this worker can tell: the last batch
        did not fill up (faust's buffer ran dry) and every partition it scored from is
        scored up to its high watermark (as of the consumer's last fetch)."""
        if full:
            return False
        highs: dict[Any, int | None] = {}
        for tp in list(scored_to):
            try:
                highs[tp] = app.consumer.highwater(tp)
            except Exception:  # not assigned any more (a rebalance): not ours to wait for
                del scored_to[tp]
        return consumed_all(scored_to, highs)

    following: dict[str, Any] = {"next": 0.0, "failures": 0}

    def follow() -> None:
        """Swap in a newer model if there is one (the sources throttle their own checks).

        A failed check keeps the current model and is tried again after
        :data:`FOLLOW_BACKOFF`: a Redis outage must not stop scoring with the model in
        hand, nor block the event loop on every batch (the snapshot source's Redis client
        is synchronous: it blocks for up to ``WEIR_REDIS_TIMEOUT`` while Redis hangs).
        """
        now = time.monotonic()
        if now < following["next"]:
            return
        try:
            swapped = scorer.models.refresh()
        except Exception as exc:
            n = following["failures"]
            following["failures"] = n + 1
            following["next"] = now + FOLLOW_BACKOFF.delay(n)
            if is_transient(exc):
                health.failed(dependency_of(exc))
            if n == 0:
                log.warning("keeping the current model: checking for a newer one failed: %r", exc)
            return
        if following["failures"]:
            following["failures"] = 0
            health.ok("redis")
        if swapped:
            _, name, version = scorer.models.current()
            log.info("now scoring with %s %s", name, version)
            _observe_model(spec, metrics, scorer.models)

    @app.timer(1.0)
    async def follow_model() -> None:
        # Idle scorers follow snapshots and promotions too; a batch in flight keeps the
        # model it started with (it reads the model once, between awaits it does not).
        follow()
        _observe_model(spec, metrics, scorer.models)  # also ages the snapshot gauge
        if sync is not None and sync.events.head is None and not sync.events.caught_up:
            # An idle scorer after a full batch: caught up once nothing more came.
            sync.publish_events(None, events_caught_up(full=False))

    if learner_hook is not None:
        learner_hook(app)

    async def agent_crashed(agent: Any, exc: BaseException) -> None:
        # faust would restart the agent (see the module doc): end the process instead.
        on_fatal(f"agent {getattr(agent, 'name', agent)!s}", exc)

    for agent in app.agents.values():
        agent._on_error = agent_crashed  # faust's on_error hook, set on every agent of the app

    return app


def merge_outputs(outs: list[BatchOutput]) -> BatchOutput:
    """The output of one batch scored in several runs (:func:`score_in_order`)."""
    if len(outs) == 1:
        return outs[0]
    merged = BatchOutput()
    for out in outs:
        merged.predictions += out.predictions
        merged.dead_letters += out.dead_letters
        merged.duplicates += out.duplicates
        merged.late_ignored += out.late_ignored
        if out.max_ts is not None and (merged.max_ts is None or out.max_ts > merged.max_ts):
            merged.max_ts = out.max_ts
    return merged


def _observe_lag(app: Any, spec: PipelineSpec, metrics: WorkerMetrics | None, batch: Any) -> None:
    if metrics is None or not batch:
        return
    last: dict[Any, int] = {}
    for e in batch:
        last[e.message.tp] = e.message.offset
    for tp, offset in last.items():
        try:
            hw = app.consumer.highwater(tp)
        except Exception:
            continue
        if hw is not None:
            metrics.lag.labels(spec.name, tp.topic, str(tp.partition)).set(max(0, hw - offset - 1))


def _observe_model(spec: PipelineSpec, metrics: WorkerMetrics | None, models: ModelSource) -> None:
    if metrics is None:
        return
    _, name, version = models.current()
    # One series at a time: the snapshot id (v1.42) is a label value here only, and the
    # old one is dropped on every swap.
    metrics.model_version.clear()
    metrics.model_version.labels(spec.name, name, version).set(1)
    metrics.snapshot_age.labels(spec.name, name).set(models.age_seconds())


def run_worker(
    spec: PipelineSpec,
    settings: Settings,
    *,
    role: Role = "all",
    faust_args: list[str] | None = None,
    metrics_port: int | None = None,
) -> int:
    """Run a scoring worker until SIGINT/SIGTERM. Faust's worker options pass through.

    Exits with :data:`EXIT_CRASHED` (70) at once if an agent fails for good.
    """
    from prometheus_client import CollectorRegistry

    from streams.admin import check_broker, check_redis, ensure_topics

    check_broker(settings)
    check_redis(settings, spec=spec)
    ensure_topics(settings, spec)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry).init_series(spec)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = MetricsServer(registry, settings.metrics_host, port)
    log.info("metrics at %s", server.url)
    instance = claim_instance_id(settings, spec, role)
    log.info("Kafka static member %s of group %s", instance, spec.consumer_group)
    app = create_app(spec, settings, role=role, metrics=metrics, instance_id=instance)
    argv = ["weir-worker", "worker", *(faust_args or ["--without-web", "-l", "info"])]
    old = sys.argv
    sys.argv = argv
    try:
        app.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
        server.stop()
    return 0
