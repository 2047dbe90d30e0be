"""Label-free performance estimation: confidence-based (CBPE), for binary classifiers.

Labels come late, sometimes hours after the prediction. Until then the realised accuracy
of what is being served now is unknown, yet the served probabilities say a lot about it:
if the model is calibrated, an event served with P(True) = 0.8 is right with probability
0.8 when predicted True. Summed over a window of served predictions this gives the
*expected* confusion matrix, and from it an expected accuracy, F1 and ROC AUC. This is
NannyML's CBPE (confidence-based performance estimation); see
https://nannyml.readthedocs.io/en/stable/how_it_works/performance_estimation.html.

The served probabilities are first calibrated on the labelled history, because online
models are rarely calibrated: :class:`BinnedCalibrator` keeps, per probability bin, how
many labelled predictions fell in it and how many were True (O(1) per label, bounded
memory, an exponential decay so it follows the model as it learns). The calibrated
probability of a bin is its observed rate of True, with a prior that pulls sparse bins
to the raw probability.

The estimate is sound when calibration holds on the unlabelled window: a shift of the
concept itself (P(y|x) changes while P(x) does not) is invisible to it, which is why the
realised metric, once the labels come, is compared with the estimate
(:class:`EstimateTracker`): its error is published as a metric of its own.

Everything here is pure: no Kafka, Redis or clock.

>>> cal = BinnedCalibrator(bins=10)
>>> for p, y in [(0.9, True)] * 8 + [(0.9, False)] * 2:
...     cal.learn(p, y)
>>> round(cal.calibrate(0.9), 2)  # (8 True + 2 x 0.9 prior) / (10 + 2)
0.82
>>> est = estimate([0.9, 0.9, 0.1, 0.2])
>>> round(est["accuracy"], 3)
0.875
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The metrics :func:`estimate` gives.
ESTIMATED_METRICS = ("accuracy", "f1", "roc_auc")


class BinnedCalibrator:
    """Maps a raw P(True) to the rate of True observed among labelled predictions like it.

    Args:
        bins: equal-width probability bins over [0, 1].
        half_life: labels after which an observation weighs half (exponential decay, so
            the calibration follows a model that keeps learning); None keeps all.
        prior: weight of the raw probability in each bin (pseudo-observations): a bin
            with few labels stays close to the identity.
    """

    def __init__(self, bins: int = 20, half_life: float | None = 5000.0, prior: float = 2.0) -> None:
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        self.bins = bins
        self.prior = prior
        self._decay = 0.5 ** (1.0 / half_life) if half_life else 1.0
        self._scale = 1.0  # lazy decay: weights are stored divided by the running scale
        self._n = [0.0] * bins
        self._pos = [0.0] * bins
        self.labels = 0

    def _bin(self, p: float) -> int:
        return min(self.bins - 1, max(0, int(p * self.bins)))

    def learn(self, p_true: float, y: bool) -> None:
        """One labelled prediction: its served P(True) and its label."""
        if not math.isfinite(p_true):
            return
        self.labels += 1
        if self._decay < 1.0:
            self._scale /= self._decay
            if self._scale > 1e100:  # renormalise before the stored weights overflow
                self._n = [n / self._scale for n in self._n]
                self._pos = [n / self._scale for n in self._pos]
                self._scale = 1.0
        b = self._bin(p_true)
        self._n[b] += self._scale
        if y:
            self._pos[b] += self._scale

    def calibrate(self, p_true: float) -> float:
        """The calibrated P(True) of a served probability."""
        p = min(1.0, max(0.0, p_true))
        b = self._bin(p)
        n = self._n[b] / self._scale
        pos = self._pos[b] / self._scale
        return (pos + self.prior * p) / (n + self.prior)


def estimate(calibrated: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """Expected accuracy, F1 and ROC AUC of a window of calibrated P(True).

    Each event is predicted True when its probability is at least ``threshold`` and is
    right with its calibrated probability of that class: the expected confusion matrix
    is the sum of those probabilities. ROC AUC is the area under the expected ROC curve
    (expected true and false positive rates at every threshold, as CBPE does). A metric
    that is undefined on the window (no expected positive) is NaN.
    """
    tp = fp = fn = tn = 0.0
    for p in calibrated:
        if p >= threshold:
            tp += p
            fp += 1.0 - p
        else:
            fn += p
            tn += 1.0 - p
    n = tp + fp + fn + tn
    out = {"accuracy": (tp + tn) / n if n else math.nan}
    out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else math.nan
    out["roc_auc"] = _expected_auc(calibrated)
    return out


def _expected_auc(calibrated: Sequence[float]) -> float:
    pos = sum(calibrated)
    neg = len(calibrated) - pos
    if pos <= 0 or neg <= 0:
        return math.nan
    area = tpr0 = fpr0 = 0.0
    tp = fp = 0.0
    ordered = sorted(calibrated, reverse=True)
    i = 0
    while i < len(ordered):  # ties move together: one point of the curve per distinct score
        j = i
        while j < len(ordered) and ordered[j] == ordered[i]:
            tp += ordered[j]
            fp += 1.0 - ordered[j]
            j += 1
        tpr, fpr = tp / pos, fp / neg
        area += (fpr - fpr0) * (tpr + tpr0) / 2
        tpr0, fpr0 = tpr, fpr
        i = j
    return area


@dataclass
class EstimateTracker:
    """Estimates per model version from served probabilities, and their error once labelled.

    Feed it every served binary prediction (:meth:`served`) and every joined label
    (:meth:`labelled`, with the probability that was served for it). :meth:`estimates`
    gives, per model version, the metrics expected on its last ``window`` served events;
    :meth:`errors` the estimate's error on labelled windows: for each version, the
    estimate made from the served probabilities of its last ``window`` *labelled* events
    minus their realised accuracy, so a calibration that stopped holding shows as a
    growing error.
    """

    window: int = 1000
    calibrator: BinnedCalibrator = field(default_factory=BinnedCalibrator)
    threshold: float = 0.5
    max_versions: int = 5
    #: per version: its last ``window`` served P(True)
    _served: dict[str, deque[float]] = field(default_factory=dict)
    #: per version: (expected chance of being right, was right), last ``window`` labels
    _labelled: dict[str, deque[tuple[float, bool]]] = field(default_factory=dict)

    def _window(self, table: dict[str, deque[Any]], version: str) -> deque[Any]:
        """A version's window in ``table``, made on first use; the oldest version seen is
        dropped beyond ``max_versions``."""
        q = table.get(version)
        if q is None:
            if len(table) >= self.max_versions:
                del table[next(iter(table))]
            q = table[version] = deque(maxlen=self.window)
        return q

    def served(self, version: str, p_true: float) -> None:
        if math.isfinite(p_true):
            self._window(self._served, version).append(p_true)

    def labelled(self, version: str, p_true: float, y: bool) -> None:
        if not math.isfinite(p_true):
            return
        q = self._window(self._labelled, version)
        c = self.calibrator.calibrate(p_true)  # before this label: prequential
        predicted = p_true >= self.threshold
        q.append((c if predicted else 1.0 - c, predicted == y))
        self.calibrator.learn(p_true, y)

    def window_of(self, version: str) -> Sequence[float]:
        """The served P(True) behind a version's estimate (empty if none)."""
        return self._served.get(version, ())

    def _estimate(self, raw: Iterable[float]) -> dict[str, float]:
        return estimate([self.calibrator.calibrate(p) for p in raw], self.threshold)

    def estimates(self) -> dict[str, dict[str, float]]:
        """``{version: {metric: expected value}}`` over each version's last served window."""
        return {v: self._estimate(q) for v, q in self._served.items() if q}

    def errors(self) -> dict[str, float]:
        """``{version: estimated accuracy - realised accuracy}`` on its last labelled window."""
        return {v: sum(e - r for e, r in q) / len(q) for v, q in self._labelled.items() if q}


__all__ = ["ESTIMATED_METRICS", "BinnedCalibrator", "EstimateTracker", "estimate"]
