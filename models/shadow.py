"""The promotion gate and the rollback guard: two models scored on the same labels.

Both are pure: they are fed ``(label, prediction of A, prediction of B)`` per joined
example and decide once they have seen enough labels.

* :class:`ShadowGate`: a challenger runs in shadow beside the champion, both scored
  prequentially (test, then train) on the same labels; after ``labels_needed``
  scored labels it says promote or reject.
* :class:`RollbackGuard`: after a promotion the new champion is compared with its
  predecessor over ``labels`` labels; it says rollback or keep.

Metric: the task's primary one, accuracy (higher is better) for classification and
MAE (lower is better) for regression. A margin is in accuracy points for
classification and a fraction of the other side's MAE for regression, so it does not
depend on the target's scale. Labels either side could not score (no prediction) are
not counted.
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from models.drift import same_label
from models.evaluation import PRIMARY_METRIC
from weir.contracts import DriftRecord

if TYPE_CHECKING:
    from weir.spec import Task


class Score:
    """A running accuracy (classification) or MAE (regression) over scored labels.

    Examples:
        >>> s = Score("binary")
        >>> for y, p in [(True, True), (False, True), ("1", True), ("0", False)]:
        ...     s.update(y, p)
        >>> s.n, s.value
        (4, 0.75)
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.n = 0
        self._sum = 0.0

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.task]

    def update(self, y_true: Any, y_pred: Any) -> None:
        if y_pred is None:
            return
        if self.task == "regression":
            self._sum += abs(float(y_true) - float(y_pred))
        else:
            self._sum += 1.0 if same_label(y_true, y_pred) else 0.0
        self.n += 1

    @property
    def value(self) -> float:
        return self._sum / self.n if self.n else math.nan


def improvement(task: Task, candidate: float, incumbent: float) -> float:
    """How much better ``candidate`` is than ``incumbent`` (negative: worse).

    Accuracy points for classification; relative MAE reduction for regression.

    Examples:
        >>> round(improvement("binary", 0.85, 0.80), 4)
        0.05
        >>> improvement("regression", 8.0, 10.0)
        0.2
    """
    if task == "regression":
        if incumbent == 0:
            return 0.0 if candidate == 0 else -math.inf
        return (incumbent - candidate) / incumbent
    return candidate - incumbent


def metric_improvement(metric: str, candidate: float, incumbent: float) -> float:
    """:func:`improvement` of two values of a task's primary metric (:data:`PRIMARY_METRIC`).

    Examples:
        >>> round(metric_improvement("accuracy", 0.85, 0.80), 4), metric_improvement("mae", 8.0, 10.0)
        (0.05, 0.2)
    """
    task: Task = "regression" if metric == PRIMARY_METRIC["regression"] else "binary"
    return improvement(task, candidate, incumbent)


@dataclass(slots=True)
class Verdict:
    """A gate's decision and why, with both sides' metric."""

    decision: Literal["promote", "reject", "rollback", "keep"]
    reason: str
    metric: str
    candidate: float
    incumbent: float
    labels: int

    def record(
        self,
        pipeline: str,
        model_version: str | None,
        name: str,
        now: float | None = None,
        **detail: Any,
    ) -> DriftRecord:
        """The verdict as a ``decision`` DriftRecord (value = improvement of the candidate)."""
        return DriftRecord(
            time=_time.time() if now is None else now,
            pipeline=pipeline,
            model_version=model_version,
            kind="decision",
            name=name,
            statistic=self.decision,
            value=metric_improvement(self.metric, self.candidate, self.incumbent),
            threshold=float(detail.pop("margin", 0.0)),
            drifted=self.decision in ("promote", "rollback"),
            detail={
                "reason": self.reason,
                "metric": self.metric,
                "candidate": self.candidate,
                "incumbent": self.incumbent,
                "labels": self.labels,
                **detail,
            },
        )


class ShadowGate:
    """Promote a challenger only if it beats the champion on the same labels.

    Args:
        task: the spec's task.
        labels_needed: labels both sides must have scored (``retrain.shadow_labels``).
        margin: how much better the challenger must be (``retrain.promote_margin``);
            with 0 it must be strictly better.

    Examples:
        >>> gate = ShadowGate("binary", labels_needed=4, margin=0.0)
        >>> for y in [True, False, True, True]:
        ...     v = gate.update(y, champion=not y, challenger=y)
        >>> v.decision, v.candidate, v.incumbent
        ('promote', 1.0, 0.0)
    """

    def __init__(self, task: Task, labels_needed: int = 500, margin: float = 0.0) -> None:
        if labels_needed < 1:
            raise ValueError(f"labels_needed must be >= 1, got {labels_needed!r}")
        self.task = task
        self.labels_needed = labels_needed
        self.margin = margin
        self.champion = Score(task)
        self.challenger = Score(task)
        self.verdict: Verdict | None = None

    @property
    def labels(self) -> int:
        return min(self.champion.n, self.challenger.n)

    def update(self, y_true: Any, champion: Any, challenger: Any) -> Verdict | None:
        """Score one label on both sides; the verdict once ``labels_needed`` are in."""
        if self.verdict is not None:
            return self.verdict
        if champion is None or challenger is None:
            return None  # only labels both sides scored count: the same labels
        self.champion.update(y_true, champion)
        self.challenger.update(y_true, challenger)
        if self.labels >= self.labels_needed:
            self.verdict = self._decide()
        return self.verdict

    def _decide(self) -> Verdict:
        ch, cp = self.challenger.value, self.champion.value
        gain = improvement(self.task, ch, cp)
        metric = self.challenger.metric
        both = f"{metric} challenger {ch:.4f} vs champion {cp:.4f} over {self.labels} labels"
        if gain > 0 and gain >= self.margin:
            return Verdict(
                "promote",
                f"{both}: better by {gain:.4f} >= margin {self.margin}",
                metric,
                ch,
                cp,
                self.labels,
            )
        why = "not better" if gain <= 0 else f"better by only {gain:.4f} < margin {self.margin}"
        return Verdict("reject", f"{both}: {why}", metric, ch, cp, self.labels)


