"""Feature freshness without Redis: the definition on a hand-computed stream, the reply
decoding, the prediction record (version 2), the scorer's record and histogram, the
metrics' staleness thresholds. The online script is held to the same reference on the
real Redis by tests/integration/test_features_parity.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import orjson
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from features.base import FeatureResult
from features.freshness import freshness_names, histogram_ages, offline_freshness, stale_after, windows
from features.lua import build_script
from features.online import RedisFeatureStore
from streams.scoring import RawMessage, Scorer
from tests.unit.doubles import StaticModel
from weir.contracts import decode_prediction, encode_prediction
from weir.metrics import WorkerMetrics
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event, Prediction

N = None
NAN = math.nan


def _spec() -> PipelineSpec:
    return parse_spec(
        {
            "name": "fresh",
            "task": "binary",
            "fields": {
                "x": {"type": "numeric", "required": False},
                "c": {"type": "categorical", "required": False},
            },
            "lateness": 10,
            "features": [
                {"agg": "raw", "field": "x", "name": "x"},
                {"agg": "mean", "field": "x", "window": 60, "name": "x_mean"},
                {"agg": "count", "field": "x", "window": 20, "name": "x_n20"},
                {"agg": "last", "field": "c", "window": 60, "name": "c_last"},
                {"agg": "count", "window": 60, "name": "n"},
                {"agg": "since_prev", "window": 60, "name": "gap"},
            ],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )


# (event_id, ts, x, c) in arrival order, entity "u" (and one "v"), and the ages by hand:
# x_mean / x_n20 (newest present x in the window, 60 s / 20 s), c_last, n (always 0), gap.
STREAM: list[tuple[str, str, float, Any, Any]] = [
    ("a", "u", 100.0, 1.0, "fr"),  # first: own values
    ("b", "u", 110.0, N, N),  # x, c missing: newest is a at 100
    ("c", "u", 135.0, N, "de"),  # x: a at 100 (35 s; outside 20 s), c own
    ("d", "u", 130.0, 2.0, N),  # out of order: own x; c: a at 100 (c at 135 is later)
    ("e", "u", 128.0, N, N),  # out of order: x from d? no, d is at 130 > 128: a at 100
    ("f", "u", 50.0, 5.0, "zz"),  # late (behind 135 - 10): no ages
    ("b", "u", 110.0, N, N),  # duplicate of b: b's first ages
    ("g", "v", 500.0, N, N),  # a new entity without x: no contribution at all
    ("h", "u", 200.0, N, N),  # x: d at 130 is 70 s old: outside 60 s
]
STATUS = ["ok", "ok", "ok", "ok", "ok", "late", "duplicate", "ok", "ok"]
#             x_mean x_n20 c_last  n    gap
AGES: list[tuple[float, float, float, float, float]] = [
    (0.0, 0.0, 0.0, 0.0, NAN),
    (10.0, 10.0, 10.0, 0.0, 10.0),
    (35.0, NAN, 0.0, 0.0, 25.0),
    (0.0, 0.0, 30.0, 0.0, 20.0),
    (28.0, NAN, 28.0, 0.0, 18.0),
    (NAN, NAN, NAN, NAN, NAN),
    (10.0, 10.0, 10.0, 0.0, 10.0),
    (NAN, NAN, NAN, 0.0, NAN),
    (NAN, NAN, NAN, 0.0, NAN),
]


def _frame() -> pd.DataFrame:
    rows = [{"event_id": i, "entity_id": e, "ts": ts, "x": x, "c": c} for i, e, ts, x, c in STREAM]
    frame = pd.DataFrame(rows)
    frame["c"] = pd.Series([r[4] for r in STREAM], dtype=object)
    return frame


def test_names_windows_and_stale_thresholds() -> None:
    spec = _spec()
    assert freshness_names(spec) == ["x_mean", "x_n20", "c_last", "n", "gap"]
    assert windows(spec) == {"x_mean": 60.0, "x_n20": 20.0, "c_last": 60.0, "n": 60.0, "gap": 60.0}
    # since_prev (the entity's own gap) and a field-less count (always 0) are never stale
    assert stale_after(spec) == {"x_mean": 30.0, "x_n20": 10.0, "c_last": 30.0}


def test_offline_reference_on_a_hand_computed_stream() -> None:
    spec = _spec()
    got = offline_freshness(spec, _frame(), STATUS)
    assert list(got.columns) == freshness_names(spec)
    for i, want in enumerate(AGES):
        row = got.iloc[i].tolist()
        assert all(g == w or (g != g and w != w) for g, w in zip(row, want, strict=True)), (
            STREAM[i][0],
            row,
            want,
        )


def test_histogram_ages_count_an_empty_window_as_the_window() -> None:
    spec = _spec()
    recs: list[dict[str, float | None]] = [
        {"x_mean": 0.0, "x_n20": None, "c_last": 5.0, "n": 0.0, "gap": None},
        {},  # a prediction without freshness (from an engine without it) observes nothing
    ]
    ages = histogram_ages(freshness_names(spec), windows(spec), recs)
    assert ages == {"x_mean": [0.0], "x_n20": [20.0], "c_last": [5.0], "n": [0.0], "gap": [60.0]}


def test_reply_decoding_with_and_without_ages() -> None:
    spec = _spec()
    store = RedisFeatureStore(spec)
    # features x, x_mean, x_n20, c_last, n, gap; then ages x_mean, x_n20, c_last, n, gap
    res = store._decode(b"o|2|1.5|2|sfr|3|||35|0|0|10")
    assert res.status == "ok"
    assert res.features == {"x": 2.0, "x_mean": 1.5, "x_n20": 2.0, "c_last": "fr", "n": 3.0, "gap": None}
    assert res.freshness == {"x_mean": None, "x_n20": 35.0, "c_last": 0.0, "n": 0.0, "gap": 10.0}
    # A reply without ages (a script built without them; a recent entry from before them)
    old = store._decode("d|2|1.5|2|sfr|3|")
    assert old.status == "duplicate" and old.features is not None and old.freshness is None
    with pytest.raises(ValueError):
        store._decode("o|2|1.5|2|sfr|3||0")  # ages present but not one per windowed feature


def test_script_carries_the_ages_only_when_asked() -> None:
    spec = _spec()
    with_ages, without = build_script(spec), build_script(spec, freshness=False)
    assert "-- Freshness" in with_ages and "'p1'" in with_ages
    assert "-- Freshness" not in without and "'p1'" not in without
    assert without != with_ages


def test_prediction_record_version_2_and_version_1_read_back() -> None:
    p = Prediction(
        "e1", "c7", 1.0, "m", "v1.3", True, None, {"x": 2.0}, 1.5, {"x_mean": 0.0, "gap": None}, 4.25
    )
    rec = orjson.loads(encode_prediction(p))
    assert rec["record_version"] == 2
    assert rec["freshness"] == {"x_mean": 0.0, "gap": None} and rec["model_age"] == 4.25
    assert decode_prediction(encode_prediction(p)) == p
    v1 = {k: v for k, v in rec.items() if k not in ("freshness", "model_age", "record_version")}
    old = decode_prediction(orjson.dumps(v1))
    assert old.freshness == {} and old.model_age is None and old.features == {"x": 2.0}


class AgedFeatures:
    """The engine's results with fixed ages, as the Redis engine returns them."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec

    async def acompute_batch(
        self, redis: Any, events: Sequence[Event], positions: Sequence[Any] | None = None
    ) -> list[FeatureResult]:
        out = []
        for e in events:
            x = e.data.get("x")
            ages: dict[str, float | None] = {"x_mean": 0.0 if x is not None else None, "x_n20": 0.0}
            ages.update({"c_last": 7.0, "n": 0.0, "gap": None})
            fv: dict[str, Any] = {"x": x, "x_mean": x, "x_n20": 1.0, "c_last": None, "n": 1.0, "gap": None}
            out.append(FeatureResult("ok", fv, ages))
        return out


