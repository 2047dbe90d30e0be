from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
import yaml

from streams.produce import (
    CHECK_ROWS,
    FieldMismatch,
    SourceError,
    build_messages,
    check_source,
    open_source,
    produce,
)
from weir.contracts import parse_event
from weir.errors import WeirError
from weir.settings import load_settings
from weir.spec import load_spec, parse_spec

SPEC = load_spec("examples/demo.yaml")
NOW = 1_790_000_000.0


def _frame(n: int = 5) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row: dict[str, Any] = {f: float(i + 1) for f in SPEC.fields}
        row.update(event_id=f"f{i}", entity_id=f"u{i % 2}", ts=NOW - 100 + i, label=i % 2)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_file_sources_give_valid_events_and_labels(tmp_path: Path, suffix: str) -> None:
    df = _frame()
    path = tmp_path / f"events{suffix}"
    {
        ".csv": lambda: df.to_csv(path, index=False),
        ".parquet": lambda: df.to_parquet(path),
        ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
    }[suffix]()
    msgs = list(build_messages(SPEC, open_source(str(path)), run_id="r"))
    assert len(msgs) == 5
    for i, (ev, lab, ts) in enumerate(msgs):
        assert ts == NOW - 100 + i
        event = parse_event(ev.value, SPEC, now=NOW)
        assert (event.event_id, event.entity_id, event.ts) == (f"f{i}", f"u{i % 2}", NOW - 100 + i)
        assert event.data["salary"] == float(i + 1) and ev.key == f"u{i % 2}".encode()
        assert lab is not None and orjson.loads(lab.value) == {"event_id": f"f{i}", "label": i % 2}


