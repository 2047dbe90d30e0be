"""Redelivery without a key per event, on the real Redis: a message seen again is recognised
by its Kafka offset however late it comes, and answered with the features it was first
served (from the recent ids, else its served record, else read-only from the window)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import redis

from features.online import RedisFeatureStore
from models.join import ServedStore
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event, Prediction

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: redis.Redis, unique: str) -> Iterator[None]:
    yield
    for key in redis_client.scan_iter(match=f"weir:{{fredel*{unique}*", count=1000):
        redis_client.unlink(key)


def _spec(unique: str) -> PipelineSpec:
    name = re.sub(r"[^a-z0-9_-]", "-", f"fredel-{unique}".lower())[:63]
    return parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {"x": "numeric", "c": {"type": "categorical", "required": False}},
            "features": [
                {"agg": "raw", "field": "x"},
                {"agg": "raw", "field": "c"},
                {"agg": "count", "window": "1h"},
                {"agg": "sum", "field": "x", "window": "1h"},
            ],
            "lateness": "1m",
            "model": {"name": "m", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def _forget_recent(client: redis.Redis, spec: PipelineSpec) -> None:
    """As if the dedupe horizon had passed twice: the recent ids are gone."""
    for key in client.scan_iter(match=f"{spec.redis_prefix}:recent:*"):
        client.unlink(key)


def test_a_redelivered_offset_is_not_counted_again_however_late(
    redis_client: redis.Redis, unique: str
) -> None:
    spec = _spec(unique)
    store = RedisFeatureStore(spec)
    topic = spec.topics.events
    events = [
        Event(f"e{i}", "u", 1000.0 + i, {"x": float(i), "c": "a|b" if i % 2 else None}) for i in range(6)
    ]
    events.append(Event("late", "u", 900.0, {"x": 9.0, "c": None}))
    where = [(topic, 0, 100 + i) for i in range(len(events))]
    first = store.compute_batch(redis_client, events, where)
    assert [r.status for r in first] == ["ok"] * 6 + ["late"]
    assert redis_client.hget(store.applied_key, f"{topic}:0") == b"106"
    assert redis_client.ttl(store.applied_key) > 0
    win = store.window_key("u")
    stored = redis_client.zcard(win)

    # 1. Soon after (a retried call, a restart): the first features, from the recent ids.
    again = store.compute_batch(redis_client, events, where)
    assert [r.status for r in again] == ["duplicate"] * 6 + ["late"]
    assert [r.features for r in again] == [r.features for r in first]
    assert [r.freshness for r in again] == [r.freshness for r in first]  # and their ages

    # 2. Long after, the recent ids forgotten: from the served records the scorer wrote
    # (packed doubles, strings in the header), for e0..e2.
    served = ServedStore(spec)
    pipe = redis_client.pipeline(transaction=False)
    served.add_to_pipeline(
        pipe,
        [
            Prediction(e.event_id, e.entity_id, e.ts, "m", "v1", True, None, r.features or {}, time.time())
            for e, r in zip(events[:3], first[:3], strict=True)
        ],
    )
    pipe.execute()
    _forget_recent(redis_client, spec)
    late_again = store.compute_batch(redis_client, events, where)
    assert [r.status for r in late_again] == ["duplicate"] * 6 + ["late"]
    assert [r.features for r in late_again[:3]] == [r.features for r in first[:3]]
    assert [r.freshness for r in late_again[:3]] == [None] * 3  # a served record keeps no ages
    # e3..e5 have no record left: computed read-only from the window as it is now (which
    # holds the event itself, so it counts once more), and not stored again.
    assert [r.features["events_count_1h"] for r in late_again[3:6] if r.features] == [5.0, 6.0, 7.0]
    assert all(r.freshness is not None for r in late_again[3:6])  # computed with them
    assert redis_client.zcard(win) == stored
    assert redis_client.hget(f"{spec.redis_prefix}:meta:u", "seq") == b"6"

    # 3. A producer's retry: the same event id under a new offset, within the dedupe horizon.
    retry = Event("e9", "u", 1010.0, {"x": 1.0, "c": None})
    ok = store.compute_batch(redis_client, [retry], [(topic, 0, 107)])
    dup = store.compute_batch(redis_client, [retry], [(topic, 1, 5)])
    assert ok[0].status == "ok" and dup[0].status == "duplicate" and dup[0].features == ok[0].features
    assert redis_client.zcard(win) == stored + 1
    assert redis_client.hgetall(store.applied_key) == {
        f"{topic}:0".encode(): b"107",
        f"{topic}:1".encode(): b"5",
    }
    # No key per event of the engine: the entity's two, the applied offsets, the recent ids.
    keys = {k.decode() for k in redis_client.scan_iter(match=f"{spec.redis_prefix}:*")}
    recent = {k for k in keys if ":recent:" in k}
    assert keys - recent - {k for k in keys if ":served:" in k or ":join:" in k} == {
        win,
        f"{spec.redis_prefix}:meta:u",
        store.applied_key,
    }
    assert 1 <= len(recent) <= 2


def test_numbers_only_first_features_are_packed_and_exact(redis_client: redis.Redis, unique: str) -> None:
    """Every feature a number: the recent ids keep 8 bytes a feature, and a duplicate gets
    the first features exactly (None included)."""
    name = re.sub(r"[^a-z0-9_-]", "-", f"fredel-n-{unique}".lower())[:63]
    spec = parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {"x": {"type": "numeric", "required": False}},
            "features": [
                {"agg": "raw", "field": "x"},
                {"agg": "mean", "field": "x", "window": "1h"},
                {"agg": "since_prev", "window": "1h"},
            ],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )
    store = RedisFeatureStore(spec)
    events = [Event(f"e{i}", "u", 1000.0 + i / 3, {"x": None if i == 0 else 0.1 * i}) for i in range(4)]
    first = store.compute_batch(redis_client, events)
    assert first[0].features == {"x": None, "x_mean_1h": None, "events_since_prev_1h": None}
    again = store.compute_batch(redis_client, events)
    assert [r.status for r in again] == ["duplicate"] * 4
    assert [r.features for r in again] == [r.features for r in first]
    assert [r.freshness for r in again] == [r.freshness for r in first]  # the first ages too
    assert first[1].freshness == {"x_mean_1h": 0.0, "events_since_prev_1h": (1000.0 + 1 / 3) - 1000.0}
    assert [store.served_features(redis_client, e.event_id) for e in events] == [r.features for r in first]
    packed = [v for k in store.recent_keys() if (v := redis_client.hget(k, "e1")) is not None]
    assert [len(v) for v in packed] == [(3 + 2) * 8]  # 3 features, then the 2 windowed ones' ages
    # An entry written before freshness (the features only): the duplicate's ages are unknown.
    key = next(k for k in store.recent_keys() if redis_client.hexists(k, "e1"))
    redis_client.hset(key, "e1", packed[0][: 3 * 8])
    (old,) = store.compute_batch(redis_client, events[1:2])
    assert old.status == "duplicate" and old.features == first[1].features and old.freshness is None