class AgedModel(StaticModel):
    def age_seconds(self) -> float:
        return 42.0


class Half:
    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return {False: 0.5, True: 0.5}


def test_scorer_puts_ages_in_the_record_and_the_histogram() -> None:
    spec = _spec()
    registry = CollectorRegistry()
    scorer = Scorer(
        spec, AgedFeatures(spec), AgedModel(Half(), "m", "v1.2"), WorkerMetrics(registry).init_series(spec)
    )
    msgs = [
        RawMessage(
            orjson.dumps({"event_id": f"e{i}", "entity_id": "u", "ts": 1e9 + i, "data": {"x": x}}),
            b"u",
            "t",
            0,
            i,
        )
        for i, x in enumerate([1.0, None, 3.0])
    ]
    out = asyncio.run(scorer.process(msgs, redis=None))
    assert [p.model_age for p in out.predictions] == [42.0] * 3
    assert [p.freshness["x_mean"] for p in out.predictions] == [0.0, None, 0.0]
    scorer.observe(msgs, out, 0.01)

    def sample(name: str, feature: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"pipeline": "fresh", "feature": feature, **labels})

    assert sample("weir_feature_age_seconds_count", "x_mean") == 3
    assert sample("weir_feature_age_seconds_bucket", "x_mean", le="0.0") == 2  # fresh: the event's own x
    assert sample("weir_feature_age_seconds_sum", "x_mean") == 60.0  # no x in the window: the window
    assert sample("weir_feature_age_seconds_sum", "c_last") == 21.0
    assert sample("weir_feature_age_seconds_bucket", "gap", le="30.0") == 0
    assert sample("weir_feature_age_seconds_bucket", "gap", le="60.0") == 3
    # the thresholds the alert divides by, set when the worker starts
    assert sample("weir_feature_stale_after_seconds", "x_n20") == 10.0
    assert sample("weir_feature_stale_after_seconds", "gap") is None
