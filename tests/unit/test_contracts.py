from __future__ import annotations

import base64
import hashlib
import math

import orjson
import pytest

from weir.contracts import (
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_MAX_KEY_BYTES,
    DEAD_LETTER_MAX_TEXT_CHARS,
    DEAD_LETTER_MAX_VALUE_BYTES,
    dead_letter_key,
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


# -- dead letters always fit their topic (issue #11) -------------------------------------------

KAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_048_588


@pytest.mark.parametrize("size", [1_000_000, 10_000_000])
def test_a_huge_original_gives_a_dead_letter_under_the_cap(size: int) -> None:
    raw = (b'{"pad": "' + b"x" * size)[:size]
    dl = DeadLetter("too_large", "message is too large", "weir.p.events", 3, 1234, raw, b"k", 1.0)
    encoded = encode_dead_letter(dl)
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES < KAFKA_DEFAULT_MESSAGE_MAX_BYTES
    rec = decode_dead_letter(encoded)
    assert rec["value_sha256"] == hashlib.sha256(raw).hexdigest()
    assert rec["value_size"] == size and rec["truncated"] is True
    assert rec["value"] == raw[:DEAD_LETTER_MAX_VALUE_BYTES]
    assert (rec["topic"], rec["partition"], rec["offset"]) == ("weir.p.events", 3, 1234)
    assert rec["reason"] == "too_large" and rec["detail"] == "message is too large"
    assert rec["value_text"] == raw[:DEAD_LETTER_MAX_TEXT_CHARS].decode()


def test_a_small_original_is_still_copied_whole() -> None:
    raw = b'{"event_id": "e1", "data": {}}'
    rec = decode_dead_letter(encode_dead_letter(DeadLetter("missing_field", "d", "t", 0, 7, raw, b"u1")))
    assert rec["value"] == raw and rec["key"] == b"u1" and rec["truncated"] is False
    assert rec["value_size"] == len(raw) and rec["value_sha256"] == hashlib.sha256(raw).hexdigest()
    assert rec["value_text"] == raw.decode()


def test_every_part_is_capped_whatever_the_input() -> None:
    """Worst cases for the JSON size: control characters (escaped as \\u00XX), a huge key,
    a huge detail; and a multi-byte character cut at the copy's end."""
    nasty = "\x01" * 3_000_000
    dl = DeadLetter("r" * 10_000, nasty, "t" * 10_000, 0, 1, nasty.encode(), b"\x02" * 2_000_000)
    encoded = encode_dead_letter(dl)
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES
    rec = decode_dead_letter(encoded)
    assert len(rec["key"]) == DEAD_LETTER_MAX_KEY_BYTES and rec["truncated"] is True
    assert len(rec["detail"]) == DEAD_LETTER_MAX_TEXT_CHARS and rec["detail"].endswith("…")
    assert dead_letter_key(dl) == b"\x02" * DEAD_LETTER_MAX_KEY_BYTES
    euro = ("€" * 100_000).encode()  # 3 bytes each: the copies end mid-character
    rec = decode_dead_letter(encode_dead_letter(DeadLetter("r", "d", "t", 0, 1, euro)))
    assert rec["value_text"] == "€" * DEAD_LETTER_MAX_TEXT_CHARS
    assert rec["value"] == euro[:DEAD_LETTER_MAX_VALUE_BYTES]


def test_a_dead_letter_written_before_the_cap_still_decodes() -> None:
    raw = b"this is not json"
    old = orjson.dumps(
        {
            "reason": "not_json",
            "detail": "d",
            "topic": "t",
            "partition": 0,
            "offset": 5,
            "key_b64": base64.b64encode(b"k").decode(),
            "value_b64": base64.b64encode(raw).decode(),
            "value_text": raw.decode(),
            "at": 1.0,
        }
    )
    rec = decode_dead_letter(old)
    assert rec["value"] == raw and rec["key"] == b"k" and rec["truncated"] is False
    assert rec["value_size"] == len(raw) and rec["value_sha256"] == hashlib.sha256(raw).hexdigest()


def test_label_dead_letters_use_the_same_capped_record() -> None:
    from models.join import dead_letter

    raw = b"y" * 2_000_000
    encoded = dead_letter("label_type", "bad label", "weir.p.labels", 0, 9, raw, None)
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES
    rec = decode_dead_letter(encoded)
    assert rec["value_size"] == len(raw) and rec["truncated"] is True and rec["key"] is None


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_is_not_json_not_a_crash(opener: bytes) -> None:
    """Nesting past orjson's limit once crashed the score agent with RecursionError."""
    from weir.contracts import _loads

    closer = b"]" if opener == b"[" else b"}"
    raw = opener * 20_000 + b"1" + closer * 20_000
    with pytest.raises(InvalidMessage, match="deeper than 1024 levels") as info:
        _loads(raw)
    assert info.value.reason == "not_json"
    # Deep and broken too: still a dead letter, never a RecursionError.
    with pytest.raises(InvalidMessage) as info2:
        _loads(b"[" * 5_000 + b"x")
    assert info2.value.reason == "not_json"
