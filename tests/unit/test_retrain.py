"""Retrain policy decisions and challenger fitting on a training-log frame."""

from __future__ import annotations

import doctest
import itertools
from typing import Any

import pytest

import models.retrain as retrain
from models.retrain import RetrainError, RetrainPolicy, fit_challenger, train_log_frame
from weir.spec import RetrainSpec, parse_spec


def test_doctests() -> None:
    result = doctest.testmod(retrain)
    assert result.attempted >= 8 and result.failed == 0


# -- policy ----------------------------------------------------------------------------


def _policy(**kw: Any) -> RetrainPolicy:
    base: dict[str, Any] = {"cooldown": 100, "min_fresh_labels": 500, "min_feature_drifts": 2}
    return RetrainPolicy(RetrainSpec(**{**base, **kw}), "demo", started=0.0)


def test_no_trigger_is_a_recorded_decision() -> None:
    d = _policy().decide(now=1.0, model_version="v1")
    assert not d.fire and d.trigger == "none" and d.reason.startswith("no trigger")
    rec = d.record.to_dict()
    assert rec["kind"] == "decision" and rec["name"] == "retrain" and rec["drifted"] is False
    assert rec["model_version"] == "v1" and rec["detail"]["reason"] == d.reason


def test_fresh_labels_hold_back_then_fire() -> None:
    p = _policy()
    p.note_performance_drift("ADWIN on loss", now=5.0, event_ts=4.0)
    p.add_labels(120)
    d = p.decide(now=6.0)
    assert not d.fire and d.reason.endswith("only 120 fresh labels < 500")
    p.add_labels(380)
    d = p.decide(now=7.0)
    assert d.fire and d.trigger == "performance" and "ADWIN on loss" in d.reason
    assert p.drift_point == 4.0


def test_cooldown_stops_a_storm_and_keeps_the_trigger_pending() -> None:
    p = _policy()
    p.add_labels(1000)
    p.note_feature_drift(["a", "b"])
    assert p.decide(now=10.0).fire
    p.fired(now=10.0)
    p.add_labels(1000)
    p.note_feature_drift(["a", "b", "c"])
    d = p.decide(now=52.0)
    assert not d.fire and d.reason.endswith("cooldown: 58s left")
    assert p.decide(now=111.0).fire  # still pending after the cooldown


def test_one_drifted_feature_is_not_enough() -> None:
    p = _policy()
    p.add_labels(1000)
    p.note_feature_drift(["a"])
    assert p.decide(now=1.0).trigger == "none"


def test_drift_after_fresh_labels_restarts_the_count() -> None:
    p = _policy()
    p.add_labels(900)
    p.note_performance_drift("ADWIN on loss", now=1.0)
    assert p.fresh_labels == 0


def test_manual_skips_the_cooldown_not_the_labels() -> None:
    p = _policy()
    p.add_labels(600)
    p.note_manual("new data", now=0.0)
    assert p.decide(now=0.0).fire
    p.fired(now=0.0)
    p.note_manual("again", now=1.0)
    assert p.decide(now=1.0).reason == "manual: again; held: only 0 fresh labels < 500"
    p.add_labels(500)
    assert p.decide(now=2.0).fire


def test_schedule_fires_after_its_period() -> None:
    p = _policy(schedule=3600)
    p.add_labels(500)
    assert not p.decide(now=3599.0).fire
    d = p.decide(now=3600.0)
    assert d.fire and d.trigger == "schedule"


def test_busy_and_disabled_hold_back() -> None:
    p = _policy()
    p.add_labels(1000)
    p.note_manual("x", now=0)
    assert p.decide(now=0, busy="challenger v3 in shadow (10/500 labels)").reason.endswith(
        "held: challenger v3 in shadow (10/500 labels)"
    )
    q = _policy(enabled=False)
    q.add_labels(1000)
    q.note_manual("x", now=0)
    assert q.decide(now=0).reason.endswith("held: retrain disabled in the spec")


def test_performance_drift_ignored_when_switched_off() -> None:
    p = _policy(on_performance_drift=False)
    p.note_performance_drift("ADWIN", now=0)
    p.add_labels(1000)
    assert p.decide(now=1).trigger == "none"


# -- challenger --------------------------------------------------------------------------

SPEC = parse_spec(
    {
        "name": "t",
        "task": "binary",
        "classes": ["0", "1"],
        "fields": {k: "numeric" for k in ("salary", "commission", "age", "loan")},
        "features": [{"agg": "raw", "field": k} for k in ("salary", "commission", "age", "loan")],
        "model": {
            "steps": [
                "river.preprocessing.StandardScaler",
                {
                    "class": "river.linear_model.LogisticRegression",
                    "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.05}}},
                },
            ]
        },
        "retrain": {"window_labels": 2000, "holdout_fraction": 0.2},
    }
)
FEATS = ["salary", "commission", "age", "loan"]


