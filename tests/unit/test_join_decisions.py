"""The label join's decisions as pure functions of the state one script call reads (no Redis).

Each outcome (hit, early, duplicate, expired, resolved, unknown) and the redelivery and
duplicate rules of models/join.py's module doc, from hand-made :class:`Found` states; the
Redis half (what the script reads and writes) is tested in tests/integration/test_learner_join.py.
"""

from __future__ import annotations

import orjson
import pytest

from models.join import (
    PUBLISHED,
    SWEEP_HELD_CHUNK,
    Found,
    Lineage,
    ServedStore,
    decide_held,
    decide_labels,
    held_by_another,
    hold_body,
    next_cursor,
    read_state,
)
from weir.spec import PipelineSpec, parse_spec
from weir.types import Label, Prediction

NOW = 1_700_000_100.0


def _spec() -> PipelineSpec:
    return parse_spec(
        {
            "name": "decide",
            "task": "binary",
            "fields": {"a": "numeric"},
            "features": [{"agg": "raw", "field": "a"}],
            "model": {"name": "lr", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )


STORE = ServedStore(_spec())


def _record(eid: str, a: float = 2.5) -> bytes:
    return STORE.encode(
        Prediction(
            eid, "ent", 1_700_000_000.0, "lr", "v1.3", True, {"False": 0.4, "True": 0.6}, {"a": a}, 1.7e9
        )
    )


def _label(eid: str, label: bool = False) -> Label:
    return Label(event_id=eid, label=label, ts=NOW)


def _lineage() -> Lineage:
    # this run is r2; r1 ran before it, and its snapshot had reached seq 10
    return Lineage(run_id="r2", ancestors={"r1": [10, NOW - 60]})


def _outcomes(labels: list[Label], found: list[Found], read: list[bool] | None = None) -> list[str]:
    return [r.outcome for r in decide_labels(labels, found, _lineage(), STORE, read)]


# -- on arrival ----------------------------------------------------------------------------


def test_a_served_event_is_a_hit_with_the_served_features_and_prediction() -> None:
    [res] = decide_labels([_label("e1", True)], [Found(record=_record("e1"))], _lineage(), STORE)
    assert res.outcome == "hit" and res.event_id == "e1" and res.example is not None
    ex = res.example
    assert ex.features == {"a": 2.5} and ex.label is True
    assert (ex.prediction, ex.proba, ex.model_version) == (True, {"False": 0.4, "True": 0.6}, "v1.3")
    assert (ex.entity_id, ex.event_ts, ex.label_ts) == ("ent", 1_700_000_000.0, NOW)


def test_nothing_found_is_early_and_an_expired_id_is_expired() -> None:
    res = decide_labels([_label("e1"), _label("e2")], [Found(), Found(expired=True)], _lineage(), STORE)
    assert [(r.outcome, r.example) for r in res] == [("early", None), ("expired", None)]
    assert "after the horizon" in res[1].detail


def test_a_message_read_already_is_a_duplicate_whatever_redis_holds() -> None:
    found = [Found(record=_record("e1")), Found(expired=True), Found()]
    labels = [_label("e1"), _label("e2"), _label("e3")]
    assert _outcomes(labels, found, read=[True, True, True]) == ["duplicate"] * 3
    assert _outcomes(labels, found, read=[False, True, False]) == ["hit", "duplicate", "early"]


def test_a_second_label_for_an_event_in_the_same_batch_is_a_duplicate() -> None:
    labels = [_label("e1"), _label("e1"), _label("e2"), _label("e2")]
    found = [Found(record=_record("e1"))] * 2 + [Found()] * 2
    res = decide_labels(labels, found, _lineage(), STORE)
    assert [r.outcome for r in res] == ["hit", "duplicate", "early", "duplicate"]
    assert res[1].detail == "label already learned"


@pytest.mark.parametrize(
    ("marker", "record", "outcome"),
    [
        (b"r2:5", True, "duplicate"),  # learned by this run
        (b"r2:5", False, "duplicate"),  # this run's mark, however its record is gone
        (PUBLISHED.encode(), False, "duplicate"),  # learned, record deleted: pending score negated
        ("r1:10", True, "duplicate"),  # an ancestor's, in the snapshot this run started from
        (b"r1:11", True, "hit"),  # an ancestor's past that snapshot: learned by a lost state
        (b"r0:3", True, "hit"),  # a run the lineage does not know: lost too
        (b"r1:x", True, "hit"),  # not a marker the lineage can read
    ],
)
def test_the_lineage_decides_whether_a_marked_event_is_learned_again(
    marker: bytes | str, record: bool, outcome: str
) -> None:
    found = Found(marker=marker, record=_record("e1") if record else None)
    assert _outcomes([_label("e1")], [found]) == [outcome]


def test_a_learned_event_is_a_duplicate_even_past_its_horizon() -> None:
    assert _outcomes([_label("e1")], [Found(marker=b"*", expired=True)]) == ["duplicate"]


def test_states_must_match_the_labels() -> None:
    with pytest.raises(ValueError, match="1 states for 2 labels"):
        decide_labels([_label("a"), _label("b")], [Found()], _lineage(), STORE)


def test_read_state_splits_the_script_reply_three_values_an_id() -> None:
    raw = [None, b"rec", None, b"r2:1", None, None, None, None, b"12.5"]
    assert read_state(raw) == [
        Found(None, b"rec"),
        Found(b"r2:1", None),
        Found(None, None, expired=True),
    ]
    assert read_state([None, b"rec", b"body"], mode="early") == [Found(None, b"rec", held=b"body")]


# -- holds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("was_set", "held", "source", "duplicate"),
    [
        (True, "own", "3:17", False),  # held now
        (None, "own", "3:17", False),  # a retried call finds its own hold (applied, timed out)
        (None, "other", "3:17", True),  # another message's label is held for the event
        (None, "own", "", True),  # no source: a hold that did not set cannot be its own
        (True, "own", "", False),
    ],
)
def test_a_hold_that_finds_another_label_is_a_duplicate(
    was_set: bool | None, held: str, source: str, duplicate: bool
) -> None:
    body = hold_body(_label("e1", True), source)
    found = body if held == "own" else hold_body(_label("e1", False), "3:16")
    assert held_by_another(was_set, found, body, source) is duplicate


def test_a_hold_body_names_its_message() -> None:
    assert orjson.loads(hold_body(_label("e1", True), "0:5")) == {
        "event_id": "e1",
        "label": True,
        "ts": NOW,
        "src": "0:5",
    }


# -- the sweep -----------------------------------------------------------------------------


def _held(*found: Found, deadline: float = NOW + 10, published_seq: int = 4) -> tuple[list[str], list[str]]:
    ids = [f"h{i}" for i in range(len(found))]
    results, done = decide_held(
        ids, [deadline] * len(ids), list(found), _lineage(), STORE, published_seq, NOW
    )
    return [f"{r.event_id}:{r.outcome}" for r in results], done


def test_a_held_label_whose_event_is_served_is_resolved_with_the_held_label() -> None:
    body = hold_body(Label(event_id="h0", label=True, ts=NOW - 5), "0:9")
    ids, deadlines = ["h0"], [NOW + 10]
    results, done = decide_held(
        ids, deadlines, [Found(record=_record("h0"), held=body)], _lineage(), STORE, 4, NOW
    )
    [res] = results
    assert res.outcome == "resolved" and res.example is not None
    assert (
        res.example.label is True and res.example.label_ts == NOW - 5 and res.example.features == {"a": 2.5}
    )
    assert done == []  # it leaves once a snapshot has it (next sweeps)


def test_a_held_label_still_unserved_waits_until_its_deadline_then_is_unknown() -> None:
    body = hold_body(_label("h0"), "0:9")
    assert _held(Found(held=body)) == ([], [])
    assert _held(Found(held=body), deadline=NOW) == (["h0:unknown"], ["h0"])


def test_a_hold_that_expired_is_dropped_unknown_unless_its_event_was_learned() -> None:
    assert _held(Found()) == (["h0:unknown"], ["h0"])
    assert _held(Found(marker=b"r2:9")) == ([], ["h0"])


def test_a_learned_held_label_leaves_once_a_published_snapshot_has_it() -> None:
    body = hold_body(_label("h0"), "0:9")
    rec = _record("h0")
    # this run's seq 4 is published, seq 5 not yet; published and ancestors' markers are
    assert _held(Found(marker=b"r2:4", record=rec, held=body)) == ([], ["h0"])
    assert _held(Found(marker=b"r2:5", record=rec, held=body)) == ([], [])
    assert _held(Found(marker=b"*", held=body)) == ([], ["h0"])
    assert _held(Found(marker=b"r1:10", record=rec, held=body)) == ([], ["h0"])


def test_a_resolved_held_label_whose_marker_went_with_the_horizon_leaves_without_unknown() -> None:
    """No snapshot published it before its horizon: its record and pending entry are gone
    (no marker). It was counted ``resolved``; it leaves, never ``unknown`` as well."""
    body = hold_body(_label("h0"), "0:9")
    for found, deadline in [(Found(), NOW + 10), (Found(held=body), NOW)]:  # hold gone; deadline passed
        ids = ["h0", "h1"]
        results, done = decide_held(
            ids, [deadline] * 2, [found, found], _lineage(), STORE, 4, NOW, resolved={"h0"}
        )
        assert [f"{r.event_id}:{r.outcome}" for r in results] == ["h1:unknown"]  # h1 never resolved
        assert done == ["h0", "h1"]


def test_a_held_label_learned_by_a_lost_model_state_is_resolved_again() -> None:
    body = hold_body(_label("h0"), "0:9")
    assert _held(Found(marker=b"r1:11", record=_record("h0"), held=body)) == (["h0:resolved"], [])


def test_the_sweep_cursor_moves_past_kept_ids_and_wraps_at_the_end() -> None:
    assert next_cursor(0, SWEEP_HELD_CHUNK, 0) == SWEEP_HELD_CHUNK
    assert next_cursor(SWEEP_HELD_CHUNK, SWEEP_HELD_CHUNK, SWEEP_HELD_CHUNK) == SWEEP_HELD_CHUNK
    assert next_cursor(SWEEP_HELD_CHUNK, 3, 1) == 0


def test_the_resolved_held_labels_remembered_are_bounded() -> None:
    """The joiner remembers the held labels it resolved until their holds go, and forgets
    one the sweep never looks at again two horizons after its deadline."""
    from models.join import JoinResult, LabelJoiner

    joiner = LabelJoiner(_spec(), client=None)
    horizon = _spec().labels.horizon
    res = [JoinResult("resolved", "h0"), JoinResult("unknown", "h1"), JoinResult("resolved", "h2")]
    joiner._note_resolved(["h0", "h1", "h2"], [NOW, NOW, NOW + 5], res, ["h1"], NOW)
    assert joiner._resolved == {"h0": NOW, "h2": NOW + 5}
    joiner._note_resolved(["h0"], [NOW], [], ["h0"], NOW + 1)  # its hold went
    assert joiner._resolved == {"h2": NOW + 5}
    joiner._note_resolved([], [], [], [], NOW + 5 + 2 * horizon + 1)
    assert joiner._resolved == {}
