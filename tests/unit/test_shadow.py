"""Promotion gate and rollback guard, on River models scored prequentially."""

from __future__ import annotations

import doctest
import itertools
import math
from typing import Any

import pytest

import models.shadow as shadow
from models.shadow import RollbackGuard, ShadowGate, improvement


def test_doctests() -> None:
    result = doctest.testmod(shadow, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def _lr() -> Any:
    from river import linear_model, optim, preprocessing

    return preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.SGD(0.05))


def _stream(fn: int, n: int, seed: int) -> list[tuple[dict[str, Any], bool]]:
    from river.datasets import synth

    return [(x, bool(y)) for x, y in itertools.islice(synth.Agrawal(fn, seed=seed), n)]


def _trained(fn: int = 0, n: int = 3000) -> Any:
    m = _lr()
    for x, y in _stream(fn, n, seed=1):
        m.learn_one(x, y)
    return m


def _dummy() -> Any:
    from river import dummy

    m = dummy.NoChangeClassifier()
    return m


def _run_gate(champion: Any, challenger: Any, labels: int = 500) -> shadow.Verdict:
    gate = ShadowGate("binary", labels_needed=labels, margin=0.0)
    for x, y in _stream(0, 5000, seed=2):
        pc, pn = champion.predict_one(x), challenger.predict_one(x)
        champion.learn_one(x, y)
        challenger.learn_one(x, y)
        v = gate.update(y, champion=pc, challenger=pn)
        if v is not None:
            return v
    raise AssertionError("no verdict")


def test_a_bad_challenger_is_rejected() -> None:
    v = _run_gate(_trained(), _dummy())
    assert v.decision == "reject"
    assert v.candidate < v.incumbent and v.labels == 500
    assert "challenger" in v.reason and "not better" in v.reason


def test_a_better_challenger_is_promoted() -> None:
    v = _run_gate(_dummy(), _trained())
    assert v.decision == "promote" and v.candidate > v.incumbent
    rec = v.record("demo", "v2", "promotion", now=1.0, margin=0.0, challenger="v3")
    assert rec.kind == "decision" and rec.drifted and rec.statistic == "promote"
    assert rec.detail is not None and rec.detail["challenger"] == "v3"


def test_margin_must_be_met() -> None:
    gate = ShadowGate("binary", labels_needed=10, margin=0.2)
    v = None
    for i in range(10):
        # champion right 5/10, challenger right 6/10: better by 0.1 < 0.2
        v = gate.update(True, champion=i < 5, challenger=i < 6)
    assert v is not None and v.decision == "reject" and "< margin 0.2" in v.reason


def test_only_labels_both_sides_scored_count() -> None:
    gate = ShadowGate("binary", labels_needed=2)
    assert gate.update(True, champion=None, challenger=True) is None
    assert gate.update(True, champion=True, challenger=None) is None
    assert gate.labels == 0


def test_a_bad_champion_forced_in_is_rolled_back() -> None:
    new, old = _dummy(), _trained()
    guard = RollbackGuard("binary", labels=1000, margin=0.05)
    verdict = None
    for x, y in _stream(0, 3000, seed=3):
        pn, po = new.predict_one(x), old.predict_one(x)
        new.learn_one(x, y)
        old.learn_one(x, y)
        verdict = guard.update(y, champion=pn, predecessor=po)
        if verdict:
            break
    assert verdict is not None and verdict.decision == "rollback"
    assert "in shadow" in verdict.reason and verdict.labels == 1000


def test_a_good_champion_is_kept_against_a_last_known_baseline() -> None:
    guard = RollbackGuard("binary", labels=100, margin=0.05, baseline=0.80)
    v = None
    for i in range(100):
        v = guard.update(True, champion=i % 10 != 0)  # 0.90 accuracy
    assert v is not None and v.decision == "keep" and "last known" in v.reason


def test_regression_margins_are_relative() -> None:
    assert improvement("regression", 90.0, 100.0) == pytest.approx(0.1)
    guard = RollbackGuard("regression", labels=10, margin=0.05)
    v = None
    for _ in range(10):
        v = guard.update(0.0, champion=1.2, predecessor=1.0)  # MAE 20 % worse
    assert v is not None and v.decision == "rollback"
    assert math.isclose(v.candidate, 1.2) and math.isclose(v.incumbent, 1.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="labels_needed must be >= 1, got 0"):
        ShadowGate("binary", labels_needed=0)
    with pytest.raises(ValueError, match="labels must be >= 1, got 0"):
        RollbackGuard("binary", labels=0)