def test_river_sources_and_drift_preset() -> None:
    rows = list(
        itertools.islice(open_source("river:agrawal-drift?position=100&before=0&after=2&seed=1"), 300)
    )
    assert len(rows) == 300 and set(rows[0][0]) >= set(SPEC.fields)
    msgs = list(build_messages(SPEC, rows, run_id="d", time_step=1.0, start_ts=NOW - 1000, bad_every=100))
    bad = [m for m, lab, _ in msgs if lab is None]
    assert len(bad) == 2  # a malformed message after rows 100 and 200
    good = [parse_event(m.value, SPEC, now=NOW) for m, lab, _ in msgs if lab is not None]
    assert [e.ts for e in good[:3]] == [NOW - 1000, NOW - 999, NOW - 998]


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("river:NoSuchSet", "no River data set 'NoSuchSet'"),
        ("river:agrawal-drift?color=red", "unknown parameter"),
        ("/nope/events.csv", "does not exist"),
    ],
)
def test_bad_sources_say_why(source: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        list(itertools.islice(open_source(source), 1))


def test_unknown_file_type(tmp_path: Path) -> None:
    p = tmp_path / "events.xlsx"
    p.write_text("x")
    with pytest.raises(SourceError, match="unknown file type"):
        open_source(str(p))


# -- source fields matched to the spec's (issue #17) --------------------------------------------

SEA_SPEC = parse_spec(
    yaml.safe_load(
        """
name: sea
task: binary
fields: {"0": numeric, "1": numeric, "2": numeric}
features:
  - {agg: raw, field: "0", name: x0}
  - {agg: raw, field: "1", name: x1}
  - {agg: raw, field: "2", name: x2}
model: {steps: [river.linear_model.LogisticRegression]}
"""
    )
)


@pytest.mark.parametrize("source", ["river:synth.SEA?variant=0&seed=11", "river:sea-drift?position=5"])
def test_integer_keys_are_matched_by_their_string_form(source: str) -> None:
    rows = list(itertools.islice(open_source(source), 20))
    assert set(rows[0][0]) == {0, 1, 2}  # River's SEA keys its features by int
    assert check_source(SEA_SPEC, rows, source) == []
    for ev, lab, _ in build_messages(SEA_SPEC, rows, run_id="s", time_step=1.0, start_ts=NOW - 100):
        event = parse_event(ev.value, SEA_SPEC, now=NOW)
        assert all(isinstance(event.data[f], float) for f in ("0", "1", "2")) and not ev.unfilled
        assert lab is not None


def test_a_required_field_the_source_lacks_fails_before_anything_is_sent() -> None:
    rows = list(itertools.islice(open_source("river:synth.SEA?seed=1"), 5))
    with pytest.raises(FieldMismatch) as info:
        check_source(SPEC, rows, "river:synth.SEA?seed=1")
    text = str(info.value)
    assert "requires field(s) 'salary', 'commission'" in text  # the missing fields
    assert "the source's fields are '0', '1', '2'" in text  # what the source has
    assert "Fix: name the spec's fields after the source's" in text and "required: false" in text
    assert isinstance(info.value, WeirError)
    # produce() checks before it builds a producer: an unreachable broker is never tried.
    settings = load_settings(kafka_bootstrap="127.0.0.1:1")
    with pytest.raises(FieldMismatch, match="'salary'"):
        produce(SPEC, settings, "river:synth.SEA?seed=1", limit=10, progress=False)


def test_a_field_the_spec_does_not_declare_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    rows = list(itertools.islice(open_source("river:synth.Agrawal?seed=1"), 50))
    spec = parse_spec(
        {
            "name": "few",
            "task": "binary",
            "fields": {"salary": "numeric", "age": "numeric"},
            "features": [{"agg": "raw", "field": "salary"}],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )
    with caplog.at_level(logging.WARNING, logger="weir.produce"):
        unused = check_source(spec, rows, "river:synth.Agrawal?seed=1")
    assert unused == ["commission", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'commission'" in warnings[0].getMessage()


def _csv(tmp_path: Path, rows: list[dict[str, Any]]) -> str:
    path = tmp_path / "events.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_first_rows_that_all_miss_a_required_field_are_an_error(tmp_path: Path) -> None:
    rows = [{**{f: 1.0 for f in SPEC.fields}, "salary": None, "label": 1} for _ in range(1500)]
    source = _csv(tmp_path, rows)
    with pytest.raises(FieldMismatch, match=r"the first 1000 rows .* all leave a required field empty"):
        check_source(SPEC, list(itertools.islice(open_source(source), CHECK_ROWS)), source)
    # numbers where a category is expected are fine; words where a number is expected are not
    words = [{**{f: 1.0 for f in SPEC.fields}, "age": "old", "label": 0} for _ in range(10)]
    with pytest.raises(FieldMismatch, match="'age' in 10 rows"):
        check_source(SPEC, list(open_source(_csv(tmp_path, words))), "words")


def test_rows_the_source_cannot_fill_are_counted(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{**{f: 1.0 for f in SPEC.fields}, "label": 1} for _ in range(4)]
    rows[1]["salary"] = None
    rows[3]["loan"] = float("nan")
    source = _csv(tmp_path, rows)
    head = list(open_source(source))
    assert check_source(SPEC, head, source) == []  # some rows fill every field
    msgs = list(build_messages(SPEC, head, run_id="u", time_step=1.0, start_ts=NOW - 10))
    assert [m.unfilled for m, _, _ in msgs] == [(), ("salary",), (), ("loan",)]
    assert orjson.loads(msgs[1][0].value)["data"]["salary"] is None


def test_events_carry_the_spec_entity_field(tmp_path: Path) -> None:
    """``entity_field: customer``: the file's customer column is the event's entity and key."""
    spec = SPEC.model_copy(update={"entity_field": "customer"})
    rows = [{**{f: 2.0 for f in SPEC.fields}, "customer": 1000 + i % 2, "label": 0} for i in range(4)]
    source = _csv(tmp_path, rows)
    head = list(open_source(source))
    assert check_source(spec, head, source) == []  # the id column is not an unused field
    for i, (ev, _, _) in enumerate(build_messages(spec, head, run_id="e", time_step=1.0, start_ts=NOW - 9)):
        obj = orjson.loads(ev.value)
        assert "entity_id" not in obj and obj["customer"] == str(1000 + i % 2)
        assert parse_event(ev.value, spec, now=NOW).entity_id == str(1000 + i % 2)
        assert ev.key == str(1000 + i % 2).encode()
    # a River source has no entity column: ids are spread over `entities`
    river = list(itertools.islice(open_source("river:synth.Agrawal?seed=2"), 3))
    for i, (ev, _, _) in enumerate(
        build_messages(spec, river, run_id="a", entities=2, time_step=1.0, start_ts=NOW - 9)
    ):
        assert parse_event(ev.value, spec, now=NOW).entity_id == f"c{i % 2}"
