"""The per-batch scoring logic, free of Faust: validate, compute features, score, emit.

The Faust agent in :mod:`streams.worker` is a thin loop around :meth:`Scorer.prepare` and
:meth:`Scorer.score` (:meth:`Scorer.process` is both); tests and benchmarks drive the same
code directly.

Failures of a batch fall in two kinds (:func:`weir.resilience.is_transient`, imported here
as ``is_transient_failure``):

* *Transient*: a server is down, hung or refusing for a while (a Redis timeout, a refused
  connection, an ``OOM``/``READONLY``/``NOPERM`` reply, an undelivered Kafka batch). The step
  that failed is retried on the same batch with bounded exponential backoff
  (:func:`weir.resilience.retry_async`) until it succeeds; the batch is never skipped.
  Re-running the feature step is safe whether or not Redis applied it: the feature script
  recognises an event it already decided by its offset (and event id), checked before
  lateness, and answers it with the features it first served, so a rerun serves what the
  first run served (docs/features.md, Duplicates).
* *Poison*: anything else, raised by one message (a model that raises on one input, a bug
  one message triggers). :func:`isolate` splits the batch in halves until it has the
  messages that raise alone; those become ``model_error`` dead letters carrying the
  exception text and the rest are scored. Scoring is pure, so every exception it raises
  is poison, whatever its type.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from features.base import FeatureResult, to_model_input
from features.freshness import freshness_names, histogram_ages, windows
from weir.contracts import parse_event
from weir.errors import InvalidMessage
from weir.metrics import WorkerMetrics
from weir.resilience import Backoff, DependencyHealth, retry_async
from weir.resilience import is_transient as is_transient_failure
from weir.spec import PipelineSpec
from weir.types import DeadLetter, Event, Prediction, version_of

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class RawMessage:
    """One consumed Kafka message, as the scorer needs it."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: float | None = None
    """Kafka message timestamp (epoch seconds): the start of event-to-prediction latency."""

    def dead_letter(self, reason: str, detail: str, now: float) -> DeadLetter:
        """This message as a dead letter: why, and where it came from."""
        return DeadLetter(reason, detail, self.topic, self.partition, self.offset, self.value, self.key, now)


@dataclass
class BatchOutput:
    """What one batch produced."""

    predictions: list[Prediction] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    late_ignored: int = 0
    max_ts: float | None = None


@dataclass(slots=True)
class Prepared:
    """A batch validated and its features computed, not yet scored (:meth:`Scorer.prepare`)."""

    now: float
    """When it was validated: the time of its dead letters."""
    computed: list[tuple[tuple[Event, RawMessage], FeatureResult]]
    dead_letters: list[DeadLetter]


class ModelSource(Protocol):
    """Where the scorer gets the model it scores with. ``refresh`` runs between batches."""

    def current(self) -> tuple[Any, str, str]:
        """``(model, model_name, model_version)``."""
        ...

    def refresh(self) -> bool:
        """Swap in a newer model if there is one; True if it swapped."""
        ...

    def age_seconds(self) -> float:
        """Age of the model scored with (0 for a live model)."""
        ...


async def isolate(
    items: Sequence[T],
    run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
    *,
    transient: Callable[[BaseException], bool] = is_transient_failure,
) -> tuple[list[tuple[T, R]], list[tuple[T, Exception]]]:
    """Run ``run(items)``; if it raises, bisect to find the items that raise on their own.

    ``run`` returns one result per item, in order. A transient failure is not the items'
    fault: it propagates (the caller retries the whole batch). Otherwise the batch is split
    in halves, each run again (left first, so order-dependent effects keep their order),
    down to single items; an item that still raises alone is poison.

    Returns:
        ``(ok, poison)``: ``(item, result)`` pairs in input order, and ``(item, exception)``.

    Examples:
        >>> import asyncio
        >>> async def halve(xs):
        ...     return [10 // x for x in xs]  # 0 is poison
        >>> ok, bad = asyncio.run(isolate([1, 0, 5, 2], halve))
        >>> ok, [(x, type(e).__name__) for x, e in bad]
        ([(1, 10), (5, 2), (2, 5)], [(0, 'ZeroDivisionError')])
    """
    if not items:
        return [], []
    try:
        results = await run(items)
    except Exception as exc:
        if transient(exc):
            raise
        if len(items) == 1:
            return [], [(items[0], exc)]
        mid = len(items) // 2
        ok_left, bad_left = await isolate(items[:mid], run, transient=transient)
        ok_right, bad_right = await isolate(items[mid:], run, transient=transient)
        return ok_left + ok_right, bad_left + bad_right
    if len(results) != len(items):
        raise ValueError(f"isolate: run() returned {len(results)} results for {len(items)} items")
    return list(zip(items, results, strict=True)), []


