"""Performance drift: a River detector (ADWIN or Page-Hinkley) on each label's loss
(0/1 error for classification, absolute error for regression)."""

from __future__ import annotations

import math
from typing import Any, Literal

from models.drift.base import DriftError, DriftStatistic, _cat, _num
from weir.contracts import DriftKind, DriftRecord

Detector = Literal["adwin", "page_hinkley"]


def make_detector(detector: Detector, params: dict[str, float] | None = None) -> Any:
    """A fresh River drift detector by the spec's name (imported by name)."""
    params = dict(params or {})
    if detector == "adwin":
        from river.drift import ADWIN

        for k in ("clock", "max_buckets", "min_window_length", "grace_period"):
            if k in params:
                params[k] = int(params[k])  # type: ignore[assignment]
        return ADWIN(**params)
    if detector == "page_hinkley":
        from river.drift import PageHinkley

        if "min_instances" in params:
            params["min_instances"] = int(params["min_instances"])  # type: ignore[assignment]
        # A falling loss is no reason to retrain: watch for increases only.
        kwargs: dict[str, Any] = {"mode": "up", **params}
        return PageHinkley(**kwargs)
    raise DriftError(f"detector must be 'adwin' or 'page_hinkley', got {detector!r}")


def loss(task: str, y_true: Any, y_pred: Any) -> float:
    """A label's loss: 0/1 error for classification, absolute error for regression.

    A missing prediction (an untrained model serves none) is not scored: NaN, which
    :class:`PerformanceDrift` skips, as ``models.evaluation.OnlineEvaluator`` does.

    Examples:
        >>> loss("binary", "1", True), loss("binary", "0", "1"), loss("regression", 2.0, 3.5)
        (0.0, 1.0, 1.5)
    """
    if y_pred is None:
        return math.nan
    if task == "regression":
        p, t = _num(y_pred), _num(y_true)
        return math.nan if p is None or t is None else abs(t - p)
    return 0.0 if same_label(y_true, y_pred) else 1.0


def same_label(a: Any, b: Any) -> bool:
    """Class labels compared by canonical string: True == 1 == "1" == 1.0."""
    return _cat(a) == _cat(b)


class PerformanceDrift(DriftStatistic):
    """Performance drift: a River detector (ADWIN or Page-Hinkley) on each label's loss.

    ``update(loss)`` feeds one loss. A detection latches ``drifted`` until
    :meth:`acknowledge` or :meth:`reset`; no detection counts before
    ``min_samples`` losses since the last reset. ``value()`` is the mean loss of
    the last ``window`` labels (a sliding mean, for the dashboards);
    ``threshold`` is the detector's sensitivity (ADWIN ``delta``, Page-Hinkley
    ``threshold``), reported for the record.
    """

    kind: DriftKind = "performance"

    def __init__(
        self,
        name: str = "loss",
        *,
        detector: Detector = "adwin",
        detector_params: dict[str, float] | None = None,
        min_samples: int = 200,
        window: int = 1000,
    ) -> None:
        self.name = name
        self.detector = detector
        self.detector_params = dict(detector_params or {})
        self.statistic = detector
        self.min_samples = min_samples
        self.window = window
        probe = make_detector(detector, self.detector_params)
        self.threshold = float(probe.delta if detector == "adwin" else probe.threshold)
        self.reset()

    def reset(self) -> None:
        self._det = make_detector(self.detector, self.detector_params)
        self._n = 0
        self._seen = 0
        self._ring: list[float] = []
        self._pos = 0
        self._sum = 0.0
        self._latched = False
        self.detections: list[int] = []
        self.improvements: list[int] = []
        self.last_detection: int | None = None

    def update(self, x: Any) -> bool:  # type: ignore[override]
        """Feed one loss; True when this update is a detection (NaN is skipped)."""
        v = _num(x)
        if v is None:
            return False
        self._n += 1
        self._seen += 1
        if len(self._ring) < self.window:
            self._ring.append(v)
        else:
            self._sum -= self._ring[self._pos]
            self._ring[self._pos] = v
            self._pos = (self._pos + 1) % self.window
        self._sum += v
        before = getattr(self._det, "estimation", None)
        self._det.update(v)
        # ADWIN flags a change either way; a falling loss (a model still warming up, or
        # recovering) is an improvement, counted but not a drift to act on.
        falling = before is not None and self.detector == "adwin" and self._det.estimation <= before
        if self._det.drift_detected and falling:
            self.improvements.append(self._seen)
            return False
        if self._det.drift_detected and self._n >= self.min_samples:
            self._latched = True
            self.last_detection = self._seen
            self.detections.append(self._seen)
            return True
        return False

    def acknowledge(self) -> None:
        """Clear the latched detection; the detector keeps its state."""
        self._latched = False

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def ready(self) -> bool:
        return self._n >= self.min_samples

    def value(self) -> float:
        return self._sum / len(self._ring) if self._ring else math.nan

    @property
    def drifted(self) -> bool:
        return self._latched

    def record(self, pipeline: str, model_version: str | None, now: float | None = None) -> DriftRecord:
        rec = super().record(pipeline, model_version, now)
        rec.value = self.value()
        rec.drifted = self._latched
        return rec

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {"n": self._n, "detections": len(self.detections)}
        if self.last_detection is not None:
            d["last_detection_at"] = self.last_detection
        est = getattr(self._det, "estimation", None)
        if est is not None:
            d["estimation"] = float(est)
        return d
