"""Replay a labelled stream through the live code path, labels arriving late.

Each row ``(x, y)`` becomes an event at ``start + i * step`` and its label ``delay``
seconds later. Events and labels are interleaved by time exactly like
``river.stream.simulate_qa`` (a label due at the same time as an event comes first).
Every event is scored with the learner's live model (single-process mode) and recorded
with :class:`~models.join.ServedStore` in Redis; every label is a JSON label message
handled by :meth:`LearnerCore.process` (parse, join with the served record, prequential
evaluation of the served prediction, learning). So the accuracy of a replay is the
accuracy the live system would have had, and it can be checked against
``river.evaluate.progressive_val_score(..., delay=...)``.

Consecutive events are served in one Redis pipeline and consecutive labels are processed
as one batch: no learning happens inside a run of events, so this changes nothing.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from models.evaluation import OnlineEvaluator
from models.factory import build_model, model_input, predict
from models.join import ServedStore
from models.learner import LabelMessage, LearnerCore
from weir.contracts import encode_label
from weir.spec import PipelineSpec
from weir.types import Prediction


@dataclass
class ReplayResult:
    core: LearnerCore
    events: int
    labels: int

    @property
    def evaluator(self) -> OnlineEvaluator:
        return self.core.evaluator


def _json_label(y: Any) -> Any:
    # numpy / River scalars -> plain JSON values
    if hasattr(y, "item"):
        y = y.item()
    return y


def replay(
    rows: Iterable[tuple[dict[str, Any], Any]],
    spec: PipelineSpec,
    client: Any,
    *,
    delay: float,
    step: float = 1.0,
    start: float | None = None,
    core: LearnerCore | None = None,
) -> ReplayResult:
    """Run ``rows`` through serve -> label join -> learn with a fixed label ``delay`` (s).

    Args:
        rows: ``(features, label)`` pairs in event order (a River dataset works).
        spec: pipeline spec; its features are whatever keys the rows carry.
        client: Redis client (keys under ``spec.redis_prefix``).
        delay: seconds between an event and its label.
        step: seconds between consecutive events.
        start: event time of the first row (default: ``now - len`` so nothing is in the future).
        core: the learner to use; default a fresh one on ``build_model(spec.model)``.
    """
    rows = list(rows)
    if start is None:
        start = time.time() - len(rows) * step - delay - 60
    if core is None:
        core = LearnerCore(spec, build_model(spec.model), None, client, version_id="v1")
    served = ServedStore(spec)
    due: list[tuple[float, int, bytes]] = []  # (label time, i, label message)
    events = labels = 0
    offset = 0
    pending_events: list[Prediction] = []
    pending_labels: list[LabelMessage] = []
    last_label_ts = start

    def flush_events(now: float) -> None:
        if pending_events:
            served.write(client, pending_events, now=now)
            pending_events.clear()

    def flush_labels() -> None:
        if pending_labels:
            core.process(pending_labels, now=last_label_ts)
            pending_labels.clear()

    for i, (x, y) in enumerate(rows):
        ts = start + i * step
        while due and due[0][0] <= ts:
            flush_events(ts)
            label_ts, _, body = heapq.heappop(due)
            pending_labels.append(LabelMessage(value=body, partition=0, offset=offset))
            last_label_ts = label_ts
            offset += 1
            labels += 1
        flush_labels()
        features = dict(x)
        pred, proba = predict(core.model, model_input(features), spec.task)
        pending_events.append(
            Prediction(
                event_id=f"r{i}",
                entity_id=f"r{i}",
                ts=ts,
                model=spec.model.name,
                model_version=core.version_id,
                prediction=pred,
                proba=proba,
                features=features,
                scored_at=ts,
            )
        )
        events += 1
        body = encode_label(f"r{i}", _json_label(y), ts + delay)
        heapq.heappush(due, (ts + delay, i, body))
    flush_events(start + len(rows) * step)
    while due:
        label_ts, _, body = heapq.heappop(due)
        pending_labels.append(LabelMessage(value=body, partition=0, offset=offset))
        last_label_ts = label_ts
        offset += 1
        labels += 1
    flush_labels()
    return ReplayResult(core=core, events=events, labels=labels)
