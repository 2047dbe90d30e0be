"""The label join: delayed labels meet the features that were *served*, never recomputed.

Redis keys (``P`` = ``spec.redis_prefix``), all with a TTL of ``labels.horizon``:

* ``P:served:{event_id}`` - the served record (orjson of the Prediction: features as served,
  prediction, proba, model_version, ts, entity_id, scored_at), written by the scorer
  through :meth:`ServedStore.add_to_pipeline` on the pipeline it already executes.
* ``P:join:pending`` - sorted set of served event ids by deadline (scored_at + horizon);
  the learner's sweep counts those past their deadline as expiries (no label came).
* ``P:join:expired`` - sorted set of event ids whose horizon passed, kept one more horizon,
  so a label arriving after the horizon is told apart from an early one.
* ``P:early:{event_id}`` + ``P:join:early`` - labels that arrived before their event was
  scored, held until the *learner's periodic sweep* finds the served record (the scorer
  is never slowed by label work) or the horizon passes (outcome ``unknown``).
* ``P:learned:{event_id}`` - the learned marker ``run:seq`` (dedupe, second line of
  defence after the snapshot offsets; see :class:`Lineage`).

**Bounded by the horizon, with or without a learner.** Every per-event key has a TTL of
one horizon. The sorted sets are trimmed by whoever writes them: each scorer batch drops
the pending ids whose deadline passed more than a horizon ago (a learner that is down
longer than that does not count their expiries) and the learner's holds and sweeps trim
theirs; each set also expires two horizons after its last write. So with no learner
running, the join holds the served records of the last horizon and at most two horizons
of pending ids; nothing grows with the stream's length.

**Retried calls.** A call that timed out may still have been applied (a paused Redis
runs the queued commands when it resumes). Every write here is idempotent: served records
and holds are ``SET NX`` (a retried hold that finds its own body counts as ``early``, not
``duplicate``), markers are rewritten with the same value, sorted-set adds are ``NX``.

Outcomes, counted in ``weir_label_joins_total{outcome}``, one per label on arrival:
``hit`` (learned now), ``early`` (held), ``duplicate`` (already learned or already held),
``expired`` (its served record is gone: the horizon passed), ``invalid`` (dead-lettered);
and later, for held labels, ``resolved`` (learned by a sweep) or ``unknown`` (never served).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from weir.spec import PipelineSpec
from weir.types import DeadLetter, FeatureVector, Label, LabelValue, Prediction

Outcome = Literal["hit", "early", "duplicate", "expired", "invalid", "resolved", "unknown"]
OUTCOMES: tuple[str, ...] = (
    "hit",
    "early",
    "duplicate",
    "expired",
    "invalid",
    "resolved",
    "unknown",
)
#: At most this many ids are handled per sweep step, so one sweep never stalls the learner.
SWEEP_LIMIT = 10_000
#: Held (early) labels looked at per sweep: a backlog of them is walked in chunks,
#: round robin, over several sweeps (three GETs each; a chunk is ~1,500 pipelined ops).
SWEEP_HELD_CHUNK = 500


def _px(spec: PipelineSpec) -> int:
    return max(1, int(spec.labels.horizon * 1000))


class Keys:
    """Key names of the join, in one place."""

    def __init__(self, spec: PipelineSpec) -> None:
        p = spec.redis_prefix
        self.prefix = p
        self.pending = f"{p}:join:pending"
        self.expired = f"{p}:join:expired"
        self.early_index = f"{p}:join:early"

    def served(self, event_id: str) -> str:
        return f"{self.prefix}:served:{event_id}"

    def early(self, event_id: str) -> str:
        return f"{self.prefix}:early:{event_id}"

    def learned(self, event_id: str) -> str:
        return f"{self.prefix}:learned:{event_id}"


def prediction_from_dict(d: dict[str, Any]) -> Prediction:
    return Prediction(
        event_id=str(d["event_id"]),
        entity_id=str(d["entity_id"]),
        ts=float(d["ts"]),
        model=str(d.get("model", "")),
        model_version=str(d.get("model_version", "")),
        prediction=d.get("prediction"),
        proba=d.get("proba"),
        features=dict(d.get("features") or {}),
        scored_at=float(d.get("scored_at", 0.0)),
    )


class ServedStore:
    """Where scorers record what they served, for the label join.

    Args:
        spec: the pipeline spec (prefix and ``labels.horizon``).
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.keys = Keys(spec)
        self.px = _px(spec)

    def add_to_pipeline(self, pipe: Any, predictions: Sequence[Prediction], now: float | None = None) -> None:
        """Queue the served records on ``pipe`` (the caller executes it).

        A redelivered event keeps its first served record (``SET NX``): that is what
        was published first and what its label must be joined with.
        """
        if not predictions:
            return
        now = time.time() if now is None else now
        deadline = now + self.spec.labels.horizon
        for p in predictions:
            pipe.set(self.keys.served(p.event_id), orjson.dumps(p.to_dict()), px=self.px, nx=True)
        pipe.zadd(self.keys.pending, {p.event_id: deadline for p in predictions}, nx=True)
        # Bounded without a learner: deadlines more than a horizon ago are dropped here.
        pipe.zremrangebyscore(self.keys.pending, "-inf", now - self.spec.labels.horizon)
        pipe.pexpire(self.keys.pending, 2 * self.px)

    def get_many(self, client: Any, event_ids: Sequence[str]) -> list[Prediction | None]:
        """The served records of ``event_ids`` (None where absent), one MGET."""
        if not event_ids:
            return []
        raws = client.mget([self.keys.served(e) for e in event_ids])
        return [None if r is None else prediction_from_dict(orjson.loads(r)) for r in raws]


