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
from typing import TYPE_CHECKING, Any

from weir.types import LabelValue

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

#: The headline metric of each task (used by status, shadow comparisons, dashboards).
PRIMARY_METRIC: dict[str, str] = {"binary": "accuracy", "multiclass": "accuracy", "regression": "mae"}


def version_of(model_version: str) -> str:
    """``'v3.17'`` (a snapshot id) -> ``'v3'``; a plain version id is returned as is."""
    return model_version.split(".", 1)[0]


class _Set:
    """The metrics of one model version, overall and rolling."""

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
        self._sets: dict[str, _Set] = {}
        self._forgotten: list[str] = []
        self.unscored = 0

    def _set(self, version: str) -> _Set:
        s = self._sets.get(version)
        if s is None:
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
        return float((s.all if window == "all" else s.rolling)[metric].get())

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
