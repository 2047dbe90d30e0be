"""Online (Redis Lua) == offline (pandas) on a messy replayed stream, on the real Redis.

The stream has out-of-order events (within and beyond lateness), redelivered event_ids,
missing optional values, equal timestamps, strings that need escaping, and every aggregate
over windows from 1 minute to 1 day; a few heavy entities keep hundreds of events a day.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import redis
import redis.asyncio

from features.base import FeatureResult
from features.freshness import freshness_names, offline_freshness
from features.offline import compute_offline, isclose
from features.online import RedisFeatureStore
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: redis.Redis, unique: str) -> Iterator[None]:
    """Every key expires anyway; dropping this test's keys keeps a shared Redis small."""
    yield
    for key in redis_client.scan_iter(match=f"weir:{{f*{unique}*", count=1000):
        redis_client.unlink(key)


WINDOWS = ["1m", "15m", "1h", "1d"]
AGGS_NUMERIC = ["count", "sum", "mean", "min", "max", "std", "last", "distinct"]


def _spec(unique: str, lateness: float = 120.0, features: list[dict[str, Any]] | None = None) -> PipelineSpec:
    name = re.sub(r"[^a-z0-9_-]", "-", f"fparity-{unique}".lower())[:63]
    if features is None:
        features = _every_aggregate()
    return parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {
                "amount": "numeric",
                "score": {"type": "numeric", "required": False},
                "country": {"type": "categorical", "required": False},
                "flag": {"type": "boolean", "required": False},
            },
            "features": features,
            "lateness": lateness,
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def _every_aggregate() -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = [
        {"agg": "raw", "field": f} for f in ("amount", "score", "country", "flag")
    ]
    for w in WINDOWS:
        features.append({"agg": "count", "window": w})
        features.append({"agg": "since_prev", "window": w})
        for agg in AGGS_NUMERIC:
            features.append({"agg": agg, "field": "amount", "window": w})
        for agg in ("count", "mean", "std", "min", "max"):
            features.append({"agg": agg, "field": "score", "window": w})
        for agg in ("count", "last", "distinct"):
            features.append({"agg": agg, "field": "country", "window": w})
        for agg in ("sum", "mean", "last", "distinct"):
            features.append({"agg": agg, "field": "flag", "window": w})
    return features


#: since_prev windows longer than every other window: the ZSET keeps only what since_prev
#: can still need (the trim path that looks up the newest event behind the horizon).
SINCE_PREV_LONGEST: list[dict[str, Any]] = [
    {"agg": "raw", "field": "amount"},
    {"agg": "raw", "field": "country"},
    {"agg": "since_prev", "window": "1d"},
    {"agg": "since_prev", "window": "1h"},
    {"agg": "since_prev", "window": "1m"},
    {"agg": "count", "window": "10m"},
    {"agg": "mean", "field": "amount", "window": "15m"},
    {"agg": "last", "field": "country", "window": "1m"},
    {"agg": "distinct", "field": "flag", "window": "5m"},
]
#: One stored field (a categorical): members are parsed without a table per member.
ONE_STORED_FIELD: list[dict[str, Any]] = [
    {"agg": "raw", "field": "amount"},
    {"agg": "since_prev", "window": "1d"},
    {"agg": "last", "field": "country", "window": "1m"},
    {"agg": "distinct", "field": "country", "window": "1h"},
    {"agg": "count", "field": "country", "window": "15m"},
]
SINCE_PREV_ONLY: list[dict[str, Any]] = [
    {"agg": "raw", "field": "flag"},
    {"agg": "since_prev", "window": "1d"},
    {"agg": "since_prev", "window": "2m"},
]


COUNTRIES = ["fr", "de", "a|b", "50%", "%7C", "", "zürich", "x" * 40]


def _stream(n: int, n_entities: int, seed: int) -> list[Event]:
    """A replayed delivery order: mostly in time, some late, some redelivered."""
    rng = random.Random(seed)
    entities = [f"user:{i}" for i in range(n_entities)]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(n_entities)]  # a few heavy entities
    clock = 1_700_000_000.0
    out: list[Event] = []
    for i in range(n):
        if out and rng.random() < 0.05:  # redelivery after a crash: same event, again
            out.append(rng.choice(out[-2000:]))
            continue
        clock += rng.choice([0.0, 0.1, 1.0, 7.5, 12.0, 30.0])
        r = rng.random()
        if r < 0.12:
            ts = clock - rng.uniform(0, 110)  # out of order, within lateness
        elif r < 0.17:
            ts = clock - rng.uniform(100, 3000)  # often beyond lateness
        else:
            ts = clock
        if rng.random() < 0.1:
            ts = round(ts)  # equal timestamps: ties broken by arrival
        data: dict[str, Any] = {
            "amount": rng.choice([rng.uniform(-50, 500), float(rng.randint(0, 9)), 0.1, -0.0]),
            "score": None if rng.random() < 0.3 else rng.gauss(0, 1e6),
            "country": None if rng.random() < 0.2 else rng.choice(COUNTRIES),
            "flag": None if rng.random() < 0.25 else rng.random() < 0.4,
        }
        out.append(Event(f"ev-{i}", rng.choices(entities, weights)[0], ts, data))
    return out


