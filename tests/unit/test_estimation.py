"""CBPE (models/estimation.py) against the realised metrics of the same synthetic streams.

Streams are drawn so the truth is known: each event's true P(y=True) is ``q``; the model
serves ``p = f(q)`` (calibrated when f is the identity, overconfident otherwise). The
realised metrics are River's (accuracy, F1) and the exact Mann-Whitney ROC AUC.
"""

from __future__ import annotations

import math
import random

import pytest
from river import metrics

from models.estimation import BinnedCalibrator, EstimateTracker, estimate


def _stream(n: int, seed: int, lo: float = 0.0, hi: float = 1.0) -> list[tuple[float, bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = rng.uniform(lo, hi)
        out.append((q, rng.random() < q))
    return out


def _overconfident(q: float) -> float:
    """A served probability pushed away from 0.5 (a typical uncalibrated online model)."""
    return 1 / (1 + math.exp(-3 * math.log(q / (1 - q)))) if 0 < q < 1 else q


def _realised(rows: list[tuple[float, bool]]) -> dict[str, float]:
    acc, f1 = metrics.Accuracy(), metrics.F1()
    for p, y in rows:
        acc.update(y, p >= 0.5)
        f1.update(y, p >= 0.5)
    pos = [p for p, y in rows if y]
    neg = [p for p, y in rows if not y]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return {"accuracy": acc.get(), "f1": f1.get(), "roc_auc": wins / (len(pos) * len(neg))}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_calibrated_probabilities_estimate_the_realised_metrics(seed: int) -> None:
    rows = _stream(3000, seed)
    est = estimate([q for q, _ in rows])
    real = _realised(rows)
    for m in ("accuracy", "f1", "roc_auc"):
        assert est[m] == pytest.approx(real[m], abs=0.03), m


def test_calibration_on_labelled_history_corrects_an_overconfident_model() -> None:
    history = _stream(5000, 7)
    cal = BinnedCalibrator(bins=20, half_life=None)
    for q, y in history:
        cal.learn(_overconfident(q), y)
    rows = _stream(3000, 8)
    served = [(_overconfident(q), y) for q, y in rows]
    real = _realised(served)
    raw = estimate([p for p, _ in served])
    calibrated = estimate([cal.calibrate(p) for p, _ in served])
    # Taken at face value the overconfident probabilities promise far more than is realised.
    assert raw["accuracy"] - real["accuracy"] > 0.05
    assert calibrated["accuracy"] == pytest.approx(real["accuracy"], abs=0.03)
    assert calibrated["roc_auc"] == pytest.approx(real["roc_auc"], abs=0.03)


def test_a_shift_to_uncertain_events_shows_in_the_estimate_before_any_label() -> None:
    tracker = EstimateTracker(window=500)
    for q, y in _stream(6000, 11):  # labelled history: confident, right most of the time
        tracker.served("v1", q)
        tracker.labelled("v1", q, y)
    before = tracker.estimates()["v1"]["accuracy"]
    for q, _ in _stream(500, 12, lo=0.4, hi=0.6):  # served, no label yet
        tracker.served("v1", q)
    after = tracker.estimates()["v1"]["accuracy"]
    assert before > 0.7 and after < 0.6
    # The truth on such events: E[max(q, 1 - q)] for q uniform on [0.4, 0.6] is 0.55.
    assert after == pytest.approx(0.55, abs=0.04)


def test_the_estimate_error_grows_when_the_concept_itself_changes() -> None:
    tracker = EstimateTracker(window=500)
    for q, y in _stream(3000, 21):
        tracker.labelled("v1", q, y)
    assert abs(tracker.errors()["v1"]) < 0.05
    for q, y in _stream(500, 22):  # same probabilities served, labels now flipped
        tracker.labelled("v1", q, not y)
    assert tracker.errors()["v1"] > 0.3


def test_versions_are_kept_apart_and_bounded() -> None:
    tracker = EstimateTracker(window=10, max_versions=2)
    tracker.served("v1", 0.9)
    tracker.served("v2", 0.6)
    tracker.served("v3", 0.99)
    assert sorted(tracker.estimates()) == ["v2", "v3"]
    assert tracker.estimates()["v2"]["accuracy"] == pytest.approx(0.6)


def test_undefined_metrics_are_nan_not_an_error() -> None:
    est = estimate([0.0, 0.0])
    assert est["accuracy"] == 1.0
    assert math.isnan(est["f1"]) and math.isnan(est["roc_auc"])
    assert math.isnan(estimate([])["accuracy"])
    tracker = EstimateTracker()
    tracker.served("v1", math.nan)
    assert tracker.estimates() == {}
