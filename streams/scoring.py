"""The per-batch scoring logic, free of Faust: validate, compute features, score, emit.

The Faust agent in :mod:`streams.worker` is a thin loop around :meth:`Scorer.process`;
tests and benchmarks drive the same code directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from features.base import FeatureResult, to_model_input
from streams.contracts import parse_event
from weir.errors import InvalidMessage
from weir.metrics import WorkerMetrics
from weir.spec import PipelineSpec
from weir.types import DeadLetter, Event, Prediction


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


@dataclass
class BatchOutput:
    """What one batch produced."""

    predictions: list[Prediction] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    late_ignored: int = 0
    max_ts: float | None = None


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


class StaticModel:
    """A fixed model (tests, benchmarks, a scorer with learning disabled)."""

    def __init__(self, model: Any, name: str, version: str) -> None:
        self.model = model
        self.name = name
        self.version = version

    def current(self) -> tuple[Any, str, str]:
        return self.model, self.name, self.version

    def refresh(self) -> bool:
        return False

    def age_seconds(self) -> float:
        return 0.0


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
            dead.append(DeadLetter(exc.reason, str(exc), m.topic, m.partition, m.offset, m.value, m.key, now))
    return good, dead


def score_events(
    spec: PipelineSpec,
    pairs: Sequence[tuple[Event, FeatureResult]],
    model: Any,
    model_name: str,
    model_version: str,
    now: float,
) -> list[Prediction]:
    """Score events whose features are computed. Pure: no I/O."""
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
    """

    def __init__(
        self,
        spec: PipelineSpec,
        features: Any,
        models: ModelSource,
        metrics: WorkerMetrics | None = None,
        served: Any | None = None,
    ) -> None:
        self.spec = spec
        self.features = features
        self.models = models
        self.metrics = metrics
        self.served = served

    async def process(self, msgs: Sequence[RawMessage], redis: Any) -> BatchOutput:
        """Validate, compute features (one Redis round trip) and score; see :meth:`record_served`."""
        now = time.time()
        good, dead = validate_batch(self.spec, msgs, now)
        out = BatchOutput(dead_letters=dead)
        if good:
            t0 = time.perf_counter()
            results: list[FeatureResult] = await self.features.acompute_batch(redis, [e for e, _ in good])
            if self.metrics is not None:
                self.metrics.redis_seconds.labels(self.spec.name, "features").observe(
                    time.perf_counter() - t0
                )
            model, name, version = self.models.current()
            to_score: list[tuple[Event, FeatureResult]] = []
            for (event, msg), res in zip(good, results, strict=True):
                if res.status == "late":
                    if self.spec.late_events == "dead_letter":
                        out.dead_letters.append(
                            DeadLetter(
                                "late",
                                f"event ts={event.ts} is more than lateness={self.spec.lateness}s behind "
                                f"entity {event.entity_id!r}'s newest event; raise `lateness` to accept it",
                                msg.topic,
                                msg.partition,
                                msg.offset,
                                msg.value,
                                msg.key,
                                now,
                            )
                        )
                    else:
                        out.late_ignored += 1
                    continue
                if res.status == "duplicate":
                    out.duplicates += 1
                to_score.append((event, res))
                if out.max_ts is None or event.ts > out.max_ts:
                    out.max_ts = event.ts
            out.predictions = score_events(self.spec, to_score, model, name, version, time.time())
        return out

    async def record_served(self, out: BatchOutput, redis: Any) -> None:
        """Store what was served (the learner joins labels to it); one round trip.

        The worker runs this concurrently with the Kafka flush of the same batch: both
        finish before the batch's offsets can be committed.
        """
        if self.served is None or not out.predictions:
            return
        t1 = time.perf_counter()
        pipe = redis.pipeline(transaction=False)
        self.served.add_to_pipeline(pipe, out.predictions)
        await pipe.execute()
        if self.metrics is not None:
            self.metrics.redis_seconds.labels(self.spec.name, "served").observe(time.perf_counter() - t1)

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
            m.predictions.labels(p, pred.model, pred.model_version).inc(len(out.predictions))
        if out.max_ts is not None:
            m.feature_freshness.labels(p).set(out.max_ts)
        now = time.time()
        for msg in msgs:
            if msg.timestamp:
                m.latency.labels(p).observe(max(0.0, now - msg.timestamp))
