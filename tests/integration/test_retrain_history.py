"""The retrainer reads its window from the training-log topic (streams/history.py), on the
real Kafka: by count per partition up to the offsets the trigger saw, and by time."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from models.retrain import train_log_frame
from streams.history import read_training_window
from weir.settings import Settings
from weir.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def _spec(**retrain: Any) -> PipelineSpec:
    return parse_spec(
        {
            "name": "hist",
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
            "retrain": {"window_labels": 40, **retrain},
        }
    )


def _produce(settings: Settings, topic: str, rows: list[tuple[int, int, int]]) -> None:
    """(partition, i, kafka timestamp ms) -> a training-log record on that partition."""
    producer = Producer(settings.producer_config())
    for part, i, ts_ms in rows:
        rec = {
            "event_id": f"e{i}",
            "ts": 1_700_000_000.0 + i,
            "features": {"x": float(i)},
            "label": i % 2 == 0,
        }
        producer.produce(topic, orjson.dumps(rec), partition=part, timestamp=ts_ms)
    assert producer.flush(30) == 0


def test_window_by_count_and_by_time(settings: Settings, make_topics: Any) -> None:
    spec = make_topics.for_spec(_spec(), partitions=2)
    topic = spec.topics.training_log
    old = int((time.time() - 7200) * 1000)
    now = int(time.time() * 1000)
    # partition 0: 60 old + 20 new records; partition 1: 30 new ones.
    rows = [(0, i, old + i) for i in range(60)] + [(0, 60 + i, now + i) for i in range(20)]
    rows += [(1, 100 + i, now + i) for i in range(30)]
    _produce(settings, topic, rows)

    # By count, to the end: the last 40 of partition 0, all 30 of partition 1.
    hist = read_training_window(settings, spec, {}, timeout=60)
    assert hist.offsets == {0: [40, 80], 1: [0, 30]}
    ids = {r["event_id"] for r in hist.records}
    assert ids == {f"e{i}" for i in range(40, 80)} | {f"e{i}" for i in range(100, 130)}

    # Up to the offsets the trigger saw (it had applied 50 of partition 0, 10 of partition 1).
    hist = read_training_window(settings, spec, {0: 50, 1: 10}, timeout=60)
    assert hist.offsets == {0: [10, 50], 1: [0, 10]}
    assert len(hist.records) == 50
    frame = train_log_frame(hist.records, features=spec.feature_names)
    assert frame["ts"].max() == 1_700_000_000.0 + 109
    lineage = hist.lineage()
    assert lineage["offsets"] == {"0": [10, 50], "1": [0, 10]} and lineage["records_read"] == 50

    # By time: one hour back from the newest record logged skips the two-hour-old ones.
    timed = spec.model_copy(update={"retrain": spec.retrain.model_copy(update={"window_seconds": 3600.0})})
    hist = read_training_window(settings, timed, {}, timeout=60)
    assert hist.offsets == {0: [60, 80], 1: [0, 30]}
    assert hist.anchor_ms is not None and hist.anchor_ms >= now
    assert {r["event_id"] for r in hist.records} == {f"e{i}" for i in range(60, 80)} | {
        f"e{i}" for i in range(100, 130)
    }
