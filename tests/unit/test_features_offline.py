"""The offline engine on tiny streams whose every feature value is computed by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from features.offline import compute_offline, isclose
from weir.errors import FeatureError
from weir.spec import PipelineSpec, parse_spec

N = None


def _spec(**over: Any) -> PipelineSpec:
    raw: dict[str, Any] = {
        "name": "hand",
        "task": "binary",
        "fields": {
            "x": {"type": "numeric", "required": False},
            "c": {"type": "categorical", "required": False},
            "b": {"type": "boolean", "required": False},
        },
        "lateness": 10,
        "features": [
            {"agg": "count", "window": 60, "name": "n"},
            {"agg": "count", "field": "x", "window": 60, "name": "x_n"},
            {"agg": "sum", "field": "x", "window": 60, "name": "x_sum"},
            {"agg": "mean", "field": "x", "window": 60, "name": "x_mean"},
            {"agg": "min", "field": "x", "window": 60, "name": "x_min"},
            {"agg": "max", "field": "x", "window": 60, "name": "x_max"},
            {"agg": "std", "field": "x", "window": 60, "name": "x_std"},
            {"agg": "last", "field": "x", "window": 60, "name": "x_last"},
            {"agg": "distinct", "field": "x", "window": 60, "name": "x_distinct"},
            {"agg": "last", "field": "c", "window": 60, "name": "c_last"},
            {"agg": "distinct", "field": "c", "window": 60, "name": "c_distinct"},
            {"agg": "mean", "field": "b", "window": 60, "name": "b_mean"},
            {"agg": "since_prev", "window": 60, "name": "gap"},
            {"agg": "raw", "field": "x", "name": "x_raw"},
            {"agg": "raw", "field": "c", "name": "c_raw"},
            {"agg": "raw", "field": "b", "name": "b_raw"},
            {"agg": "count", "window": 30, "name": "n_30s"},
        ],
        "model": {"steps": ["river.linear_model.LogisticRegression"]},
    }
    raw.update(over)
    return parse_spec(raw)


# Arrival order. One entity, lateness 10 s, windows (ts - 60, ts] and (ts - 30, ts].
EVENTS = [
    # id   ts     x    c     b
    ("a", 100.0, 1.0, "a", True),
    ("b", 130.0, 2.0, N, False),
    ("c", 125.0, 4.0, "b", N),  # out of order within lateness: b (130) is its future
    ("b", 130.0, 9.9, "zz", True),  # redelivered (even with other data): first features
    ("d", 110.0, 8.0, "d", True),  # late: 110 < 130 - 10
    ("e", 190.0, N, "a", True),  # no x in its window: sum 0, mean..last None
    ("f", 190.0, 3.0, "z", N),  # same ts as e: arrival breaks the tie
    ("g", 190.0, 6.0, N, False),
    ("h", 185.0, 2.0, "q", True),  # 185 >= 190 - 10: accepted; sees b (130) only
    ("d", 110.0, 8.0, "d", True),  # a late event redelivered is still late
]
COLUMNS = ["n", "x_n", "x_sum", "x_mean", "x_min", "x_max", "x_std", "x_last", "x_distinct"]
COLUMNS += ["c_last", "c_distinct", "b_mean", "gap", "x_raw", "c_raw", "b_raw", "n_30s"]
#        n  x_n sum  mean min max std  last dist c_last c_dist b_mean gap  x   c    b    n30
ROW_A = [1, 1, 1.0, 1.0, 1, 1, 0.0, 1.0, 1, "a", 1, 1.0, N, 1.0, "a", 1.0, 1]
ROW_B = [2, 2, 3.0, 1.5, 1, 2, 0.5, 2.0, 2, "a", 1, 0.5, 30.0, 2.0, N, 0.0, 1]
EXPECTED: list[tuple[str, list[Any] | None]] = [
    ("ok", ROW_A),
    ("ok", ROW_B),
    ("ok", [2, 2, 5.0, 2.5, 1, 4, 1.5, 4.0, 2, "b", 2, 1.0, 25.0, 4.0, "b", N, 2]),
    ("duplicate", ROW_B),
    ("late", None),
    ("ok", [1, 0, 0.0, N, N, N, N, N, 0, "a", 1, 1.0, N, N, "a", 1.0, 1]),
    ("ok", [2, 1, 3.0, 3.0, 3, 3, 0.0, 3.0, 1, "z", 2, 1.0, 0.0, 3.0, "z", N, 2]),
    ("ok", [3, 2, 9.0, 4.5, 3, 6, 1.5, 6.0, 2, "z", 2, 0.5, 0.0, 6.0, N, 0.0, 3]),
    ("ok", [2, 2, 4.0, 2.0, 2, 2, 0.0, 2.0, 1, "q", 1, 0.5, 55.0, 2.0, "q", 1.0, 1]),
    ("late", None),
]


def _frame(rows: list[tuple[Any, ...]], entity: str = "u") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [r[0] for r in rows],
            "entity_id": [entity] * len(rows),
            "ts": [r[1] for r in rows],
            "x": [r[2] for r in rows],
            "c": pd.Series([r[3] for r in rows], dtype=object),
            "b": pd.Series([r[4] for r in rows], dtype=object),
        }
    )


def test_every_aggregate_by_hand() -> None:
    out = compute_offline(_spec(), _frame(EVENTS))
    assert out["status"].tolist() == [s for s, _ in EXPECTED]
    for i, (_status, row) in enumerate(EXPECTED):
        for name, want in zip(COLUMNS, row or [N] * len(COLUMNS), strict=True):
            got = out[name].iat[i]
            assert isclose(got, want, tol=1e-12), (EVENTS[i][0], name, got, want)
    # Undefined numbers are NaN, undefined strings None; strings stay objects.
    assert out["c_raw"].dtype == object and out["c_raw"].iat[1] is None
    assert math.isnan(out["x_mean"].iat[5])


def test_entities_do_not_mix_and_index_is_kept() -> None:
    rows = [("p", 100.0, 1.0, "a", True), ("q", 101.0, 5.0, "b", False)]
    frame = pd.concat([_frame(rows[:1], "u1"), _frame(rows[1:], "u2")])
    frame.index = pd.Index([10, 20])
    out = compute_offline(_spec(), frame)
    assert out.index.tolist() == [10, 20]
    assert out["n"].tolist() == [1.0, 1.0]
    assert out["x_sum"].tolist() == [1.0, 5.0]
    assert out["gap"].isna().all()


def test_lateness_boundary_is_inclusive() -> None:
    # watermark 130, lateness 10: ts 120 is accepted, 119.5 is late.
    rows = [("a", 130.0, 1.0, N, N), ("b", 120.0, 1.0, N, N), ("c", 119.5, 1.0, N, N)]
    out = compute_offline(_spec(), _frame(rows))
    assert out["status"].tolist() == ["ok", "ok", "late"]
    zero = compute_offline(_spec(lateness=0), _frame(rows))
    assert zero["status"].tolist() == ["ok", "late", "late"]


def test_window_boundaries_and_negative_zero() -> None:
    # (ts - 60, ts]: an event exactly 60 s older is out; -0.0 and 0.0 are one distinct value.
    rows = [
        ("a", 100.0, 0.0, N, N),
        ("b", 160.0, -0.0, N, N),  # a is exactly 60 s older: out
        ("c", 159.9, 7.0, N, N),  # sees a, not b (its future)
        ("d", 161.0, 0.0, N, N),  # sees b, c and itself
    ]
    out = compute_offline(_spec(), _frame(rows))
    assert out["n"].tolist() == [1.0, 1.0, 2.0, 3.0]
    assert out["x_distinct"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert out["x_last"].tolist() == [0.0, 0.0, 7.0, 0.0]
    gap = out["gap"].tolist()
    assert math.isnan(gap[1]) and gap[2:] == [pytest.approx(59.9, abs=1e-12), 1.0]


def test_empty_input() -> None:
    out = compute_offline(_spec(), _frame([]))
    assert len(out) == 0 and "status" in out.columns and "x_sum" in out.columns


def _required_spec() -> PipelineSpec:
    return _spec(fields={"x": "numeric", "c": {"type": "categorical", "required": False}, "b": "boolean"})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f: f.drop(columns="ts"), r"events has no column 'ts'"),
        (lambda f: f.assign(ts=[1.0, np.nan]), r"column 'ts' must be finite numbers, got nan"),
        (lambda f: f.assign(ts=["x", "y"]), r"column 'ts' must be epoch seconds"),
        (lambda f: f.assign(x=[1.0, None]), r"event 'b': required field 'x' is missing"),
        (lambda f: f.drop(columns="x"), r"no column 'x' but field 'x' is required"),
        (lambda f: f.assign(x=[1.0, "2"]), r"field 'x' is numeric and must hold numbers, got '2'"),
        (lambda f: f.assign(x=[1.0, np.inf]), r"field 'x' must hold finite numbers, got inf"),
        (
            lambda f: f.assign(c=pd.Series(["a", 3], dtype=object)),
            r"field 'c' is categorical and must hold strings, got 3",
        ),
        (
            lambda f: f.assign(b=pd.Series([True, "yes"], dtype=object)),
            r"field 'b' is boolean and must hold true/false, got 'yes'",
        ),
    ],
)
def test_bad_input_names_the_fault(change: Any, match: str) -> None:
    frame = _frame([("a", 100.0, 1.0, "a", True), ("b", 101.0, 2.0, N, False)])
    with pytest.raises(FeatureError, match=match):
        compute_offline(_required_spec(), change(frame))


def test_optional_field_column_may_be_absent() -> None:
    out = compute_offline(_spec(), _frame([("a", 100.0, 1.0, "a", True)]).drop(columns="c"))
    assert out["c_distinct"].tolist() == [0.0] and out["c_last"].tolist() == [None]


def test_many_rows_vectorised_path() -> None:
    # Speed is measured in bench/features.py, not here; this checks the large-frame path.
    rng = np.random.default_rng(0)
    n = 20_000
    frame = pd.DataFrame(
        {
            "event_id": np.arange(n).astype(str),
            "entity_id": rng.integers(0, 1000, n).astype(str),
            "ts": 1.7e9 + np.arange(n) - rng.uniform(0, 20, n) * (rng.random(n) < 0.1),
            "x": rng.normal(size=n),
            "c": rng.choice(["a", "b", "c"], n).astype(object),
            "b": (rng.random(n) < 0.5).astype(object),
        }
    )
    out = compute_offline(_spec(), frame)
    assert len(out) == n and (out["status"] == "ok").mean() > 0.95
    assert set(out["status"]) <= {"ok", "late", "duplicate"}