@dataclass(slots=True)
class Example:
    """A joined training example: the served features and prediction, and the label."""

    event_id: str
    entity_id: str
    event_ts: float
    label_ts: float
    features: FeatureVector
    label: LabelValue
    prediction: LabelValue | None
    proba: dict[str, float] | None
    model_version: str

    def to_record(self) -> dict[str, Any]:
        """The training-log record (JSON on the training_log topic)."""
        return {
            "event_id": self.event_id,
            "entity_id": self.entity_id,
            "ts": self.event_ts,  # the event's time: what retraining windows and sorts on
            "label_ts": self.label_ts,
            "features": self.features,
            "label": self.label,
            "prediction": self.prediction,
            "proba": self.proba,
            "model_version": self.model_version,
        }

    @property
    def delay(self) -> float:
        return self.label_ts - self.event_ts


@dataclass(slots=True)
class JoinResult:
    outcome: Outcome
    event_id: str
    example: Example | None = None
    detail: str = ""


@dataclass
class Lineage:
    """Which learned markers the live model really contains.

    A marker is ``run_id:seq``: the learner run that learned the label and its count of
    labels learned. The model contains a marker's label if the marker is from this run,
    or from an earlier run up to the ``seq`` that run had reached when the snapshot this
    run started from was taken. A marker past that cutoff was learned by a model state
    lost in a crash: the label is learned again instead of being dropped as a duplicate.
    """

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    #: earlier runs -> [cutoff seq, time of the snapshot recording it]
    ancestors: dict[str, list[float]] = field(default_factory=dict)

    def marker(self, seq: int) -> bytes:
        return f"{self.run_id}:{seq}".encode()

    def contains(self, marker: bytes | str | None) -> bool:
        if marker is None:
            return False
        text = marker.decode() if isinstance(marker, bytes) else marker
        run, _, seq = text.partition(":")
        if run == self.run_id:
            return True
        cut = self.ancestors.get(run)
        return cut is not None and seq.isdigit() and int(seq) <= cut[0]

    def for_snapshot(self, seq: int, now: float, horizon: float) -> dict[str, list[float]]:
        """The lineage to store with a snapshot taken at ``seq`` (old runs pruned)."""
        out = {r: c for r, c in self.ancestors.items() if c[1] >= now - 2 * horizon}
        out[self.run_id] = [seq, now]
        return out


