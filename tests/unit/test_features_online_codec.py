"""The online engine's Python side without Redis: keys, tokens, replies, bad events."""

from __future__ import annotations

from typing import Any

import pytest

from features.base import dedupe_seconds, entity_ttl
from features.online import RedisFeatureStore, _escape, _unescape
from weir.errors import FeatureError
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event


def _spec() -> PipelineSpec:
    return parse_spec(
        {
            "name": "codec",
            "task": "binary",
            "fields": {
                "x": "numeric",
                "c": {"type": "categorical", "required": False},
                "b": {"type": "boolean", "required": False},
            },
            "features": [
                {"agg": "raw", "field": "x"},
                {"agg": "raw", "field": "c"},
                {"agg": "last", "field": "c", "window": "1h"},
                {"agg": "mean", "field": "b", "window": "1d"},
            ],
            "lateness": "30s",
            "labels": {"horizon": "2h"},
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )


@pytest.mark.parametrize("s", ["", "plain", "a|b", "%", "%25", "%7C", "|%|", "%%7C|", "ü|€"])
def test_escape_round_trips_and_has_no_separator(s: str) -> None:
    assert "|" not in _escape(s)
    assert _unescape(_escape(s)) == s


def _lp(*parts: str) -> str:
    """Length-prefixed strings, lengths in UTF-8 bytes (the batch layout of features.lua)."""
    return "".join(f"{len(p.encode())}:{p}" for p in parts)


def test_commands_encode_the_batch_in_one_call_with_exact_tokens() -> None:
    store = RedisFeatureStore(_spec())
    (cmd,) = store._commands(
        [
            Event("e1", "u:1", 1.7e9, {"x": 0.1, "c": "a|b", "b": True}),
            Event("e2", "u", 5, {"x": -0.0, "c": None, "b": False}),
        ]
    )
    # One declared key, in the pipeline's hash slot (a Redis Cluster routes the call by it).
    assert cmd[:5] == ("EVALSHA", store.sha, 1, "weir:{codec}:applied", "weir:{codec}")
    # Per event: entity, event id, "ts|tokens", position; ints become floats, -0.0 is 0.0.
    assert cmd[5] == _lp("u:1", "e1", "1700000000.0|0.1|sa%7Cb|1", "", "u", "e2", "5.0|0.0||0", "")
    assert cmd[5].startswith("3:u:12:e125:1700000000.0|")
    # With their Kafka positions, the redeliveries are recognised by offset.
    events = [Event("e1", "u", 1.0, {"x": 1.0})]
    (cmd,) = store._commands(events, [("events", 3, 42)])
    assert cmd[5] == _lp("u", "e1", "1.0|1.0||", "events:3|42")
    with pytest.raises(FeatureError, match=r"one \(topic, partition, offset\) per event: got 0 for 1"):
        store._commands(events, [])


def test_lengths_are_in_bytes_so_ids_may_hold_any_character() -> None:
    store = RedisFeatureStore(_spec())
    (cmd,) = store._commands([Event("é:|\n9:", "ü", 1.0, {"x": 1.0, "c": "€"})])
    assert cmd[5] == "2:ü7:é:|\n9:13:1.0|1.0|s€|0:"


def test_decode_replies() -> None:
    store = RedisFeatureStore(_spec())
    ok = store._decode(b"o|0.10000000000000001|sa%7Cb|s|0.5")
    assert ok.status == "ok"
    assert ok.features == {"x": 0.1, "c": "a|b", "c_last_1h": "", "b_mean_1d": 0.5}
    dup = store._decode("d|3|||")
    assert dup.status == "duplicate"
    assert dup.features == {"x": 3.0, "c": None, "c_last_1h": None, "b_mean_1d": None}
    late = store._decode(b"l")
    assert late.status == "late" and late.features is None


def test_ttls_follow_the_spec() -> None:
    spec = _spec()
    assert entity_ttl(spec) == 86_400 + 30 + 300
    assert dedupe_seconds(spec) == 120  # scoring.dedupe_horizon: not the horizon, not the 1-day window


@pytest.mark.parametrize(
    ("data", "ts", "match"),
    [
        ({"c": "a"}, 1.0, r"event 'e': required field 'x' is missing"),
        ({"x": "1"}, 1.0, r"field 'x' is numeric and must be a finite number, got '1'"),
        ({"x": float("inf")}, 1.0, r"field 'x' is numeric .* got inf"),
        ({"x": 1.0, "c": 3}, 1.0, r"field 'c' is categorical and must be a string, got 3"),
        ({"x": 1.0, "b": "yes"}, 1.0, r"field 'b' is boolean and must be true or false"),
        ({"x": 1.0}, float("nan"), r"event 'e': ts must be finite, got nan"),
        ({"x": 1.0}, "soon", r"event 'e': ts must be epoch seconds \(a number\), got 'soon'"),
    ],
)
def test_bad_events_are_refused_before_anything_runs(data: dict[str, Any], ts: Any, match: str) -> None:
    store = RedisFeatureStore(_spec())
    with pytest.raises(FeatureError, match=match):
        store._commands([Event("ok", "u", 1.0, {"x": 1.0}), Event("e", "u", ts, data)])


def test_nan_is_missing_for_optional_fields() -> None:
    store = RedisFeatureStore(_spec())
    nan = float("nan")
    (cmd,) = store._commands([Event("e", "u", 1.0, {"x": 2, "c": nan, "b": nan})])
    assert cmd[5] == _lp("u", "e", "1.0|2.0||", "")


def test_script_is_deterministic_and_bakes_the_spec() -> None:
    a, b = RedisFeatureStore(_spec()), RedisFeatureStore(_spec())
    assert a.sha == b.sha and len(a.sha) == 40
    assert "wm - 30.0" in a.script and "math.floor(now / 120)" in a.script  # lateness, dedupe_horizon
    assert repr(a) == "RedisFeatureStore(spec='codec')"


def test_store_is_a_feature_engine() -> None:
    from features.base import FeatureEngine

    engine: FeatureEngine = RedisFeatureStore(_spec())
    assert engine.spec.name == "codec"
