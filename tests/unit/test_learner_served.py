"""The served record's compact encoding: what the scorer stores is what the learner reads."""

from __future__ import annotations

import orjson
import pytest

from models.join import ServedStore
from weir.spec import PipelineSpec, parse_spec
from weir.types import Prediction


def _spec(task: str = "binary") -> PipelineSpec:
    return parse_spec(
        {
            "name": "served",
            "task": task,
            "fields": {"a": "numeric", "b": "numeric", "c": "categorical"},
            "features": [{"agg": "raw", "field": "a"}, {"agg": "raw", "field": "b"}],
            "model": {"name": "lr", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def _pred(
    features: dict[str, object], proba: object = None, prediction: object = True, model: str = "lr"
) -> Prediction:
    return Prediction(
        event_id="evt-1",
        entity_id="ent-9",
        ts=1_700_000_000.123456,
        model=model,
        model_version="v3.17",
        prediction=prediction,  # type: ignore[arg-type]
        proba=proba,  # type: ignore[arg-type]
        features=features,  # type: ignore[arg-type]
        scored_at=1_700_000_001.5,
    )


@pytest.mark.parametrize(
    "features",
    [
        {"a": 0.1, "b": -2.5e300},
        {"a": None, "b": 3.0},  # None as served (an undefined aggregate)
        {"a": None, "b": None},
        {"b": 1.0, "a": 2.0},  # another order: stored by name
        {"a": "x", "b": 1.0},  # not all numbers
        {"z": 1.0},  # names the spec does not have
        {},
    ],
)
def test_round_trip(features: dict[str, object]) -> None:
    store = ServedStore(_spec())
    p = _pred(features, {"False": 0.25, "True": 0.75})
    raw = store.encode(p)
    got = store.decode("evt-1", raw)
    assert got == p and list(got.features) == list(p.features)


def test_compact_and_names_kept_once() -> None:
    store = ServedStore(_spec())
    p = _pred({"a": 0.123456789, "b": 1234.5}, {"False": 0.2718281828, "True": 0.7281718172})
    raw = store.encode(p)
    assert b'"a"' not in raw and b"False" not in raw and b"lr" not in raw and b"evt-1" not in raw
    assert len(raw) < len(orjson.dumps(p.to_dict())) / 2


def test_other_proba_model_and_untrained_round_trip() -> None:
    store = ServedStore(_spec("multiclass"))
    for p in (
        _pred({"a": 1.0, "b": 2.0}, {"x": 0.5, "y": 0.5}, "x"),
        _pred({"a": 1.0, "b": 2.0}, None, None),  # an untrained model serves nothing
        _pred({"a": 1.0, "b": 2.0}, {"True": 0.4, "False": 0.6}, model="champion-2"),
    ):
        assert store.decode("evt-1", store.encode(p)) == p


def test_an_older_json_record_is_still_read() -> None:
    store = ServedStore(_spec())
    p = _pred({"a": 1.0, "b": None}, {"False": 0.5, "True": 0.5})
    assert store.decode("evt-1", orjson.dumps(p.to_dict())) == p


def test_a_learner_that_never_snapshots_keeps_a_bounded_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without snapshots (a replay) no served record may be deleted: they are left to their
    TTL and the ids the learner remembers stay bounded; a snapshot lets the rest go."""
    import models.join as join

    monkeypatch.setattr(join, "UNPUBLISHED_CAP", 10)
    joiner = join.LabelJoiner(_spec(), client=None)
    joiner.mark_learned((f"e{i}", i) for i in range(25))
    assert joiner.unwritten == 25 and joiner._unpublished == [f"e{i}" for i in range(15, 25)]
    joiner.published(25)
    assert joiner._droppable == [f"e{i}" for i in range(15, 25)] and joiner._unpublished == []
