"""Prequential (test-then-train) evaluation of what was actually served.

The learner calls :meth:`OnlineEvaluator.update` with the label and the prediction that was
*served* for the event (from the served record), before learning from it. So the numbers are
those of the model versions the scorers really used, labels arriving late included.

Metrics per task (River): binary Accuracy, F1, LogLoss, ROCAUC; multiclass Accuracy,
MacroF1, CrossEntropy (the multiclass log loss); regression MAE, RMSE. Each is kept
overall (``all``) and over the last ``rolling_window`` labels (``rolling``), per model
version (a snapshot id ``v3.17`` counts for version ``v3``) and across versions (``*``).

An untrained classifier serves no prediction (``None``): like
``river.evaluate.progressive_val_score`` such labels are not scored.

Examples:
    >>> ev = OnlineEvaluator("binary", rolling_window=2)
    >>> ev.update(True, True, {"False": 0.2, "True": 0.8}, model_version="v1.3")
    True
    >>> _ = ev.update(False, True, {"False": 0.4, "True": 0.6}, model_version="v1.4")
    >>> _ = ev.update(False, False, {"False": 0.9, "True": 0.1}, model_version="v1.4")
    >>> round(ev.snapshot()["v1"]["all"]["accuracy"], 4)
    0.6667
    >>> ev.snapshot()["v1"]["rolling"]["accuracy"]
    0.5
"""

from __future__ import annotations

import contextlib
import math
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any

from weir.types import LabelValue, version_of

if TYPE_CHECKING:
    from weir.metrics import LearnerMetrics
    from weir.spec import Task

ALL_VERSIONS = "*"

# name -> (River metric class name, needs proba)
_METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "binary": [
        ("accuracy", "Accuracy", False),
        ("f1", "F1", False),
        ("log_loss", "LogLoss", True),
        ("roc_auc", "ROCAUC", True),
    ],
    "multiclass": [
        ("accuracy", "Accuracy", False),
        ("macro_f1", "MacroF1", False),
        ("log_loss", "CrossEntropy", True),
    ],
    "regression": [("mae", "MAE", False), ("rmse", "RMSE", False)],
}

#: The headline metric of each task: what the shadow gate, the rollback guard and a
#: retrain's holdout compare (:class:`models.shadow.Score`).
PRIMARY_METRIC: dict[str, str] = {"binary": "accuracy", "multiclass": "accuracy", "regression": "mae"}


class BinnedROCAUC:
    """River's ``metrics.ROCAUC`` (10 thresholds) in O(log thresholds) per update.

    River updates one confusion matrix per threshold on every label (the evaluator's
    hottest spot). Here a label adds its weight to one bin: the number of thresholds its
    probability is above; each threshold's counts are sums over bins, computed by
    :meth:`get` only. The counts, and so the value, are River's (same thresholds, same
    ``get`` formula); the tests compare them to 1e-12, rolling windows included.
    """

    def __init__(self, n_thresholds: int = 10, pos_val: Any = True) -> None:
        self.n_thresholds = n_thresholds
        self.pos_val = pos_val
        self.thresholds = [i / (n_thresholds - 1) for i in range(n_thresholds)]
        self.thresholds[0] -= 1e-7
        self.thresholds[-1] += 1e-7
        # bin k: probability above exactly the k lowest thresholds (0..n_thresholds)
        self.pos = [0.0] * (n_thresholds + 1)
        self.neg = [0.0] * (n_thresholds + 1)

    def update(self, y_true: Any, p_true: float, w: float = 1.0) -> None:
        (self.pos if y_true == self.pos_val else self.neg)[bisect_left(self.thresholds, p_true)] += w

    def revert(self, y_true: Any, p_true: float, w: float = 1.0) -> None:
        (self.pos if y_true == self.pos_val else self.neg)[bisect_left(self.thresholds, p_true)] -= w

    def get(self) -> float:
        from scipy import integrate

        n = self.n_thresholds
        tprs: list[float] = [0.0] * n
        fprs: list[float] = [0.0] * n
        for i in range(n):
            # threshold i calls positive the bins above i
            tp, fn = sum(self.pos[i + 1 :]), sum(self.pos[: i + 1])
            fp, tn = sum(self.neg[i + 1 :]), sum(self.neg[: i + 1])
            tprs[i] = tp / (tp + fn) if tp + fn else 0.0
            fprs[i] = fp / (fp + tn) if fp + tn else 0.0
        return float(-integrate.trapezoid(x=fprs, y=tprs))


