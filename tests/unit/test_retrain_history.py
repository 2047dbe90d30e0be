"""The pure parts of the durable retrain (#16.4) and the fair shadow (#16.5): window
bounds, progress, the save token, the pending serve-time predictions, backfill's
examples and time options, the spec's retrain.window_seconds."""

from __future__ import annotations

import logging

import pytest

from models.retrain import retrain_token
from models.shadow import PendingPredictions
from streams.history import History, Progress, window_bounds
from weir.commands.backfill import backfill_records, parse_time
from weir.errors import SpecError
from weir.spec import RetrainSpec, parse_spec
from weir.types import Event, Label


def test_window_bounds_end_at_what_the_trigger_saw() -> None:
    marks = {0: (0, 1000), 1: (500, 700), 2: (10, 10), 3: (0, 5)}
    # partition 0: seen up to 900; 1: seen past its end (capped); 2: empty; 3: unseen.
    b = window_bounds(marks, {0: 900, 1: 800, 2: 10}, count=300)
    assert b == {0: [600, 900], 1: [500, 700], 2: [10, 10], 3: [0, 5]}
    # An offset below the low watermark (retention deleted it) reads nothing there.
    assert window_bounds({0: (100, 200)}, {0: 50}, count=10) == {0: [100, 100]}


def test_progress_logs_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    quiet = Progress(100, "reading t", tty=False)
    quiet.update(100)
    assert not quiet.active
    p = Progress(40_000, "reading t", every=0.0, tty=False)
    with caplog.at_level(logging.INFO, logger="weir.retrain"):
        p.update(10_000)
    assert p.active and "reading t: 10000/40000 records" in caplog.text and "ETA" in caplog.text
    p.close()


def test_history_lineage_names_window_offsets_and_span() -> None:
    h = History("tl", [{"ts": 5.0}, {"ts": 2.0}, {"event_id": "no ts"}], offsets={1: [3, 6]}, count=10)
    lin = h.lineage()
    assert lin["offsets"] == {"1": [3, 6]} and (lin["first_ts"], lin["last_ts"]) == (2.0, 5.0)
    assert lin["source"] == "kafka" and lin["records_read"] == 3


def test_retrain_token_is_the_same_for_a_replayed_retrain_only() -> None:
    spec = RetrainSpec()
    a = retrain_token("p", "performance", 2, {0: 10, 1: 4}, spec)
    assert a == retrain_token("p", "performance", 2, {1: 4, 0: 10}, spec)
    others = {
        retrain_token("p", "manual", 2, {0: 10, 1: 4}, spec),
        retrain_token("p", "performance", 3, {0: 10, 1: 4}, spec),
        retrain_token("p", "performance", 2, {0: 11, 1: 4}, spec),
        retrain_token("p", "performance", 2, {0: 10, 1: 4}, RetrainSpec(window_seconds=60)),
    }
    assert a not in others and len(others) == 4


def test_pending_predictions_are_bounded_by_count_and_horizon() -> None:
    p = PendingPredictions(max_items=3, horizon=100.0)
    assert [p.add(f"e{i}", 1000.0 + i, i) for i in range(5)] == [True, True, True, False, False]
    assert p.refused == 2 and len(p) == 3
    assert p.add("e0", 1000.0, 99) is False  # a redelivered prediction: the first stands
    assert p.pop("e0") == (True, 0) and p.pop("e0") == (False, None)
    assert p.add("e5", 1101.5, 5)  # e1 (1001) is beyond the horizon behind it: expired
    assert p.expired == 1 and sorted(p.items) == ["e2", "e5"]
    with pytest.raises(ValueError, match="max_items"):
        PendingPredictions(max_items=0)


def test_window_seconds_is_validated_with_the_fix() -> None:
    assert RetrainSpec(window_seconds="24h").window_seconds == 86_400.0
    with pytest.raises(ValueError, match=r"retrain.window_seconds must be > 0.*window_labels"):
        RetrainSpec(window_seconds=0)


def test_backfill_time_options() -> None:
    assert parse_time("1700000000.5", "--from") == 1_700_000_000.5
    assert parse_time("2023-11-14T22:13:20+00:00", "--to") == 1_700_000_000.0
    assert parse_time("30m", "--from", now=10_000.0) == 8_200.0
    with pytest.raises(SpecError, match=r"--from 'yesterday' is not a time.*24h"):
        parse_time("yesterday", "--from")


def test_backfill_records_are_labelled_ok_first_deliveries_in_the_window() -> None:
    spec = parse_spec(
        {
            "name": "bf",
            "task": "binary",
            "fields": {"x": "numeric"},
            "lateness": 10,
            "features": [{"agg": "raw", "field": "x"}, {"agg": "sum", "field": "x", "window": 60}],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )
    events = [
        Event("a", "u", 100.0, {"x": 1.0}),
        Event("b", "u", 110.0, {"x": 2.0}),
        Event("b", "u", 110.0, {"x": 2.0}),  # redelivered
        Event("c", "u", 50.0, {"x": 4.0}),  # late
        Event("d", "u", 120.0, {"x": 8.0}),
        Event("e", "u", 130.0, {"x": 16.0}),  # no label
    ]
    labels = {k: Label(k, True, 200.0) for k in "abcd"}
    out = backfill_records(spec, events, labels, t_from=105.0, t_to=130.0)
    assert [(r["event_id"], r["features"]) for r in out] == [
        ("b", {"x": 2.0, "x_sum_1m": 3.0}),
        ("d", {"x": 8.0, "x_sum_1m": 11.0}),
    ]
    assert out[0]["prediction"] is None and out[0]["model_version"] == "backfill"


def test_backfill_is_a_command() -> None:
    from weir.cli import build_parser

    args = build_parser().parse_args(["backfill", "p.yaml", "--from", "24h", "--to", "1h", "--fit"])
    assert (args.t_from, args.t_to, args.fit) == ("24h", "1h", True)
