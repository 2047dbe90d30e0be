"""LearnerCore's per-batch decisions without Redis or Kafka: inputs in, outputs out.

What a batch of label messages becomes (labels, their sources, read-already flags, dead
letters), where the offsets go, what is learned of each join outcome, and when a snapshot
is due. The join itself is answered here from hand-made states through the same pure
function the Redis joiner uses (:func:`models.join.decide_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from models.factory import build_model
from models.join import Found, JoinResult, ServedStore, decide_labels
from models.learner import LabelMessage, LearnerCore, offsets_after, read_labels, run_step
from weir.contracts import decode_dead_letter, decode_training_record
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
            "learner": {"snapshot_every_labels": 3, "snapshot_every_seconds": 60},
        }
    )


def _msg(obj: Any, partition: int = 0, offset: int = -1) -> LabelMessage:
    return LabelMessage(orjson.dumps(obj), partition, offset, b"k")


def test_a_batch_is_read_into_labels_sources_read_flags_and_invalid_messages() -> None:
    msgs = [
        _msg({"event_id": "e1", "label": 1, "ts": NOW - 5}, 0, 10),  # before offset 11: read already
        _msg({"event_id": "e2", "label": "no"}, 0, 11),
        _msg({"event_id": "e3", "label": [1]}, 1, 3),  # not a scalar
        LabelMessage(b"{not json", 1, 4),
        _msg({"event_id": "e4", "label": 7}, 1, 5),  # not a binary label
        _msg({"event_id": "e5", "label": False}),  # no offset (a replay)
    ]
    batch = read_labels(_spec(), msgs, {0: 11}, NOW)
    assert batch.labels == [Label("e1", True, NOW - 5), Label("e2", False, NOW), Label("e5", False, NOW)]
    assert batch.sources == ["0:10", "0:11", ""]
    assert batch.read == [True, False, False]
    assert [(m.offset, e.reason) for m, e in batch.invalid] == [
        (3, "label_type"),
        (4, "not_json"),
        (5, "label_type"),
    ]


def test_offsets_move_past_every_message_and_never_back() -> None:
    msgs = [LabelMessage(b"", 0, 4), LabelMessage(b"", 0, 9), LabelMessage(b"", 2, 0), LabelMessage(b"")]
    assert offsets_after({0: 20, 1: 3}, msgs) == {0: 20, 1: 3, 2: 1}
    assert offsets_after({}, msgs) == {0: 10, 2: 1}


STORE = ServedStore(_spec())


def _served(eid: str, a: float) -> bytes:
    return STORE.encode(
        Prediction(eid, "u", NOW - 50, "lr", "v1", True, {"False": 0.3, "True": 0.7}, {"a": a}, NOW)
    )


def _core(**kw: Any) -> LearnerCore:
    spec = _spec()
    return LearnerCore(spec, build_model(spec.model), None, client=None, version_id="v1", **kw)


def _joined(core: LearnerCore, states: dict[str, Found]) -> list[tuple[list[str], list[bool]]]:
    """Answer the core's join from ``states`` with the joiner's own decision; record its inputs."""
    calls: list[tuple[list[str], list[bool]]] = []

    def join(
        labels: Sequence[Label], now: float, sources: Sequence[str], read: Sequence[bool]
    ) -> list[JoinResult]:
        calls.append((list(sources), list(read)))
        found = [states.get(lab.event_id, Found()) for lab in labels]
        return decide_labels(labels, found, core.joiner.lineage, core.joiner.served, read)

    core.joiner.join = join  # type: ignore[method-assign,assignment]
    return calls


def test_a_batch_learns_its_hits_only_and_counts_every_outcome() -> None:
    core = _core(offsets={0: 3})
    calls = _joined(core, {"e1": Found(record=_served("e1", 1.0)), "e2": Found(expired=True)})
    msgs = [
        _msg({"event_id": "e1", "label": True, "ts": NOW}, 0, 3),  # hit
        _msg({"event_id": "e1", "label": True, "ts": NOW}, 0, 4),  # the same event again: duplicate
        _msg({"event_id": "e2", "label": True, "ts": NOW}, 0, 5),  # expired
        _msg({"event_id": "e3", "label": True, "ts": NOW}, 0, 6),  # early
        _msg({"event_id": "e1", "label": True, "ts": NOW}, 0, 2),  # read before this run's offsets
        _msg({"label": True}, 0, 7),  # invalid
    ]
    out = run_step(core.process_step(msgs, now=NOW))
    assert calls == [(["0:3", "0:4", "0:5", "0:6", "0:2"], [False, False, False, False, True])]
    assert [r.outcome for r in out.results] == [
        "invalid",
        "hit",
        "duplicate",
        "expired",
        "early",
        "duplicate",
    ]
    assert dict(core.joins) == {"invalid": 1, "hit": 1, "duplicate": 2, "expired": 1, "early": 1}
    assert core.labels_seen == 6 and core.labels_learned == 1 and core.offsets == {0: 8}
    [rec] = [decode_training_record(r) for r in out.training_log]
    assert (
        rec is not None and rec["event_id"] == "e1" and rec["features"] == {"a": 1.0} and rec["label"] is True
    )
    [dl] = [decode_dead_letter(d) for d in out.dead_letters]
    assert dl["reason"] == "missing_field" and dl["offset"] == 7 and dl["key"] == b"k"
    assert core.joiner.unwritten == 1  # the hit's marker, queued for the next call
    assert core.evaluator.count() == 1 and core.evaluator.count("v1") == 1  # the served prediction, scored


def test_a_batch_of_invalid_messages_only_makes_no_join_call_and_still_moves_the_offsets() -> None:
    core = _core()
    calls = _joined(core, {})
    out = run_step(core.process_step([LabelMessage(b"[]", 0, 0), LabelMessage(None, 0, 1)], now=NOW))
    assert calls == [] and [r.outcome for r in out.results] == ["invalid", "invalid"]
    assert core.offsets == {0: 2} and len(out.dead_letters) == 2


@pytest.mark.parametrize(
    ("learned", "offsets", "elapsed", "due"),
    [
        (3, {}, 0.0, True),  # snapshot_every_labels reached
        (2, {}, 59.0, False),
        (2, {}, 60.0, True),  # snapshot_every_seconds, with labels learned since
        (0, {0: 5}, 60.0, True),  # ... or offsets moved (duplicates only)
        (0, {}, 600.0, False),  # nothing new: no snapshot
    ],
)
def test_a_snapshot_is_due_by_labels_or_by_time_when_something_changed(
    learned: int, offsets: dict[int, int], elapsed: float, due: bool
) -> None:
    spec = _spec()
    registry: Any = object()  # never called: only whether there is one
    core = LearnerCore(spec, build_model(spec.model), registry, None, version_id="v1", clock=lambda: NOW)
    core.labels_learned += learned
    core.offsets.update(offsets)
    assert core.snapshot_due(NOW + elapsed) is due