class _Set:
    """The multiclass or regression metrics of one model version, overall and rolling
    (River's metrics; binary ones are :class:`_BinarySet`)."""

    def __init__(self, task: Task, rolling_window: int) -> None:
        from river import metrics, utils

        self.n = 0
        self.all: dict[str, Any] = {}
        self.rolling: dict[str, Any] = {}
        self.needs_proba: dict[str, bool] = {}
        for name, cls_name, needs_proba in _METRICS[task]:
            cls = getattr(metrics, cls_name)
            self.all[name] = cls()
            self.rolling[name] = utils.Rolling(cls, window_size=rolling_window)
            self.needs_proba[name] = needs_proba

    def update(self, y_true: Any, y_pred: Any, proba: Any) -> None:
        self.n += 1
        for name, metric in self.all.items():
            if self.needs_proba[name]:
                if proba is None:
                    continue
                metric.update(y_true, proba)
                self.rolling[name].update(y_true, proba)
            else:
                metric.update(y_true, y_pred)
                self.rolling[name].update(y_true, y_pred)

    def values(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "all": {k: float(m.get()) for k, m in self.all.items()},
            "rolling": {k: float(m.get()) for k, m in self.rolling.items()},
        }


class _Counts:
    """The binary metrics' state over a set of labels (River's formulas, shared counts)."""

    __slots__ = ("correct", "fn", "fp", "ll_mean", "ll_n", "roc", "total", "tp")

    def __init__(self) -> None:
        self.total = self.correct = self.tp = self.fp = self.fn = 0.0
        self.ll_n = self.ll_mean = 0.0  # river.stats.Mean of the log losses
        self.roc = BinnedROCAUC()

    def add(self, y_true: Any, y_pred: Any, w: float) -> None:
        """Accuracy and F1 (``w`` = -1.0 reverts, as River's ``revert``)."""
        self.total += w
        if y_true == y_pred:
            self.correct += w
        t, p = y_true == True, y_pred == True  # noqa: E712 - River's pos_val comparison
        if t and p:
            self.tp += w
        elif p:
            self.fp += w
        elif t:
            self.fn += w

    def add_proba(self, y_true: Any, p_true: float) -> None:
        loss = _log_loss(y_true, p_true)
        self.ll_n += 1.0
        self.ll_mean += (1.0 / self.ll_n) * (loss - self.ll_mean)
        self.roc.update(y_true, p_true)

    def revert_proba(self, y_true: Any, p_true: float) -> None:
        loss = _log_loss(y_true, p_true)
        self.ll_n -= 1.0
        if self.ll_n == 0:
            self.ll_mean = 0.0
        else:
            self.ll_mean -= (1.0 / self.ll_n) * (loss - self.ll_mean)
        self.roc.revert(y_true, p_true)

    def values(self) -> dict[str, float]:
        tp, fp, fn = self.tp, self.fp, self.fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        try:
            f1 = 2 * precision * recall / (1 * precision + recall)
        except ZeroDivisionError:
            f1 = 0.0
        return {
            "accuracy": self.correct / self.total if self.total else 0.0,
            "f1": f1,
            "log_loss": self.ll_mean,
            "roc_auc": self.roc.get(),
        }


def _log_loss(y_true: Any, p_true: float) -> float:
    """River's ``LogLoss._eval``: the probability clamped to [1e-15, 1 - 1e-15]."""
    p = max(1e-15, min(1 - 1e-15, p_true))
    return -math.log(p) if y_true else -math.log(1 - p)


class _BinarySet:
    """The binary metrics of one model version, overall and rolling, in O(1) per label.

    The values are River's (``Accuracy``, ``F1``, ``LogLoss``, ``ROCAUC`` and their
    ``utils.Rolling`` windows): the same counts and running mean, updated and reverted in
    the same order; a label without proba is out of the proba metrics' window, as with
    River's ``Rolling`` updated only when there is a proba.
    """

    def __init__(self, rolling_window: int) -> None:
        self.n = 0
        self.window = rolling_window
        self.all = _Counts()
        self.rolling = _Counts()
        self._labels: deque[tuple[Any, Any]] = deque()
        self._probas: deque[tuple[Any, float]] = deque()

    def update(self, y_true: Any, y_pred: Any, proba: Any) -> None:
        self.n += 1
        self.all.add(y_true, y_pred, 1.0)
        rolling = self.rolling
        labels = self._labels
        if len(labels) == self.window:
            old_t, old_p = labels.popleft()
            rolling.add(old_t, old_p, -1.0)
        rolling.add(y_true, y_pred, 1.0)
        labels.append((y_true, y_pred))
        if proba is None:
            return
        self.all.add_proba(y_true, proba)
        probas = self._probas
        if len(probas) == self.window:
            rolling.revert_proba(*probas.popleft())
        rolling.add_proba(y_true, proba)
        probas.append((y_true, proba))

    def values(self) -> dict[str, Any]:
        return {"n": self.n, "all": self.all.values(), "rolling": self.rolling.values()}