def _frame(events: list[Event]) -> pd.DataFrame:
    rows = [{"event_id": e.event_id, "entity_id": e.entity_id, "ts": e.ts, **e.data} for e in events]
    frame = pd.DataFrame(rows)
    # Keep Python objects (None, str, bool) exactly as the events carry them.
    for col in ("country", "flag"):
        frame[col] = pd.Series([e.data[col] for e in events], dtype=object)
    return frame


def _assert_parity(spec: PipelineSpec, events: list[Event], online: list[FeatureResult]) -> None:
    frame = _frame(events)
    offline = compute_offline(spec, frame)
    names = spec.feature_names
    statuses = offline["status"].tolist()
    columns = {n: offline[n].tolist() for n in names}
    # Freshness: the script's ages against the pandas reference of the same definition.
    fresh = freshness_names(spec)
    ages = offline_freshness(spec, frame, statuses)
    age_columns = {n: ages[n].tolist() for n in fresh}
    mismatches = []
    for i, (e, res) in enumerate(zip(events, online, strict=True)):
        if res.status != statuses[i]:
            mismatches.append(f"{e.event_id}: status {res.status} online, {statuses[i]} offline")
            continue
        if res.features is None:
            assert statuses[i] == "late"
            continue
        for n in names:
            if not isclose(res.features[n], columns[n][i]):
                mismatches.append(
                    f"{e.event_id} ({e.entity_id}, ts={e.ts!r}) {n}: "
                    f"online {res.features[n]!r} != offline {columns[n][i]!r}"
                )
        if fresh and res.freshness is None:
            mismatches.append(f"{e.event_id}: no freshness online")
            continue
        for n in fresh:
            assert res.freshness is not None
            got, want = res.freshness[n], age_columns[n][i]
            # Differences of the same two doubles: exact, not within a tolerance.
            if not (got == want or (got is None and want != want)):
                where = f"{e.event_id} ({e.entity_id}, ts={e.ts!r})"
                mismatches.append(f"{where} age of {n}: online {got!r} != offline {want!r}")
    assert not mismatches, f"{len(mismatches)} mismatches, first: " + "\n".join(mismatches[:10])


def test_online_equals_offline_on_a_messy_stream(redis_client: redis.Redis, unique: str) -> None:
    spec = _spec(unique)
    store = RedisFeatureStore(spec)
    events = _stream(12_000, 150, seed=7)
    online: list[FeatureResult] = []
    for b in range(0, len(events), 500):
        online.extend(store.compute_batch(redis_client, events[b : b + 500]))

    counts = pd.Series([r.status for r in online]).value_counts()
    assert counts["ok"] > 10_000 and counts["duplicate"] > 300 and counts["late"] > 100, counts
    assert len({e.entity_id for e in events}) >= 100
    _assert_parity(spec, events, online)

    # The label join reads what was served, redelivered events included.
    first = next(r for e, r in zip(events, online, strict=True) if r.status == "ok")
    assert store.served_features(redis_client, events[0].event_id) == first.features
    assert store.served_features(redis_client, "never-seen") is None

    # Every key the engine wrote expires, so memory stays bounded; none is per event (a
    # window and a meta per entity, one or two hashes of recent ids).
    keys = list(redis_client.scan_iter(match=f"{spec.redis_prefix}:*", count=1000))
    n_entities = len({e.entity_id for e in events})
    assert 2 * n_entities < len(keys) <= 2 * n_entities + 2, len(keys)
    pipe = redis_client.pipeline(transaction=False)
    for k in keys:
        pipe.ttl(k)
    ttls = pipe.execute()
    assert min(ttls) > 0, [k for k, t in zip(keys, ttls, strict=True) if t <= 0][:5]


def test_async_path_and_script_reload_match_offline(redis_client: redis.Redis, unique: str) -> None:
    # lateness 0: any event behind the watermark is late
    spec = _spec(unique + "a", lateness=0.0, features=SINCE_PREV_LONGEST)
    store = RedisFeatureStore(spec)
    events = _stream(3_000, 100, seed=11)
    conn = redis_client.connection_pool.connection_kwargs
    kwargs = {k: conn[k] for k in ("host", "port", "db", "username", "password") if k in conn}

    async def replay() -> list[FeatureResult]:
        aclient = redis.asyncio.Redis(**kwargs)
        try:
            out: list[FeatureResult] = []
            for b in range(0, len(events), 500):
                if b == 1500:
                    # As after a Redis restart, the script is unknown mid-stream (NOSCRIPT);
                    # a new sha rather than SCRIPT FLUSH, which would hit other tests' scripts.
                    store.script += "\n-- reloaded"
                    store.sha = hashlib.sha1(store.script.encode()).hexdigest()
                    assert not (await aclient.script_exists(store.sha))[0]
                out.extend(await store.acompute_batch(aclient, events[b : b + 500]))
            return out
        finally:
            await aclient.aclose()

    online = asyncio.run(replay())
    _assert_parity(spec, events, online)