def _records(fn: int, n: int, seed: int, start: int = 0, served: Any = None) -> list[dict]:
    from river.datasets import synth

    out = []
    for i, (x, y) in enumerate(itertools.islice(synth.Agrawal(fn, seed=seed), n), start=start):
        feats = {k: float(x[k]) for k in FEATS}
        out.append(
            {
                "event_id": f"e{i:06d}",
                "ts": 1000.0 + i,
                "features": feats,
                "label": str(int(y)),
                "prediction": served(feats) if served else None,
                "model_version": "v1",
            }
        )
    return out


def test_train_log_frame_shape_and_clash() -> None:
    f = train_log_frame(_records(0, 5, seed=1))
    assert list(f.columns) == ["event_id", "ts", "label", "prediction", "model_version", *sorted(FEATS)]
    with pytest.raises(RetrainError, match=r"feature name\(s\) \['label'\] clash"):
        train_log_frame([{"features": {"label": 1.0}}])


def test_fit_challenger_is_reproducible_and_uses_learn_many() -> None:
    frame = train_log_frame(_records(6, 3000, seed=4))
    a = fit_challenger(SPEC, frame)
    b = fit_challenger(SPEC, frame.sample(frac=1.0, random_state=0))  # arrival order differs
    assert a.data_hash == b.data_hash and a.window == b.window
    assert a.fit_mode == "learn_many(batch=32)"
    assert (a.rows, a.train_rows, a.holdout_rows) == (2000, 1600, 400)
    assert a.window["row_start"] == 1000 and a.window["ts_max"] == 1000.0 + 2999
    xs = [r["features"] for r in _records(0, 50, seed=9)]
    assert [a.model.predict_proba_one(x) for x in xs] == [b.model.predict_proba_one(x) for x in xs]
    assert a.challenger_score > 0.9
    assert a.as_meta()["data_sha256"] == a.data_hash


def test_fit_challenger_beats_a_stale_champion_after_a_concept_change() -> None:
    from models.factory import build_model, learn

    champion = build_model(SPEC.model)
    for r in _records(6, 3000, seed=1):
        learn(champion, r["features"], r["label"], "binary")
    frame = train_log_frame(_records(6, 1000, seed=2) + _records(7, 1500, seed=3, start=1000))
    res = fit_challenger(SPEC, frame, champion=champion, since_ts=2000.0)
    assert res.rows == 1500 and res.window["since_ts"] == 2000.0
    assert res.challenger_score > res.champion_score
    assert res.meta["champion_scored"] == "model"


def test_fit_challenger_scores_served_predictions_without_a_champion() -> None:
    frame = train_log_frame(_records(0, 500, seed=5, served=lambda f: True))
    res = fit_challenger(SPEC, frame)
    assert res.meta["champion_scored"] == "served predictions"
    assert 0.0 < res.champion_score < 1.0


def test_fit_challenger_falls_back_to_learn_one_on_gaps() -> None:
    recs = _records(0, 300, seed=6)
    recs[10]["features"]["age"] = None
    res = fit_challenger(SPEC, train_log_frame(recs))
    assert res.fit_mode == "learn_one"


def test_too_few_rows() -> None:
    with pytest.raises(RetrainError, match="only 10 training-log rows in the retrain window"):
        fit_challenger(SPEC, train_log_frame(_records(0, 10, seed=1)))


def test_a_drift_of_the_replaced_champion_does_not_retrain_its_successor() -> None:
    # CI saw it: the old champion kept failing while its challenger was in shadow, the
    # detector fired again, and the pending trigger retrained (and replaced) the new one.
    p = _policy(min_fresh_labels=10, cooldown=5)
    p.note_performance_drift("ADWIN on loss", now=1)
    p.add_labels(20)
    assert p.decide(now=10).fire
    p.fired(10)
    p.note_performance_drift("ADWIN on loss (the old champion, during the shadow)", now=12)
    p.note_feature_drift(["a", "b"])
    p.add_labels(20)
    p.champion_changed()  # the challenger is promoted
    decision = p.decide(now=30)
    assert decision.fire and decision.trigger == "features"  # the inputs' drift stays
    p.fired(30)
    p.note_performance_drift("ADWIN on loss", now=31)
    p.champion_changed()
    p.add_labels(20)
    assert not p.decide(now=60).fire and p.drift_point is None
