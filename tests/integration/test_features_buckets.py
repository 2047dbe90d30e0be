"""The feature engine with ``redis.buckets`` > 1 on one Redis (docs/scaling.md, stage 2).

On a single Redis every bucket is on the one node: a batch is still ONE script call (its
KEYS the ``applied`` key of every bucket it touches), and the features are the same as with
one bucket and as the offline engine's. Redelivery by offset (per bucket ``applied``), by
event id (per bucket ``recent``) and the served-record fallback, read by the client since
the record is in the event's join bucket, behave as with one bucket.
The same on the Redis Cluster: tests/cluster/test_stage2_features.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from features.base import FeatureResult
from features.online import RedisFeatureStore
from models.join import ServedStore
from tests.integration.test_features_parity import _assert_parity, _spec, _stream
from tests.integration.test_features_redelivery import _spec as _redelivery_spec
from weir.settings import Settings
from weir.slots import key_pattern
from weir.spec import PipelineSpec
from weir.types import Event, Prediction

pytestmark = pytest.mark.integration


def bucketed(spec: PipelineSpec, buckets: int) -> PipelineSpec:
    """``spec`` with ``redis.buckets``."""
    return spec.model_copy(update={"redis": spec.redis.model_copy(update={"buckets": buckets})})


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: redis.Redis, unique: str) -> Iterator[None]:
    yield
    for key in redis_client.scan_iter(match=f"weir:{{f*{unique}*", count=1000):
        redis_client.unlink(key)


def _counting(settings: Settings, calls: list[str]) -> redis.Redis:
    """The real Redis client, appending to ``calls`` each command it sends."""

    class Counting(redis.Redis):
        def execute_command(self, *args: Any, **options: Any) -> Any:
            calls.append(str(args[0]))
            return super().execute_command(*args, **options)

    return Counting.from_url(settings.redis_url, **settings.redis_kwargs())


def test_buckets_on_one_redis_one_call_per_batch_same_features(
    redis_client: redis.Redis, settings: Settings, unique: str
) -> None:
    one = _spec(unique)
    many = bucketed(_spec(unique + "b"), 8)
    events = _stream(1_000, 50, seed=7)
    calls: list[str] = []
    client = _counting(settings, calls)
    stores = RedisFeatureStore(one), RedisFeatureStore(many)
    assert stores[1].script.startswith("#!lua flags=allow-cross-slot-keys\n")
    assert not stores[0].script.startswith("#!")
    online: tuple[list[FeatureResult], list[FeatureResult]] = ([], [])
    try:
        for b in range(0, len(events), 500):
            online[0].extend(stores[0].compute_batch(redis_client, events[b : b + 500]))
            calls.clear()
            online[1].extend(stores[1].compute_batch(client, events[b : b + 500]))
            assert calls in (["EVALSHA"], ["EVALSHA", "SCRIPT", "EVALSHA"]), calls  # loaded on first use
    finally:
        client.close()
    assert {r.status for r in online[1]} == {"ok", "duplicate", "late"}
    assert online[1] == online[0]
    _assert_parity(many, events, online[1])
    # Keys in the 8 buckets, none under the pipeline's own prefix.
    keys = [k.decode() for k in redis_client.scan_iter(match=key_pattern(many.name), count=1000)]
    assert {k.split("}")[0] for k in keys} == {f"weir:{{{many.name}#e{b}" for b in range(8)}
    # Event ids remembered per entity bucket.
    e = events[0]
    assert stores[1].served_features(redis_client, e.event_id, e.entity_id) == online[1][0].features


def test_redelivery_under_buckets_by_offset_id_and_served_record(
    redis_client: redis.Redis, unique: str
) -> None:
    """tests/integration/test_features_redelivery.py's cases with 4 buckets: per bucket
    offsets, per bucket recent ids, and the served records read by the client."""
    spec = bucketed(_redelivery_spec(unique), 4)
    store = RedisFeatureStore(spec)
    topic = spec.topics.events
    ents = ["u", "v", "w", "x", "y", "z"]
    assert len({store.prefix_of(e) for e in ents}) >= 3
    events = [
        Event(f"e{i}", ents[i % 6], 1000.0 + i, {"x": float(i), "c": "a|b" if i % 2 else None})
        for i in range(12)
    ]
    events.append(Event("late", "u", 900.0, {"x": 9.0, "c": None}))
    where = [(topic, 0, 100 + i) for i in range(len(events))]
    first = store.compute_batch(redis_client, events, where)
    assert [r.status for r in first] == ["ok"] * 12 + ["late"]
    # Each bucket's applied offset: the highest of its own events.
    for ent in ents:
        mine = [100 + i for i, e in enumerate(events) if store.prefix_of(e.entity_id) == store.prefix_of(ent)]
        assert redis_client.hget(store.applied_key_of(ent), f"{topic}:0") == str(max(mine)).encode()

    # 1. Soon after: the first features and ages, from each bucket's recent ids.
    again = store.compute_batch(redis_client, events, where)
    assert [r.status for r in again] == ["duplicate"] * 12 + ["late"]
    assert [(r.features, r.freshness) for r in again] == [(r.features, r.freshness) for r in first]

    # 2. The recent ids forgotten: the served records (e0..e5), else read-only.
    served = ServedStore(spec)
    for e, r in zip(events[:6], first[:6], strict=True):
        # As the scorer's served records, in the event's join bucket (written by models.join).
        p = Prediction(e.event_id, e.entity_id, e.ts, "m", "v1", True, None, r.features or {}, time.time())
        redis_client.set(served.keys.served(e.event_id), served.encode(p), ex=300)
    for key in redis_client.scan_iter(match=key_pattern(spec.name)):
        if b":recent:" in key:
            redis_client.unlink(key)
    wins = {e: redis_client.zcard(store.window_key(e)) for e in ents}
    late_again = store.compute_batch(redis_client, events, where)
    assert [r.status for r in late_again] == ["duplicate"] * 12 + ["late"]
    assert [r.features for r in late_again[:6]] == [r.features for r in first[:6]]
    assert [r.freshness for r in late_again[:6]] == [None] * 6  # a served record keeps no ages
    # e6..e11: their entity's window as it is now (its two events, then the event itself
    # once more), not stored again.
    assert [r.features["events_count_1h"] for r in late_again[6:12] if r.features] == [3.0] * 6
    assert all(r.freshness is not None for r in late_again[6:12])
    assert {e: redis_client.zcard(store.window_key(e)) for e in ents} == wins

    # 3. A producer's retry, a new offset within the dedupe horizon: its entity's bucket knows it.
    retry = Event("e99", "v", 1020.0, {"x": 1.0, "c": None})
    ok = store.compute_batch(redis_client, [retry], [(topic, 0, 200)])
    dup = store.compute_batch(redis_client, [retry], [(topic, 1, 5)])
    assert ok[0].status == "ok" and dup[0].status == "duplicate" and dup[0].features == ok[0].features
    assert redis_client.zcard(store.window_key("v")) == wins["v"] + 1
