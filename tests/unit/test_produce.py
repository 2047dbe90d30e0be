from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from streams.contracts import parse_event
from streams.produce import SourceError, build_messages, open_source
from weir.spec import load_spec

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