def observe_many(hist: Any, values: Sequence[float]) -> None:
    """``hist.observe(v)`` for every value, with one lock per bucket touched, not per value.

    A batch's event-to-prediction latencies land in a few buckets: the counts are added per
    bucket (prometheus_client's histogram child: ``_upper_bounds``, ``_buckets``, ``_sum``);
    the exposed histogram is the same as observing one by one. A histogram without those
    internals (another client version) is observed one by one.

    Examples:
        >>> from prometheus_client import CollectorRegistry, Histogram
        >>> h = Histogram("x_seconds", "x", buckets=(0.01, 0.1), registry=CollectorRegistry())
        >>> observe_many(h, [0.005, 0.01, 0.05, 2.0])
        >>> [(s.labels.get("le"), s.value) for s in h.collect()[0].samples][:3]
        [('0.01', 2.0), ('0.1', 3.0), ('+Inf', 4.0)]
    """
    if not values:
        return
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            hist.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect_left(bounds, v)  # the first bound >= v, as Histogram.observe picks it
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


def model_error(msg: RawMessage, exc: BaseException, now: float) -> DeadLetter:
    """The dead letter of a message that made scoring raise on its own (poison)."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > 2000:
        text = text[:2000] + "..."
    return msg.dead_letter(
        "model_error",
        f"scoring this event raised {text}; the rest of its batch was scored. Fix the model "
        "or the event and replay it from the dead-letter topic",
        now,
    )


def validate_batch(
    spec: PipelineSpec, msgs: Sequence[RawMessage], now: float
) -> tuple[list[tuple[Event, RawMessage]], list[DeadLetter]]:
    """Parse every message; the bad ones become dead letters with their reason."""
    good: list[tuple[Event, RawMessage]] = []
    dead: list[DeadLetter] = []
    for m in msgs:
        try:
            good.append((parse_event(m.value, spec, now), m))
        except InvalidMessage as exc:
            dead.append(m.dead_letter(exc.reason, str(exc), now))
    return good, dead


def route_computed(
    spec: PipelineSpec, computed: Sequence[tuple[tuple[Event, RawMessage], FeatureResult]], now: float
) -> tuple[list[tuple[Event, FeatureResult, RawMessage]], BatchOutput]:
    """Which events with features are scored, and what the others become. Pure: no I/O.

    A ``late`` event is a ``late`` dead letter (``late_events: dead_letter``) or counted
    in ``late_ignored``; a ``duplicate`` is scored again on its first features and counted.
    Returns the events to score, in order, and a :class:`BatchOutput` with the dead
    letters, the counts and ``max_ts`` (the newest scored event's time; no predictions).
    """
    out = BatchOutput()
    to_score: list[tuple[Event, FeatureResult, RawMessage]] = []
    for (event, msg), res in computed:
        if res.status == "late":
            if spec.late_events == "dead_letter":
                detail = (
                    f"event ts={event.ts} is more than lateness={spec.lateness}s behind "
                    f"entity {event.entity_id!r}'s newest event; raise `lateness` to accept it"
                )
                out.dead_letters.append(msg.dead_letter("late", detail, now))
            else:
                out.late_ignored += 1
            continue
        if res.status == "duplicate":
            out.duplicates += 1
        to_score.append((event, res, msg))
        if out.max_ts is None or event.ts > out.max_ts:
            out.max_ts = event.ts
    return to_score, out


def score_events(
    spec: PipelineSpec,
    pairs: Sequence[tuple[Event, FeatureResult]],
    model: Any,
    model_name: str,
    model_version: str,
    now: float,
    model_age: float | None = None,
) -> list[Prediction]:
    """Score events whose features are computed. Pure: no I/O.

    Each prediction carries its features' ages (``res.freshness``, empty if the engine
    gave none) and ``model_age``, the age of the model snapshot scored with.
    """
    from models.factory import predict

    out: list[Prediction] = []
    task = spec.task
    for event, res in pairs:
        fv = res.features or {}
        y, proba = predict(model, to_model_input(fv), task)
        out.append(
            Prediction(
                event_id=event.event_id,
                entity_id=event.entity_id,
                ts=event.ts,
                model=model_name,
                model_version=model_version,
                prediction=y,
                proba=proba,
                features=fv,
                scored_at=now,
                freshness=res.freshness or {},
                model_age=model_age,
            )
        )
    return out


class Scorer:
    """Scores batches of raw event messages for one pipeline.

    Args:
        spec: The pipeline.
        features: The online feature engine (:class:`features.online.RedisFeatureStore`).
        models: Where the model comes from (live, snapshots, or static).
        metrics: This process's metrics, or None.
        served: The served-record store the learner joins labels against, or None.
        health: ``weir_dependency_up`` of this process, set while Redis calls are retried.
        backoff: Delays between retries of a Redis call that failed transiently.
        stop: True once the process is stopping: a retry then gives up (raising the last
            error) instead of holding the shutdown until the server is back.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        features: Any,
        models: ModelSource,
        metrics: WorkerMetrics | None = None,
        served: Any | None = None,
        *,
        health: DependencyHealth | None = None,
        backoff: Backoff = Backoff(),
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.features = features
        self.models = models
        self.metrics = metrics
        self.served = served
        self.health = health
        self.backoff = backoff
        self.stop = stop
        self._ages: tuple[list[str], dict[str, float], dict[str, Any]] | None = None

    async def _retry(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_async(
            op,
            what=what,
            health=self.health,
            backoff=self.backoff,
            stop=self.stop,
        )

    async def compute_features(
        self, redis: Any, good: Sequence[tuple[Event, RawMessage]], now: float
    ) -> tuple[list[tuple[tuple[Event, RawMessage], FeatureResult]], list[DeadLetter]]:
        """The features of validated events: retried through outages, poison isolated."""

        async def run(pairs: Sequence[tuple[Event, RawMessage]]) -> list[FeatureResult]:
            t0 = time.perf_counter()
            # With each message's offset: a redelivered message is recognised by it.
            results: list[FeatureResult] = await self.features.acompute_batch(
                redis, [e for e, _ in pairs], positions=[(m.topic, m.partition, m.offset) for _, m in pairs]
            )
            if self.metrics is not None:
                self.metrics.redis_seconds.labels(self.spec.name, "features").observe(
                    time.perf_counter() - t0
                )
            return results

        ok, poison = await self._retry(lambda: isolate(good, run), f"features of {len(good)} event(s)")
        return ok, [model_error(msg, exc, now) for (_, msg), exc in poison]

    async def process(self, msgs: Sequence[RawMessage], redis: Any) -> BatchOutput:
        """Validate, compute features (one Redis round trip) and score; see :meth:`record_served`.

        Transient Redis failures are retried until they pass; an event whose features or
        score raise on their own is dead-lettered (``model_error``) and the rest scored.
        :meth:`prepare` then :meth:`score`: the worker runs the two apart, a batch's features
        in Redis while the batch before it is scored (:mod:`streams.worker`).
        """
        return await self.score(await self.prepare(msgs, redis))

    async def prepare(self, msgs: Sequence[RawMessage], redis: Any) -> Prepared:
        """Validate and compute features (one Redis round trip): the I/O half of :meth:`process`."""
        now = time.time()
        good, dead = validate_batch(self.spec, msgs, now)
        computed: list[tuple[tuple[Event, RawMessage], FeatureResult]] = []
        if good:
            computed, poison = await self.compute_features(redis, good, now)
            dead.extend(poison)
        return Prepared(now, computed, dead)

    async def score(self, prepared: Prepared) -> BatchOutput:
        """Score a prepared batch with the current model: the CPU half of :meth:`process`."""
        now = prepared.now
        out = BatchOutput(dead_letters=list(prepared.dead_letters))  # prepared stays as it was
        if prepared.computed:
            model, name, version = self.models.current()
            model_age = self.models.age_seconds()
            to_score, routed = route_computed(self.spec, prepared.computed, now)
            out.dead_letters.extend(routed.dead_letters)
            out.duplicates, out.late_ignored = routed.duplicates, routed.late_ignored
            out.max_ts = routed.max_ts
            scored_at = time.time()

            async def score(items: Sequence[tuple[Event, FeatureResult, RawMessage]]) -> list[Prediction]:
                pairs = [(e, r) for e, r, _ in items]
                return score_events(self.spec, pairs, model, name, version, scored_at, model_age)

            # Pure: whatever it raises is the events' fault, never a server's.
            scored, bad = await isolate(to_score, score, transient=lambda exc: False)
            out.predictions = [p for _, p in scored]
            out.dead_letters.extend(model_error(msg, exc, now) for (_, _, msg), exc in bad)
        return out

    async def record_served(self, out: BatchOutput, redis: Any) -> None:
        """Store what was served (the learner joins labels to it); one round trip.

        The worker runs this concurrently with the Kafka flush of the same batch: both
        finish before the batch's offsets can be committed.
        """
        served = self.served
        if served is None or not out.predictions:
            return

        async def run() -> None:
            # SET NX and ZADD NX: a retry after a partial or unknown outcome changes nothing
            # that the first attempt stored.
            t1 = time.perf_counter()
            await served.awrite(redis, out.predictions)  # one call per node with buckets
            if self.metrics is not None:
                self.metrics.redis_seconds.labels(self.spec.name, "served").observe(time.perf_counter() - t1)

        await self._retry(run, f"served records of {len(out.predictions)} prediction(s)")

    def _observe_ages(self, m: WorkerMetrics, predictions: Sequence[Prediction]) -> None:
        """``weir_feature_age_seconds``: the batch's ages, per feature (few locks a batch)."""
        if self._ages is None:
            names = freshness_names(self.spec)
            children = {n: m.feature_age.labels(self.spec.name, n) for n in names}
            self._ages = (names, windows(self.spec), children)
        names, window, children = self._ages
        if not names:
            return
        for n, values in histogram_ages(names, window, [p.freshness for p in predictions]).items():
            observe_many(children[n], values)

    def observe(self, msgs: Sequence[RawMessage], out: BatchOutput, seconds: float) -> None:
        """Record a processed batch in the metrics."""
        m = self.metrics
        if m is None:
            return
        p = self.spec.name
        m.events.labels(p).inc(len(msgs))
        m.batch_size.labels(p).observe(len(msgs))
        m.batch_seconds.labels(p).observe(seconds)
        if out.duplicates:
            m.duplicates.labels(p).inc(out.duplicates)
        if out.late_ignored:
            m.late_events.labels(p, "ignore").inc(out.late_ignored)
        for d in out.dead_letters:
            m.dead_letters.labels(p, d.reason).inc()
            if d.reason == "late":
                m.late_events.labels(p, "dead_letter").inc()
        if out.predictions:
            pred = out.predictions[0]
            # By model version (v1), not snapshot (v1.42): a label value per snapshot would
            # grow the series without bound; weir_model_version_info names the snapshot.
            m.predictions.labels(p, pred.model, version_of(pred.model_version)).inc(len(out.predictions))
        if out.max_ts is not None:
            m.feature_freshness.labels(p).set(out.max_ts)
        if out.predictions:
            self._observe_ages(m, out.predictions)
        now = time.time()
        observe_many(m.latency.labels(p), [max(0.0, now - t) for msg in msgs if (t := msg.timestamp)])
