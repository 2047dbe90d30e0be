"""One contract over every aggregate: the engines agree with a naive reference.

The reference below is the definition in docs/features.md written as plainly as possible
(a loop over the entity's earlier-arrived events per event). Every aggregate of
``weir.spec.Agg``, on every field type it accepts, runs through the offline engine on a
seeded messy stream and must match it; the Lua script must have code for each of them.
(Online == offline on the real Redis is tests/integration/test_features_parity.py.)
"""

from __future__ import annotations

import math
import random
from typing import Any, get_args

import pandas as pd
import pytest

from features.base import FeatureResult, to_model_input
from features.lua import build_script
from features.offline import compute_offline, isclose
from weir.spec import FIELDLESS_AGGS, NUMERIC_AGGS, Agg, FeatureSpec, PipelineSpec, parse_spec

FIELDS = {
    "num": {"type": "numeric", "required": False},
    "cat": {"type": "categorical", "required": False},
    "flag": {"type": "boolean", "required": False},
}


def _cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for agg in get_args(Agg):
        if agg in FIELDLESS_AGGS:
            cases.append((agg, None))
        if agg in FIELDLESS_AGGS - {"count"}:
            continue
        for field, fs in FIELDS.items():
            if fs["type"] == "categorical" and agg in NUMERIC_AGGS:
                continue
            cases.append((agg, field))
    return cases


CASES = _cases()


def _spec(agg: str, field: str | None) -> PipelineSpec:
    windows = [None] if agg == "raw" else [30.0, 600.0]
    features = [{"agg": agg, "field": field, "window": w} for w in windows]
    return parse_spec(
        {
            "name": "contract",
            "task": "binary",
            "fields": FIELDS,
            "features": [{k: v for k, v in f.items() if v is not None} for f in features],
            "lateness": 20,
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def _stream(seed: int, n: int = 400) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    clock = 1000.0
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if rows and rng.random() < 0.06:
            rows.append(dict(rng.choice(rows)))  # redelivery
            continue
        clock += rng.choice([0.0, 1.0, 2.5, 9.0])
        ts = clock - (rng.uniform(0, 40) if rng.random() < 0.2 else 0.0)
        rows.append(
            {
                "event_id": f"e{i}",
                "entity_id": f"u{rng.randrange(5)}",
                "ts": float(round(ts, 1)),
                "num": None if rng.random() < 0.2 else rng.choice([-1.5, 0.0, 2.0, rng.gauss(0, 9)]),
                "cat": None if rng.random() < 0.2 else rng.choice(["a", "b", "c|d", ""]),
                "flag": None if rng.random() < 0.2 else rng.random() < 0.5,
            }
        )
    return rows


def _reference_value(f: FeatureSpec, window: list[dict[str, Any]], me: dict[str, Any]) -> Any:
    """The definition, naively. ``window`` is in arrival order and ends with ``me``."""
    if f.agg == "raw":
        assert f.field is not None
        return _as_value(me[f.field])
    if f.agg == "since_prev":
        others = [e["ts"] for e in window[:-1]]
        return me["ts"] - max(others) if others else None
    if f.field is None:
        return float(len(window))
    present = [(e["ts"], k, _as_value(e[f.field])) for k, e in enumerate(window)]
    present = [p for p in present if p[2] is not None]
    vals = [p[2] for p in present]
    if f.agg == "count":
        return float(len(vals))
    if f.agg == "distinct":
        return float(len(set(vals)))
    if f.agg == "sum":
        return float(sum(vals))
    if not vals:
        return None
    if f.agg == "last":
        return max(present, key=lambda p: (p[0], p[1]))[2]
    if f.agg == "mean":
        return sum(vals) / len(vals)
    if f.agg == "min":
        return min(vals)
    if f.agg == "max":
        return max(vals)
    if f.agg == "std":
        m = sum(vals) / len(vals)
        return math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    raise AssertionError(f"no reference for {f.agg}")


def _as_value(v: Any) -> Any:
    if v is None or isinstance(v, str):
        return v
    return float(v) + 0.0


def reference(spec: PipelineSpec, rows: list[dict[str, Any]]) -> list[FeatureResult]:
    accepted: dict[str, list[dict[str, Any]]] = {}
    served: dict[str, FeatureResult] = {}
    out: list[FeatureResult] = []
    for row in rows:
        if row["event_id"] in served:
            out.append(FeatureResult("duplicate", served[row["event_id"]].features))
            continue
        mine = accepted.setdefault(row["entity_id"], [])
        if mine and row["ts"] < max(e["ts"] for e in mine) - spec.lateness:
            out.append(FeatureResult("late", None))
            continue
        fv = {}
        for f in spec.features:
            w = f.window or 0.0
            window = [e for e in mine if row["ts"] - w < e["ts"] <= row["ts"]] + [row]
            fv[f.name] = _reference_value(f, window, row)
        mine.append(row)
        served[row["event_id"]] = FeatureResult("ok", fv)
        out.append(served[row["event_id"]])
    return out


@pytest.mark.parametrize(("agg", "field"), CASES, ids=[f"{a}-{f}" for a, f in CASES])
@pytest.mark.parametrize("seed", [1, 2])
def test_offline_matches_the_definition(agg: str, field: str | None, seed: int) -> None:
    spec = _spec(agg, field)
    rows = _stream(seed)
    want = reference(spec, rows)
    frame = pd.DataFrame(rows)
    for col in ("cat", "flag"):
        frame[col] = pd.Series([r[col] for r in rows], dtype=object)
    got = compute_offline(spec, frame)
    statuses = [r.status for r in want]
    assert got["status"].tolist() == statuses
    assert {"ok", "duplicate", "late"} <= set(statuses)
    for name in spec.feature_names:
        col = got[name].tolist()
        for i, r in enumerate(want):
            expected = None if r.features is None else r.features[name]
            assert isclose(col[i], expected, tol=1e-12), (i, name, col[i], expected)


def test_the_contract_covers_every_aggregate() -> None:
    assert {a for a, _ in CASES} == set(get_args(Agg))


@pytest.mark.parametrize(("agg", "field"), CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_lua_script_has_every_aggregate(agg: str, field: str | None) -> None:
    script = build_script(_spec(agg, field))
    assert "out[1] =" in script and "return 'o|' .. fv" in script
    if agg not in ("raw", "since_prev") and not (agg == "count" and field is None):
        assert f"A.{agg}(" in script


def test_to_model_input_drops_undefined() -> None:
    fv = {"a": 1.0, "b": None, "c": "fr", "d": 0.0}
    assert to_model_input(fv) == {"a": 1.0, "c": "fr", "d": 0.0}
