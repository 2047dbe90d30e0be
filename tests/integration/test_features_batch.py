"""The one-call-per-batch feature script against the real Redis: ids with any character,
events of one entity inside one batch, and the keys the rest of Weir reads."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

from features.base import entity_ttl
from features.lua import TTL_RENEW
from features.online import RedisFeatureStore
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: redis.Redis, unique: str) -> Iterator[None]:
    yield
    for key in redis_client.scan_iter(match=f"weir:{{fbatch*{unique}*", count=1000):
        redis_client.unlink(key)


def _spec(unique: str) -> PipelineSpec:
    name = re.sub(r"[^a-z0-9_-]", "-", f"fbatch-{unique}".lower())[:63]
    return parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {"amount": "numeric", "country": {"type": "categorical", "required": False}},
            "features": [
                {"agg": "raw", "field": "country"},
                {"agg": "count", "window": "1h"},
                {"agg": "sum", "field": "amount", "window": "1h"},
                {"agg": "last", "field": "country", "window": "1h"},
            ],
            "lateness": "1m",
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def test_ids_with_separators_and_unicode_reach_their_own_keys(redis_client: redis.Redis, unique: str) -> None:
    spec = _spec(unique)
    store = RedisFeatureStore(spec)
    odd = ["a:b", "7:xy", "pipe|d", "new\nline", "ünï€ode", "1:", ":"]
    events = [
        Event(f"ev-{eid}", f"ent-{eid}", 1000.0 + i, {"amount": float(i), "country": f"c|{eid}"})
        for i, eid in enumerate(odd)
    ]
    res = store.compute_batch(redis_client, events)
    assert [r.status for r in res] == ["ok"] * len(odd)
    for e, r in zip(events, res, strict=True):
        assert r.features is not None
        assert r.features["country"] == e.data["country"]
        assert r.features["country_last_1h"] == e.data["country"]
        assert r.features["events_count_1h"] == 1.0  # each its own entity
        meta = f"{spec.redis_prefix}:meta:{e.entity_id}"  # the entity's watermark and arrival count
        assert redis_client.exists(store.window_key(e.entity_id), meta) == 2
        assert store.served_features(redis_client, e.event_id) == r.features


def test_events_of_one_entity_in_one_batch_see_each_other(redis_client: redis.Redis, unique: str) -> None:
    spec = _spec(unique)
    store = RedisFeatureStore(spec)
    events = [Event(f"e{i}", "hot", 1000.0 + i, {"amount": 1.0 + i, "country": None}) for i in range(5)]
    # The third event again inside the batch: a duplicate answered from what was served.
    res = store.compute_batch(redis_client, [*events, events[2]])
    assert [r.status for r in res] == ["ok"] * 5 + ["duplicate"]
    assert [r.features["events_count_1h"] for r in res if r.features] == [1.0, 2.0, 3.0, 4.0, 5.0, 3.0]
    assert [r.features["amount_sum_1h"] for r in res if r.features] == [1.0, 3.0, 6.0, 10.0, 15.0, 6.0]
    # A late event (more than 1 min behind the entity's newest) is refused, the rest go on.
    late = Event("late", "hot", 1000.0 - 61, {"amount": 1.0, "country": None})
    after = Event("after", "hot", 1010.0, {"amount": 5.0, "country": None})
    res = store.compute_batch(redis_client, [late, after])
    assert [r.status for r in res] == ["late", "ok"]
    want = {"country": None, "events_count_1h": 6.0, "amount_sum_1h": 20.0, "country_last_1h": None}
    assert res[1].features == want


def test_entity_keys_outlive_their_last_event_by_the_ttl_renewed_at_most_once_a_minute(
    redis_client: redis.Redis, unique: str
) -> None:
    spec = _spec(unique)
    store = RedisFeatureStore(spec)
    win, meta, ttl = store.window_key("k"), store.meta_key("k"), entity_ttl(spec)

    def event(i: int) -> list[Event]:
        return [Event(f"t{i}", "k", 1000.0 + i, {"amount": 1.0, "country": None})]

    def ttls() -> list[int]:
        return [int(redis_client.ttl(win)), int(redis_client.ttl(meta))]

    assert [r.status for r in store.compute_batch(redis_client, event(0))] == ["ok"]
    renewed = int(redis_client.hget(meta, "x") or 0)  # Redis TIME of the renewal
    assert abs(renewed - int(redis_client.time()[0])) <= 2
    assert min(ttls()) >= ttl + TTL_RENEW - 2  # set to the TTL + the renewal period
    # Renewed less than a minute ago: the next events leave the TTLs (here shortened to
    # show it) and the renewal time as they are.
    for key in (win, meta):
        redis_client.expire(key, ttl + 30)
    store.compute_batch(redis_client, event(1))
    assert max(ttls()) <= ttl + 30
    assert int(redis_client.hget(meta, "x") or 0) == renewed
    # A minute or more since the renewal: the next accepted event renews both keys.
    redis_client.hset(meta, "x", str(renewed - TTL_RENEW))
    store.compute_batch(redis_client, event(2))
    assert min(ttls()) >= ttl + TTL_RENEW - 2
    assert abs(int(redis_client.hget(meta, "x") or 0) - int(redis_client.time()[0])) <= 2
    # So every key outlives the entity's last accepted event by more than the TTL: it
    # was renewed less than TTL_RENEW s before that event, to TTL + TTL_RENEW.
