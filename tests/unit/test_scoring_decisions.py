"""The scorer's per-batch decisions without Redis or Kafka: pure inputs in, outputs out.

:func:`validate_batch` (which messages are events), :func:`route_computed` (what each
feature result becomes) and :func:`score_events` (the predictions), the three pure steps
:meth:`streams.scoring.Scorer.process` runs around its one Redis call.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from features.base import FeatureResult
from streams.scoring import RawMessage, route_computed, score_events, validate_batch
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event

NOW = 1_700_000_100.0


def _spec(late_events: str = "dead_letter") -> PipelineSpec:
    return parse_spec(
        {
            "name": "p",
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}, {"agg": "mean", "field": "x", "window": "1h"}],
            "late_events": late_events,
            "lateness": 30,
            "model": {"name": "m", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def _raw(value: bytes | None, offset: int) -> RawMessage:
    return RawMessage(value, b"key", "events", 2, offset, NOW - 1)


def test_validate_batch_parses_events_and_dead_letters_the_rest_with_where_they_came_from() -> None:
    ok = orjson.dumps({"event_id": "e1", "entity_id": "a", "ts": NOW - 10, "data": {"x": 1.5}})
    msgs = [
        _raw(ok, 0),
        _raw(b"{bad", 1),
        _raw(orjson.dumps({"entity_id": "a", "ts": NOW}), 2),
        _raw(None, 3),
    ]
    good, dead = validate_batch(_spec(), msgs, NOW)
    assert [(e, m.offset) for e, m in good] == [(Event("e1", "a", NOW - 10, {"x": 1.5}), 0)]
    assert [(d.offset, d.reason) for d in dead] == [(1, "not_json"), (2, "missing_field"), (3, "empty")]
    assert all(d.topic == "events" and d.partition == 2 and d.key == b"key" and d.at == NOW for d in dead)
    assert dead[0].value == b"{bad" and "event_id" in dead[1].detail


def _computed(*statuses: str) -> list[tuple[tuple[Event, RawMessage], FeatureResult]]:
    out = []
    for i, status in enumerate(statuses):
        event = Event(f"e{i}", "a", NOW - 100 + i, {"x": float(i)})
        features = None if status == "late" else {"x": float(i), "x_mean_1h": None}
        out.append(((event, _raw(b"{}", i)), FeatureResult(status, features)))  # type: ignore[arg-type]
    return out


def test_late_events_are_dead_lettered_and_duplicates_scored_and_counted() -> None:
    to_score, out = route_computed(
        _spec("dead_letter"), _computed("ok", "late", "duplicate", "late", "ok"), NOW
    )
    assert [(e.event_id, r.status, m.offset) for e, r, m in to_score] == [
        ("e0", "ok", 0),
        ("e2", "duplicate", 2),
        ("e4", "ok", 4),
    ]
    assert [(d.reason, d.offset) for d in out.dead_letters] == [("late", 1), ("late", 3)]
    assert "lateness=30.0s" in out.dead_letters[0].detail and "raise `lateness`" in out.dead_letters[0].detail
    assert (out.duplicates, out.late_ignored, out.max_ts, out.predictions) == (1, 0, NOW - 96, [])


def test_late_events_are_only_counted_when_ignored_and_max_ts_is_of_scored_events_only() -> None:
    to_score, out = route_computed(_spec("ignore"), _computed("ok", "late", "late"), NOW)
    assert [e.event_id for e, _, _ in to_score] == ["e0"]
    assert (out.dead_letters, out.duplicates, out.late_ignored, out.max_ts) == ([], 0, 2, NOW - 100)
    _, nothing = route_computed(_spec("ignore"), [], NOW)
    assert nothing.max_ts is None and nothing.late_ignored == 0


class Recorder:
    """A classifier that answers a fixed probability and records what it was given."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        self.seen.append(x)
        return {False: 0.2, True: 0.8}


def test_score_events_predicts_on_the_defined_features_and_keeps_them_as_served() -> None:
    model = Recorder()
    pairs = [(event, res) for (event, _), res in _computed("ok", "duplicate")]
    preds = score_events(_spec(), pairs, model, "m", "v2.7", NOW)
    assert model.seen == [{"x": 0.0}, {"x": 1.0}]  # None (an empty window's mean) is not given
    assert [(p.event_id, p.entity_id, p.ts) for p in preds] == [("e0", "a", NOW - 100), ("e1", "a", NOW - 99)]
    p = preds[0]
    assert (p.model, p.model_version, p.prediction, p.proba, p.scored_at) == (
        "m",
        "v2.7",
        True,
        {"False": 0.2, "True": 0.8},
        NOW,
    )
    assert p.features == {"x": 0.0, "x_mean_1h": None}


def test_score_events_lets_a_model_error_through_for_isolate() -> None:
    class Broken:
        def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
            raise ValueError("no")

    pairs = [(event, res) for (event, _), res in _computed("ok")]
    with pytest.raises(ValueError, match="no"):
        score_events(_spec(), pairs, Broken(), "m", "v1", NOW)