@pytest.mark.parametrize("features", [SINCE_PREV_LONGEST, ONE_STORED_FIELD, SINCE_PREV_ONLY])
def test_trimming_keeps_what_since_prev_needs(
    redis_client: redis.Redis, unique: str, features: list[dict[str, Any]]
) -> None:
    spec = _spec(unique + str(len(features)), features=features)
    store = RedisFeatureStore(spec)
    events = _stream(4_000, 60, seed=5)
    online: list[FeatureResult] = []
    for b in range(0, len(events), 500):
        online.extend(store.compute_batch(redis_client, events[b : b + 500]))
    _assert_parity(spec, events, online)
    # Trimmed: a heavy entity keeps far fewer events than it had in the last day.
    sizes = [redis_client.zcard(store.window_key(f"user:{i}")) for i in range(3)]
    assert max(sizes) < 100, sizes


def test_demo_spec_parity(redis_client: redis.Redis, unique: str) -> None:
    from pathlib import Path

    from weir.spec import load_spec

    demo = load_spec(Path(__file__).parents[2] / "examples" / "demo.yaml")
    name = re.sub(r"[^a-z0-9_-]", "-", f"fdemo-{unique}".lower())[:63]
    spec = demo.model_copy(update={"name": name})
    store = RedisFeatureStore(spec)
    rng = random.Random(3)
    fields = list(spec.fields)
    events = [
        Event(
            f"d{i}",
            f"e{rng.randrange(100)}",
            1_700_000_000.0 + i * 30 - rng.choice([0, 0, 0, 20, 45]),
            {f: rng.uniform(0, 1e5) for f in fields},
        )
        for i in range(2_000)
    ]
    online: list[FeatureResult] = []
    for b in range(0, len(events), 500):
        online.extend(store.compute_batch(redis_client, events[b : b + 500]))
    frame = pd.DataFrame(
        [{"event_id": e.event_id, "entity_id": e.entity_id, "ts": e.ts, **e.data} for e in events]
    )
    offline = compute_offline(spec, frame)
    for i, r in enumerate(online):
        assert r.status == offline["status"].iat[i]
        if r.features is not None:
            for n in spec.feature_names:
                assert isclose(r.features[n], offline[n].iat[i]), (i, n)


def test_hand_computed_case_online(redis_client: redis.Redis, unique: str) -> None:
    """The unit test's hand-computed table, through Redis, one event per batch and all in one."""
    from tests.unit.test_features_offline import COLUMNS, EVENTS, EXPECTED
    from tests.unit.test_features_offline import _spec as hand_spec

    for batch in (1, len(EVENTS)):
        name = re.sub(r"[^a-z0-9_-]", "-", f"fhand-{batch}-{unique}".lower())[:63]
        store = RedisFeatureStore(hand_spec(name=name))
        events = [Event(i, "u", ts, {"x": x, "c": c, "b": b}) for i, ts, x, c, b in EVENTS]
        online: list[FeatureResult] = []
        for k in range(0, len(events), batch):
            online.extend(store.compute_batch(redis_client, events[k : k + batch]))
        for res, (status, row) in zip(online, EXPECTED, strict=True):
            assert res.status == status
            if row is None:
                assert res.features is None
                continue
            assert res.features is not None
            for col, want in zip(COLUMNS, row, strict=True):
                assert isclose(res.features[col], want, tol=1e-12), (col, res.features[col], want)


def test_freshness_hand_computed_case_online(redis_client: redis.Redis, unique: str) -> None:
    """The unit test's hand-computed ages (missing values, out of order, late, duplicate),
    through Redis, one event per batch and all in one."""
    from tests.unit.test_freshness import AGES, STATUS, STREAM
    from tests.unit.test_freshness import _spec as fresh_spec

    for batch in (1, len(STREAM)):
        name = re.sub(r"[^a-z0-9_-]", "-", f"ffresh-{batch}-{unique}".lower())[:63]
        spec = fresh_spec().model_copy(update={"name": name})
        store = RedisFeatureStore(spec)
        events = [Event(i, e, ts, {"x": x, "c": c}) for i, e, ts, x, c in STREAM]
        online: list[FeatureResult] = []
        for k in range(0, len(events), batch):
            online.extend(store.compute_batch(redis_client, events[k : k + batch]))
        assert [r.status for r in online] == STATUS
        for res, want in zip(online, AGES, strict=True):
            if res.status == "late":
                assert res.freshness is None
                continue
            assert res.freshness is not None
            got = [res.freshness[n] for n in freshness_names(spec)]
            assert all(g == w or (g is None and w != w) for g, w in zip(got, want, strict=True)), (got, want)