class OnlineEvaluator:
    """Prequential metrics per model version, overall and rolling.

    Args:
        task: the spec's task.
        rolling_window: labels in the rolling window.
        max_versions: model versions tracked besides ``*``; the oldest first scored is
            forgotten (and its ``weir_online_metric`` series removed) past this, so the
            label sets stay bounded however many retrains a long run sees.
    """

    def __init__(self, task: Task, rolling_window: int = 1000, max_versions: int = 5) -> None:
        if rolling_window < 1:
            raise ValueError(f"rolling_window must be >= 1, got {rolling_window!r}")
        self.task = task
        self.rolling_window = rolling_window
        self.max_versions = max(1, max_versions)
        self._sets: dict[str, _Set | _BinarySet] = {}
        self._forgotten: list[str] = []
        self.unscored = 0

    def _set(self, version: str) -> _Set | _BinarySet:
        s = self._sets.get(version)
        if s is None:
            if self.task == "binary":
                s = self._sets[version] = _BinarySet(self.rolling_window)
            else:
                s = self._sets[version] = _Set(self.task, self.rolling_window)
            versions = [v for v in self._sets if v != ALL_VERSIONS]
            for old in versions[: max(0, len(versions) - self.max_versions)]:
                del self._sets[old]
                self._forgotten.append(old)
        return s

    def _proba_arg(self, proba: dict[str, float] | None) -> Any:
        if proba is None:
            return None
        if self.task == "binary":
            # River's binary probabilistic metrics take P(True) as a float.
            return float(proba.get("True", 0.0))
        return proba

    def update(
        self,
        y_true: LabelValue,
        y_pred: LabelValue | None,
        proba: dict[str, float] | None = None,
        *,
        model_version: str = "",
    ) -> bool:
        """Score one served prediction against its label; False when nothing was served."""
        if y_pred is None:
            self.unscored += 1
            return False
        if self.task == "multiclass":
            y_true, y_pred = str(y_true), str(y_pred)
        elif self.task == "regression":
            y_true, y_pred = float(y_true), float(y_pred)
        p = self._proba_arg(proba)
        self._set(ALL_VERSIONS).update(y_true, y_pred, p)
        if model_version:
            self._set(version_of(model_version)).update(y_true, y_pred, p)
        return True

    def get(self, metric: str, version: str = ALL_VERSIONS, window: str = "all") -> float | None:
        """One metric's value, or None when that version was never scored."""
        s = self._sets.get(version)
        if s is None:
            return None
        return float(s.values()["all" if window == "all" else "rolling"][metric])

    def count(self, version: str = ALL_VERSIONS) -> int:
        s = self._sets.get(version)
        return 0 if s is None else s.n

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{version: {"n": labels scored, "all": {metric: v}, "rolling": {metric: v}}}``."""
        return {v: s.values() for v, s in self._sets.items()}

    def export(self, metrics: LearnerMetrics, pipeline: str, model: str) -> None:
        """Set ``weir_online_metric`` for every version, metric and window (and remove the
        series of forgotten versions)."""
        for version in self._forgotten:
            for window in ("all", "rolling"):
                for name, _, _ in _METRICS[self.task]:
                    with contextlib.suppress(KeyError):  # never exported
                        metrics.online_metric.remove(pipeline, model, version, name, window)
        self._forgotten.clear()
        for version, s in self._sets.items():
            vals = s.values()
            for window in ("all", "rolling"):
                for name, value in vals[window].items():
                    metrics.online_metric.labels(
                        pipeline=pipeline,
                        model=model,
                        model_version=version,
                        metric=name,
                        window=window,
                    ).set(value)