class RollbackGuard:
    """Roll a promoted champion back when it does worse than its predecessor.

    The predecessor keeps scoring in shadow (``update(y, champion=..., predecessor=...)``);
    or, when it cannot, pass ``baseline``: its last known metric (e.g. the champion's
    score in the shadow gate that promoted the new one) and feed ``predecessor=None``.

    Args:
        task: the spec's task.
        labels: labels the new champion must have scored (``retrain.rollback_labels``).
        margin: how much worse than the predecessor it may be (``retrain.rollback_margin``).
        baseline: the predecessor's metric when it does not score beside it.

    Examples:
        >>> guard = RollbackGuard("binary", labels=3, margin=0.1)
        >>> for y in [True, True, False]:
        ...     v = guard.update(y, champion=not y, predecessor=y)
        >>> v.decision
        'rollback'
    """

    def __init__(
        self, task: Task, labels: int = 1000, margin: float = 0.05, baseline: float | None = None
    ) -> None:
        if labels < 1:
            raise ValueError(f"labels must be >= 1, got {labels!r}")
        self.task = task
        self.labels = labels
        self.margin = margin
        self.baseline = baseline
        self.champion = Score(task)
        self.predecessor = Score(task)
        self.verdict: Verdict | None = None

    def update(self, y_true: Any, champion: Any, predecessor: Any = None) -> Verdict | None:
        if self.verdict is not None:
            return self.verdict
        if champion is None:
            return None
        if predecessor is None and self.baseline is None:
            return None
        self.champion.update(y_true, champion)
        if predecessor is not None:
            self.predecessor.update(y_true, predecessor)
        if self.champion.n >= self.labels:
            self.verdict = self._decide()
        return self.verdict

    def _decide(self) -> Verdict:
        new = self.champion.value
        old = self.predecessor.value if self.predecessor.n else float(self.baseline or math.nan)
        src = "in shadow" if self.predecessor.n else "last known"
        gain = improvement(self.task, new, old)
        metric = self.champion.metric
        both = f"{metric} champion {new:.4f} vs predecessor {old:.4f} ({src}) over {self.champion.n} labels"
        if gain < -self.margin:
            return Verdict(
                "rollback",
                f"{both}: worse by {-gain:.4f} > margin {self.margin}",
                metric,
                new,
                old,
                self.champion.n,
            )
        return Verdict("keep", f"{both}: within margin {self.margin}", metric, new, old, self.champion.n)


class PendingPredictions:
    """The challenger's serve-time predictions, kept until their event's label arrives.

    The fair shadow: the champion's side of the comparison is the prediction it served;
    the challenger's is made on the same served features when the prediction record
    arrives (serve time), not one label delay later when the label does, when it has
    learned from labels the champion had not seen. Bounded two ways:

    * by count: once ``max_items`` wait, a new prediction is refused (counted in
      ``refused``) rather than an old one evicted, so the oldest, whose labels come
      first, still pair; the gate then scores a sample of the events, not a biased one;
    * by the label horizon: a prediction whose event ``ts`` is more than ``horizon``
      seconds behind the newest one kept will get no label the learner joins: dropped
      (counted in ``expired``).

    Picklable (the monitor checkpoints it).

    Examples:
        >>> p = PendingPredictions(max_items=2, horizon=10.0)
        >>> p.add("a", 100.0, True), p.add("b", 101.0, False), p.add("c", 102.0, True)
        (True, True, False)
        >>> p.pop("a"), p.pop("a"), len(p), p.refused
        ((True, True), (False, None), 1, 1)
        >>> p.add("d", 115.0, True), sorted(p.items), p.expired
        (True, ['d'], 1)
    """

    def __init__(self, max_items: int = 100_000, horizon: float = 3600.0) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items!r}")
        self.max_items = max_items
        self.horizon = horizon
        #: event_id -> (event ts, challenger prediction), in arrival order.
        self.items: dict[str, tuple[float, Any]] = {}
        self.newest_ts = -math.inf
        self.added = 0
        self.refused = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, event_id: str, ts: float, prediction: Any) -> bool:
        """Keep a serve-time prediction; False if refused (full) or already kept."""
        if event_id in self.items:
            return False  # a redelivered prediction record: the first one stands
        if math.isfinite(ts) and ts > self.newest_ts:
            self.newest_ts = ts
            self._expire()
        if len(self.items) >= self.max_items:
            self.refused += 1
            return False
        self.items[event_id] = (ts, prediction)
        self.added += 1
        return True

    def pop(self, event_id: str) -> tuple[bool, Any]:
        """(found, the challenger's serve-time prediction) for an event, forgotten then."""
        got = self.items.pop(event_id, None)
        return (False, None) if got is None else (True, got[1])

    def _expire(self) -> None:
        cut = self.newest_ts - self.horizon
        # Arrival order is close to event-time order: expire from the front.
        while self.items:
            eid, (ts, _) = next(iter(self.items.items()))
            if ts >= cut:
                break
            del self.items[eid]
            self.expired += 1