class LabelJoiner:
    """Joins labels with served records in Redis; pure decisions, batched round trips.

    One joiner per learner (one writer per model). The caller learns every example of
    a ``hit``/``resolved`` result, then calls :meth:`mark_learned`.
    """

    def __init__(self, spec: PipelineSpec, client: Any, lineage: Lineage | None = None) -> None:
        self.spec = spec
        self.client = client
        self.keys = Keys(spec)
        self.px = _px(spec)
        self.lineage = lineage or Lineage()
        self.served = ServedStore(spec)
        self._held_cursor = 0  # rank in the early index where the next sweep looks

    def _example(self, label: Label, served: Prediction) -> Example:
        return Example(
            event_id=label.event_id,
            entity_id=served.entity_id,
            event_ts=served.ts,
            label_ts=label.ts,
            features=served.features,
            label=label.label,
            prediction=served.prediction,
            proba=served.proba,
            model_version=served.model_version,
        )

    def join(
        self, labels: Sequence[Label], now: float | None = None, sources: Sequence[str] | None = None
    ) -> list[JoinResult]:
        """Decide each label's outcome (labels already validated and coerced).

        Two round trips at most: one pipeline of reads, one to hold early labels.
        ``sources`` names each label's message (``partition:offset``); it goes into the
        hold, so a retried call tells its own hold from a second label for the event.
        """
        if not labels:
            return []
        now = time.time() if now is None else now
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        for lab in labels:
            pipe.get(k.served(lab.event_id))
            pipe.get(k.learned(lab.event_id))
            pipe.zscore(k.expired, lab.event_id)
        raw = pipe.execute()
        results: list[JoinResult] = []
        seen: set[str] = set()
        early: list[tuple[int, Label]] = []
        label_index: dict[int, int] = {}  # position in results -> index in labels
        for i, lab in enumerate(labels):
            served_raw, marker, expired = raw[3 * i], raw[3 * i + 1], raw[3 * i + 2]
            eid = lab.event_id
            if eid in seen or self.lineage.contains(marker):
                results.append(JoinResult("duplicate", eid, detail="label already learned"))
                continue
            if served_raw is not None:
                seen.add(eid)
                served = prediction_from_dict(orjson.loads(served_raw))
                results.append(JoinResult("hit", eid, self._example(lab, served)))
                continue
            if expired is not None:
                results.append(JoinResult("expired", eid, detail="label came after the horizon; not learned"))
                continue
            seen.add(eid)
            early.append((len(results), lab))
            label_index[len(results)] = i
            results.append(JoinResult("early", eid, detail="event not served yet; label held"))
        if early:
            pipe = self.client.pipeline(transaction=False)
            deadline = now + self.spec.labels.horizon
            bodies: list[bytes | None] = []  # None: no source, a failed SET NX is a duplicate
            for pos, lab in early:
                src = sources[label_index[pos]] if sources is not None else ""
                body = orjson.dumps({"event_id": lab.event_id, "label": lab.label, "ts": lab.ts, "src": src})
                bodies.append(body if src else None)
                pipe.set(k.early(lab.event_id), body, px=self.px, nx=True)
                pipe.get(k.early(lab.event_id))
                pipe.zadd(k.early_index, {lab.event_id: deadline}, nx=True)
            pipe.zremrangebyscore(k.early_index, "-inf", now - self.spec.labels.horizon)
            pipe.pexpire(k.early_index, 2 * self.px)
            held = pipe.execute()
            for j, (pos, lab) in enumerate(early):
                # Not set, and what is held is another body: a second label for the event.
                # The same body (same source message) is this label's own hold, from an
                # earlier try of this call that timed out but was applied.
                if not held[3 * j] and (bodies[j] is None or held[3 * j + 1] != bodies[j]):
                    results[pos] = JoinResult(
                        "duplicate", lab.event_id, detail="a label for this event is already held"
                    )
        return results

    def mark_learned(self, learned: Iterable[tuple[str, int]]) -> None:
        """Write the learned markers ``(event_id, seq)`` and stop waiting for those events."""
        items = list(learned)
        if not items:
            return
        pipe = self.client.pipeline(transaction=False)
        for eid, seq in items:
            pipe.set(self.keys.learned(eid), self.lineage.marker(seq), px=self.px)
        pipe.zrem(self.keys.pending, *[eid for eid, _ in items])
        pipe.execute()

    def sweep(self, now: float | None = None) -> tuple[int, list[JoinResult]]:
        """Count expiries and resolve held labels (a chunk of them per call, round robin).

        Returns ``(expiries, results)``: results are ``resolved`` (learn them, then
        :meth:`mark_learned`) or ``unknown`` (the held label's event never came).
        Held labels already in the model are dropped; ones learned by a lost model
        state (see :class:`Lineage`) are resolved again.
        """
        now = time.time() if now is None else now
        k = self.keys
        c = self.client
        expired_ids = [e.decode() for e in c.zrangebyscore(k.pending, "-inf", now, start=0, num=SWEEP_LIMIT)]
        pipe = c.pipeline(transaction=False)
        if expired_ids:
            pipe.zrem(k.pending, *expired_ids)
            pipe.zadd(k.expired, {e: now + self.spec.labels.horizon for e in expired_ids})
            pipe.pexpire(k.expired, 2 * self.px)
        pipe.zremrangebyscore(k.expired, "-inf", now)
        start = self._held_cursor
        pipe.zrange(k.early_index, start, start + SWEEP_HELD_CHUNK - 1, withscores=True)
        held = pipe.execute()[-1]
        results: list[JoinResult] = []
        if not held:
            self._held_cursor = 0
            return len(expired_ids), results
        ids = [e.decode() for e, _ in held]
        pipe = c.pipeline(transaction=False)
        for eid in ids:
            pipe.get(k.early(eid))
            pipe.get(k.served(eid))
            pipe.get(k.learned(eid))
        raw = pipe.execute()
        done: list[str] = []
        for i, (eid, (_, deadline)) in enumerate(zip(ids, held, strict=True)):
            body, served_raw, marker = raw[3 * i], raw[3 * i + 1], raw[3 * i + 2]
            if body is None:  # its hold expired
                done.append(eid)
                if marker is None:
                    results.append(JoinResult("unknown", eid, detail="event never served"))
                continue
            if self.lineage.contains(marker):
                if self._in_snapshot(marker):
                    done.append(eid)
                continue
            if served_raw is not None:
                lab = orjson.loads(body)
                label = Label(event_id=eid, label=lab["label"], ts=float(lab["ts"]))
                served = prediction_from_dict(orjson.loads(served_raw))
                results.append(JoinResult("resolved", eid, self._example(label, served)))
                continue
            if deadline <= now:
                done.append(eid)
                results.append(JoinResult("unknown", eid, detail="event not served within the horizon"))
        if done:
            pipe = c.pipeline(transaction=False)
            pipe.zrem(k.early_index, *done)
            pipe.delete(*[k.early(e) for e in done])
            pipe.execute()
        # Ids not done keep their ranks (resolved ones leave once they are in a snapshot).
        kept = len(held) - len(done)
        self._held_cursor = start + kept if len(held) == SWEEP_HELD_CHUNK else 0
        return len(expired_ids), results

    #: seq of the newest published snapshot of this run (set by the learner)
    published_seq: int = -1

    def _in_snapshot(self, marker: bytes) -> bool:
        run, _, seq = marker.decode().partition(":")
        if run != self.lineage.run_id:
            return True  # an ancestor's marker the lineage contains is in the snapshot
        return int(seq) <= self.published_seq


def dead_letter(
    reason: str,
    detail: str,
    topic: str,
    partition: int | None,
    offset: int | None,
    value: bytes | None,
    key: bytes | None = None,
) -> bytes:
    """A dead-letter record (the contract of :func:`streams.contracts.encode_dead_letter`)."""
    from streams.contracts import encode_dead_letter

    return encode_dead_letter(DeadLetter(reason, detail, topic, partition, offset, value, key, time.time()))
