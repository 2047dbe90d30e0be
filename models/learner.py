"""The learner's per-batch logic, with no Kafka: parse, join, evaluate, learn, snapshot.

:class:`LearnerCore` is the only writer of its model. Per batch of label messages it

1. parses and validates each label (:func:`read_labels`: ``weir.contracts.parse_label``
   then the task's label type via :func:`models.factory.coerce_label`); a bad one becomes
   a dead letter;
2. joins the labels with the served records (:class:`models.join.LabelJoiner`); a label
   message before the offsets (read already, by this run or before its snapshot) is a
   ``duplicate``;
3. for each joined example, first scores the prediction that was *served* for the event
   (prequential: what users actually got), then learns the *served* features;
4. records the examples for the training-log topic and advances the offsets
   (:func:`offsets_after`);
5. publishes a snapshot every ``learner.snapshot_every_labels`` labels or
   ``learner.snapshot_every_seconds`` seconds, recording the next offsets to read.

The process around it (:class:`streams.learner.LearnerLoop`) consumes and produces; the
single-process scoring worker can embed a core and score with ``core.model`` directly.

**Steps.** :meth:`LearnerCore.process_step` and :meth:`LearnerCore.sweep_step` are
generators: the CPU work (parsing, learning) runs inside them, and each call to a server
is *yielded* as an :class:`Io` for the driver to run, which sends its result back. So one
sequence serves every driver: :func:`run_step` runs the calls inline (tests, replays);
the learner process runs them with bounded retries (a Redis or Kafka outage pauses the
step at that call, it does not fail the batch); role ``all`` awaits the label path (the
join, the sweep, the held labels) on an asyncio Redis client (:mod:`models.steps`) and
runs the other calls on a thread, while
the learning stays on the event loop thread, the only writer of the model the scorer
reads. Every yielded call is idempotent, so retrying one after a timeout whose writes
were applied anyway changes nothing: the label join's reads and holds (``SET NX``), the
marks of learned labels (the same ``run:seq`` on the served record again). A ``None`` yielded is a point where
the driver may let other work run (between chunks of learning).

**One round trip per batch.** The marks of a batch's learned labels are queued, not written: the
next call to Redis (the next batch's join, the sweep, or the flush a snapshot starts
with) writes them first, in the same script that reads the next batch's state.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from models.evaluation import OnlineEvaluator
from models.factory import build_model, check_task, coerce_label, learn, model_input
from models.join import JoinResult, LabelJoiner, Lineage, dead_letter
from models.steps import Io, Step, run_step
from weir.contracts import Example, encode_training_record, parse_label
from weir.errors import InvalidMessage
from weir.footprint import STEP_EVERY, RedisFootprint
from weir.types import Label

if TYPE_CHECKING:
    from models.registry import ModelRegistry
    from weir.metrics import LearnerMetrics
    from weir.spec import PipelineSpec


#: Examples learned between two points where the driver may let other work run.
LEARN_CHUNK = 100


@dataclass(slots=True)
class LabelMessage:
    """One message of the labels topic."""

    value: bytes | None
    partition: int = 0
    offset: int = -1
    key: bytes | None = None
    timestamp: float | None = None
    """Kafka's record timestamp in epoch seconds (None: not given): role ``all`` orders a
    label without ``ts`` at it (:func:`streams.sync.message_time`)."""


@dataclass
class StepOutput:
    """What a step asks the process to produce, and what happened."""

    training_log: list[bytes] = field(default_factory=list)
    dead_letters: list[bytes] = field(default_factory=list)
    results: list[JoinResult] = field(default_factory=list)
    snapshot_id: str | None = None
    expiries: int = 0
    now: float | None = None


@dataclass
class LabelBatch:
    """A batch of label messages, read: what the join gets, and what is dead-lettered.

    Attributes:
        labels: the valid labels, in message order (label coerced to the task's type).
        sources: each label's message as ``partition:offset`` (``""`` without an offset).
        read: each label's message is before the offsets: read already, a ``duplicate``.
        invalid: the messages that are not labels, with why.
    """

    labels: list[Label] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    read: list[bool] = field(default_factory=list)
    invalid: list[tuple[LabelMessage, InvalidMessage]] = field(default_factory=list)


def read_labels(
    spec: PipelineSpec, messages: Sequence[LabelMessage], offsets: Mapping[int, int], now: float
) -> LabelBatch:
    """Parse and validate a batch of label messages (:func:`weir.contracts.parse_label`,
    then the task's label type); no I/O. ``offsets`` are the next offsets to read per
    partition: a message before them was read already (by this run, or before its snapshot)."""
    batch = LabelBatch()
    for msg in messages:
        try:
            lab = parse_label(msg.value, spec, now=now)
            lab.label = coerce_label(lab.label, spec)
        except InvalidMessage as exc:
            batch.invalid.append((msg, exc))
            continue
        batch.labels.append(lab)
        batch.sources.append(f"{msg.partition}:{msg.offset}" if msg.offset >= 0 else "")
        batch.read.append(0 <= msg.offset < offsets.get(msg.partition, 0))
    return batch


def offsets_after(offsets: Mapping[int, int], messages: Sequence[LabelMessage]) -> dict[int, int]:
    """The next offsets to read per partition once ``messages`` are handled; never back.

    Examples:
        >>> offsets_after({0: 12}, [LabelMessage(b"", 0, 5), LabelMessage(b"", 1, 7), LabelMessage(None)])
        {0: 12, 1: 8}
    """
    out = dict(offsets)
    for msg in messages:
        if msg.offset >= 0:
            out[msg.partition] = max(out.get(msg.partition, 0), msg.offset + 1)
    return out


def status_key(spec: PipelineSpec) -> str:
    return f"{spec.redis_prefix}:status"


class LearnerCore:
    """One model's learner.

    Args:
        spec: the pipeline spec.
        model: the River model to learn (shared with an embedded scorer, if any).
        registry: where snapshots go; None learns without publishing (tests, replays).
        client: synchronous Redis client of the join.
        version_id: the model version being learned (``v1``...).
        metrics: Prometheus metrics; None for none.
        labels_learned: labels learned so far (restored from a snapshot).
        offsets: next labels-topic offset per partition (restored from a snapshot).
        lineage: which learned markers (on served records) the model contains (restored
            from a snapshot).
        clock: wall clock, for snapshots and the sweep.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        model: Any,
        registry: ModelRegistry | None,
        client: Any,
        *,
        version_id: str,
        metrics: LearnerMetrics | None = None,
        labels_learned: int = 0,
        offsets: dict[int, int] | None = None,
        lineage: Lineage | None = None,
        evaluator: OnlineEvaluator | None = None,
        clock: Callable[[], float] = time.time,
        snapshot_id: str | None = None,
    ) -> None:
        check_task(model, spec.task)
        self.spec = spec
        self.model = model
        self.registry = registry
        self.client = client
        self.version_id = version_id
        self.metrics = metrics
        self.labels_learned = labels_learned
        self.offsets: dict[int, int] = dict(offsets or {})
        self.evaluator = evaluator or OnlineEvaluator(spec.task)
        self.clock = clock
        self.joiner = LabelJoiner(spec, client, lineage)
        self.joiner.published_seq = labels_learned
        self.snapshot_id = snapshot_id
        self.snapshot_created: float | None = None
        self.joins: Counter[str] = Counter()
        self.expiries = 0
        self.labels_seen = 0
        self._learned_at_snapshot = labels_learned
        #: labels_learned when this run started (restored from its snapshot): what ``weir
        #: status`` tells from this run's own counts
        self.learned_at_start = labels_learned
        self._offsets_at_snapshot = dict(self.offsets)
        self._last_snapshot = clock()
        self._pipeline = spec.name
        self._model_name = spec.model.name
        self._delay: Any = None
        self._delay_of: Any = None
        #: the pipeline's Redis memory, sampled by the sweep while there are metrics
        #: (weir_redis_memory_bytes; role all sets them after the start)
        self.footprint = RedisFootprint(spec.redis_prefix, spec.name)
        self._footprint_at = 0.0
        if metrics is not None:
            metrics.model_version.labels(self._pipeline, self._model_name, version_id).set(1)

    # -- start -------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        spec: PipelineSpec,
        registry: ModelRegistry,
        client: Any,
        metrics: LearnerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> LearnerCore:
        """Resume from the latest snapshot, or bootstrap a fresh champion ``v1``.

        When the champion alias moved while no learner ran, the champion is learned from
        the snapshot's offsets on.
        """
        sid = registry.latest_snapshot()
        champion = registry.alias("champion")
        if sid is not None:
            model, meta = registry.load_snapshot(sid)
            version = str(meta["version_id"])
            lineage = Lineage(ancestors=dict(meta.get("lineage") or {}))
            if champion is not None and champion != version:
                model, _ = registry.load_live(champion)
                version = champion
            return cls(
                spec,
                model,
                registry,
                client,
                version_id=version,
                metrics=metrics,
                labels_learned=int(meta["labels_learned"]),
                offsets=meta["offsets"],
                lineage=lineage,
                clock=clock,
                snapshot_id=sid,
            )
        if champion is not None:
            model, _ = registry.load_live(champion)
            version = champion
        else:
            model = build_model(spec.model)
            mv = registry.save(
                model, parent=None, trigger="bootstrap", reason="fresh model from the spec", meta={}
            )
            registry.set_alias("champion", mv.id)
            version = mv.id
        return cls(spec, model, registry, client, version_id=version, metrics=metrics, clock=clock)

    # -- per batch ---------------------------------------------------------------

    def process(
        self, messages: Sequence[LabelMessage], now: float | None = None, snapshot: bool = True
    ) -> StepOutput:
        """Handle one batch of label messages inline; returns what to produce.

        With ``snapshot=False`` the caller snapshots (:meth:`snapshot_due`,
        :meth:`maybe_snapshot`) once it has delivered this batch's training-log records.
        """
        out = run_step(self.process_step(messages, now))
        self.joiner.flush()
        if snapshot:
            out.snapshot_id = self.maybe_snapshot(out.now)
        return out

    def process_step(self, messages: Sequence[LabelMessage], now: float | None = None) -> Step[StepOutput]:
        """The step of one batch: parse, join (one :class:`Io`), learn, queue the markers."""
        now = self.clock() if now is None else now
        out = StepOutput(now=now)
        batch = read_labels(self.spec, messages, self.offsets, now)
        self.labels_seen += len(messages)
        for msg, exc in batch.invalid:
            if self.metrics is not None:
                self.metrics.dead_letters.labels(self._pipeline, exc.reason).inc()
            out.dead_letters.append(
                dead_letter(
                    exc.reason,
                    str(exc),
                    self.spec.topics.labels,
                    msg.partition,
                    msg.offset,
                    msg.value,
                    msg.key,
                )
            )
            out.results.append(JoinResult("invalid", "", detail=str(exc)))
        if batch.invalid:
            self._tally(Counter(invalid=len(batch.invalid)))
        if self.metrics is not None and messages:
            self.metrics.labels.labels(self._pipeline).inc(len(messages))
        if batch.labels:
            joiner = self.joiner
            labels, sources, read = batch.labels, batch.sources, batch.read
            # Always a call, read labels included: it carries the previous batch's marks.
            # Its asyncio variant for a driver with an asyncio Redis client (role all).
            results = yield Io(
                lambda: joiner.join(labels, now=now, sources=sources, read=read),
                "label join",
                lambda client: joiner.ajoin(client, labels, now=now, sources=sources, read=read),
            )
            yield from self._apply_step(results, out)
        # The offsets move once the batch is learned and its marks queued (a snapshot
        # writes them first): a snapshot never records offsets past a batch whose step
        # did not finish.
        self.offsets.update(offsets_after(self.offsets, messages))
        return out

    def sweep(self, now: float | None = None, snapshot: bool = True) -> StepOutput:
        """Count expiries, resolve held (early) labels, snapshot if due. Call every second or so."""
        out = run_step(self.sweep_step(now))
        self.joiner.flush()
        if snapshot:
            out.snapshot_id = self.maybe_snapshot(out.now)
        return out

    def sweep_step(self, now: float | None = None) -> Step[StepOutput]:
        """The sweep as a step: one :class:`Io` for the sweep (and, every
        :data:`weir.footprint.STEP_EVERY` s, one for a step of the Redis memory sample),
        then learn and mark."""
        now = self.clock() if now is None else now
        out = StepOutput(now=now)
        joiner = self.joiner
        expiries, results = yield Io(
            lambda: joiner.sweep(now), "label sweep", lambda c: joiner.asweep(c, now)
        )
        footprint = self.footprint
        if self.metrics is not None and now - self._footprint_at >= STEP_EVERY:
            footprint.metrics = self.metrics
            self._footprint_at = now
            yield Io(lambda: footprint.step(self.client), "redis memory sample")
        self.expiries += expiries
        out.expiries = expiries
        if self.metrics is not None and expiries:
            self.metrics.expiries.labels(self._pipeline).inc(expiries)
        yield from self._apply_step(results, out)
        return out

    def held_step(self, now: float | None = None) -> Step[StepOutput]:
        """The next chunk of held (early) labels only (:meth:`LabelJoiner.resolve_held`),
        learned and marked: what the learner does between two sweeps while
        ``joiner.more_held`` (a backlog of held labels whose events are being served)."""
        now = self.clock() if now is None else now
        out = StepOutput(now=now)
        joiner = self.joiner
        results = yield Io(
            lambda: joiner.resolve_held(now), "held labels", lambda c: joiner.aresolve_held(c, now)
        )
        yield from self._apply_step(results, out)
        return out

    def _tally(self, outcomes: Counter[str]) -> None:
        """Count join outcomes, once per outcome and batch (not per label)."""
        self.joins.update(outcomes)
        if self.metrics is not None:
            for outcome, n in outcomes.items():
                self.metrics.joins.labels(self._pipeline, outcome).inc(n)

    def _apply_step(self, results: list[JoinResult], out: StepOutput) -> Step[None]:
        """Learn the examples of ``hit``/``resolved`` results, then queue their markers.

        A label whose learning raises (a poison example) is dead-lettered as
        ``model_error`` and the rest of the batch goes on; it is marked like a learned one,
        so neither a redelivery nor the sweep tries it again.
        """
        marked: list[tuple[str, int]] = []
        learned = 0
        self._tally(Counter(res.outcome for res in results))
        out.results.extend(results)
        for res in results:
            if res.example is not None and res.outcome in ("hit", "resolved"):
                try:
                    self.learn_example(res.example)
                except Exception as exc:
                    out.dead_letters.append(self._model_error(res.example, exc))
                else:
                    learned += 1
                    out.training_log.append(encode_training_record(res.example))
                marked.append((res.event_id, self.labels_learned))
                if len(marked) % LEARN_CHUNK == 0:
                    yield None
        # Queued, written at the start of the next call to Redis (see LabelJoiner).
        self.joiner.mark_learned(marked)
        if self.metrics is not None and learned:
            self.metrics.learned.labels(self._pipeline, self._model_name).inc(learned)

    def _model_error(self, ex: Example, exc: Exception) -> bytes:
        """The dead letter of a label whose learning raised: the joined example, as JSON."""
        text = f"{type(exc).__name__}: {exc}"[:2000]
        if self.metrics is not None:
            self.metrics.dead_letters.labels(self._pipeline, "model_error").inc()
        return dead_letter(
            "model_error",
            f"learning this label raised {text}; the rest of its batch was learned. The value "
            "is the joined example (served features and label): fix the model or the label, "
            "then replay it",
            self.spec.topics.labels,
            None,
            None,
            encode_training_record(ex),
            ex.event_id.encode(),
        )

    def learn_example(self, ex: Example) -> None:
        """Prequential step: score what was served, then learn the served features."""
        self.evaluator.update(ex.label, ex.prediction, ex.proba, model_version=ex.model_version)
        learn(self.model, model_input(ex.features), ex.label, self.spec.task)
        self.labels_learned += 1
        m = self.metrics
        if m is not None:
            if self._delay_of is not m:  # the child series, looked up once per metrics object
                self._delay, self._delay_of = m.label_delay.labels(self._pipeline), m
            self._delay.observe(max(0.0, ex.delay))

    # -- snapshots ---------------------------------------------------------------

    def snapshot_due(self, now: float | None = None) -> bool:
        """True when ``snapshot_every_labels`` or ``snapshot_every_seconds`` has come."""
        return self.registry is not None and self._due(self.clock() if now is None else now)

    def _due(self, now: float) -> bool:
        new_labels = self.labels_learned - self._learned_at_snapshot
        if new_labels >= self.spec.learner.snapshot_every_labels:
            return True
        dirty = new_labels > 0 or self.offsets != self._offsets_at_snapshot
        return dirty and now - self._last_snapshot >= self.spec.learner.snapshot_every_seconds

    def maybe_snapshot(self, now: float | None = None, force: bool = False) -> str | None:
        """Publish a snapshot when due (or ``force``); also follows a champion change."""
        now = self.clock() if now is None else now
        if self.registry is None:
            return None
        if not (force or self._due(now)):
            return None
        # The markers of every label the snapshot contains are written before it is.
        self.joiner.flush()
        self.follow_champion()
        lineage = self.joiner.lineage.for_snapshot(self.labels_learned, now, self.spec.labels.horizon)
        sid = self.registry.publish_snapshot(
            self.model,
            version_id=self.version_id,
            labels_learned=self.labels_learned,
            offsets=self.offsets,
            extra={"lineage": lineage, "run_id": self.joiner.lineage.run_id},
        )
        self.snapshot_id = sid
        self.snapshot_created = now
        self.joiner.published(self.labels_learned)
        self._learned_at_snapshot = self.labels_learned
        self._offsets_at_snapshot = dict(self.offsets)
        self._last_snapshot = now
        if self.metrics is not None:
            self.metrics.snapshots.labels(self._pipeline, self._model_name).inc()
            self.evaluator.export(self.metrics, self._pipeline, self._model_name)
        self.write_status(now)
        return sid

    def follow_champion(self) -> bool:
        """Switch to the champion version if the alias moved (promotion or rollback).

        The new champion starts from its parked state (:meth:`ModelRegistry.load_live`),
        and the outgoing version is parked first.
        """
        if self.registry is None:
            return False
        champion = self.registry.alias("champion")
        if champion is None or champion == self.version_id:
            return False
        model, _ = self.registry.load_live(champion)
        check_task(model, self.spec.task)
        # Keep what the outgoing version learned: a rollback to it resumes from here.
        self.registry.park(self.model, self.version_id, labels_learned=self.labels_learned, by="learner")
        if self.metrics is not None:
            # One series: the version learned now (the worker's gauge does the same).
            self.metrics.model_version.clear()
            self.metrics.model_version.labels(self._pipeline, self._model_name, champion).set(1)
        self.model = model
        self.version_id = champion
        return True

    # -- status ------------------------------------------------------------------

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        return {
            "pipeline": self.spec.name,
            "model": self._model_name,
            "version_id": self.version_id,
            "snapshot_id": self.snapshot_id,
            "snapshot_created": self.snapshot_created,
            "labels_seen": self.labels_seen,
            "labels_learned": self.labels_learned,
            "labels_learned_at_start": self.learned_at_start,
            "joins": dict(self.joins),
            "expiries": self.expiries,
            "unscored": self.evaluator.unscored,
            "metrics": self.evaluator.snapshot(),
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "run_id": self.joiner.lineage.run_id,
            "updated": now,
        }

    def write_status(self, now: float | None = None) -> None:
        """The summary ``weir status`` prints, at ``{prefix}:status``."""
        self.put_status(self.status(now))

    def put_status(self, status: dict[str, Any]) -> None:
        """Write a :meth:`status` computed earlier (the Redis half of :meth:`write_status`)."""
        self.client.set(status_key(self.spec), orjson.dumps(status, default=str))
