from __future__ import annotations

import math

import orjson
import pytest

from streams.contracts import (
    decode_dead_letter,
    encode_dead_letter,
    parse_event,
    parse_label,
    parse_ts,
)
from weir.errors import InvalidMessage
from weir.spec import load_spec
from weir.types import DeadLetter

NOW = 1_790_000_000.0
SPEC = load_spec("examples/demo.yaml")
DATA = {f: 1.5 for f in SPEC.fields}


def ev(**over):
    obj = {"event_id": "e1", "entity_id": "u1", "ts": NOW - 5, "data": dict(DATA)}
    obj.update(over)
    return orjson.dumps(obj)


def test_good_event_parses():
    e = parse_event(ev(), SPEC, now=NOW)
    assert (e.event_id, e.entity_id, e.ts) == ("e1", "u1", NOW - 5)
    assert e.data["salary"] == 1.5


def test_iso_timestamp_is_utc():
    e = parse_event(ev(ts="2026-09-21T12:00:00Z"), SPEC, now=NOW)
    assert e.ts == 1789992000.0
    assert parse_ts("2026-09-21T12:00:00", "ts", SPEC, now=2e9) == parse_ts(
        "2026-09-21T12:00:00+00:00", "ts", SPEC, now=2e9
    )


@pytest.mark.parametrize(
    ("raw", "reason", "match"),
    [
        (b"not json", "not_json", "not JSON"),
        (b'{"event_id": "e", "entity_id": "u", "ts": NaN, "data": {}}', "not_finite", "NaN"),
        (b"[1,2]", "not_object", "JSON object"),
        (None, "empty", "no value"),
        (ev(event_id=None), "missing_field", "event_id is missing"),
        (ev(entity_id=3.5), "bad_type", "entity_id must be a string"),
        (ev(ts="yesterday"), "bad_timestamp", "not ISO-8601"),
        (ev(ts=NOW * 1000), "absurd_timestamp", "milliseconds"),
        (ev(ts=10.0), "absurd_timestamp", "scoring.min_ts"),
        (ev(ts=NOW + 10 * 86400), "absurd_timestamp", "max_future"),
        (ev(data={**DATA, "salary": "high"}), "bad_type", "data.salary must be a number"),
        (ev(data={k: v for k, v in DATA.items() if k != "age"}), "missing_field", "data.age"),
        (ev(data=[1]), "bad_type", "data must be an object"),
        (b"{" + b" " * 70_000 + b"}", "too_large", "max_event_bytes"),
    ],
)
def test_bad_events_name_reason_and_fix(raw, reason, match):
    with pytest.raises(InvalidMessage, match=match) as info:
        parse_event(raw, SPEC, now=NOW)
    assert info.value.reason == reason


def test_label_types_follow_task():
    lab = parse_label(b'{"event_id": "e1", "label": 1, "ts": 1789999999}', SPEC, now=NOW)
    assert lab.label == 1 and lab.ts == 1789999999
    with pytest.raises(InvalidMessage, match="label is missing") as info:
        parse_label(b'{"event_id": "e1"}', SPEC, now=NOW)
    assert info.value.reason == "missing_field"
    reg = SPEC.model_copy(update={"task": "regression"})
    with pytest.raises(InvalidMessage, match="regression label must be a number"):
        parse_label(b'{"event_id": "e1", "label": "cat"}', reg, now=NOW)


def test_dead_letter_keeps_original_bytes():
    raw = b"\xff\xfe not utf8"
    dl = DeadLetter("not_json", "garbage", "t", 2, 41, raw, b"k")
    rec = decode_dead_letter(encode_dead_letter(dl))
    assert rec["value"] == raw and rec["key"] == b"k"
    assert (rec["reason"], rec["topic"], rec["partition"], rec["offset"]) == (
        "not_json",
        "t",
        2,
        41,
    )
    assert rec["value_text"] is None
    assert not math.isnan(rec["at"])
