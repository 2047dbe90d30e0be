"""Stage 2 on the local Redis Cluster, the feature side: one pipeline over every master.

With ``redis.buckets`` > 1 an entity's keys are under its bucket's hash tag
(``weir:{<name>#e<b>}``), so a pipeline's windows spread over the 3 masters; a batch is one
script call per node (docs/scaling.md, stage 2). Checked here with the real cluster:

* fidelity: the live path (served records, label join, learner) replayed with delayed
  labels scores what River's progressive validation scores (test_redis_weir.py's, 16 buckets);
* parity: online == the offline pandas engine (features to 1e-9, freshness exactly), through
  the sync and the asyncio cluster clients, a NOSCRIPT reload on every node included; the
  pipeline's keys on all 3 masters afterwards (SCAN of each);
* a batch spanning the 3 nodes is 3 script calls, one per node; redelivery by offset (per
  bucket ``applied``), by event id (per bucket ``recent``) and from the served records (read
  by the client, one call per node); the footprint and delete_keys find every bucket's keys;
* a slot moved mid-stream (a real ``CLUSTER SETSLOT`` of a bucket's slot to another master,
  the client's map stale): the scorer's retry regroups, the part applied before is
  answered as redeliveries, nothing is counted twice; the slot is moved back.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from river import evaluate, metrics

from features.base import FeatureResult
from features.online import RedisFeatureStore
from models.factory import build_model
from models.join import ServedStore
from models.replay import replay
from streams import admin
from streams.scoring import RawMessage, Scorer
from tests.integration.test_features_buckets import bucketed
from tests.integration.test_features_parity import SINCE_PREV_LONGEST, _assert_parity, _spec, _stream
from tests.integration.test_features_redelivery import _spec as _redelivery_spec
from tests.integration.test_fidelity import LOGREG, TREE, _agrawal, _phishing
from tests.integration.test_learner_registry import make_spec
from weir.footprint import RedisFootprint
from weir.resilience import Backoff, DependencyHealth
from weir.settings import Settings
from weir.slots import bucket_of, bucket_prefix, key_pattern
from weir.types import Event, Prediction


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: Any, unique: str) -> Iterator[None]:
    yield
    for key in redis_client.scan_iter(match=f"*{unique}*", count=1000):
        redis_client.unlink(key)


class _Counting:
    """A cluster client (sync or asyncio) that records ``(command, target node)`` of every
    ``execute_command``; everything else is the client's."""

    def __init__(self, client: Any, calls: list[tuple[str, str | None]]) -> None:
        self._client, self._calls = client, calls

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        node = kwargs.get("target_nodes")
        self._calls.append((str(args[0]), getattr(node, "name", None)))
        return self._client.execute_command(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _keys_per_master(client: Any, name: str) -> dict[int, int]:
    """How many keys of pipeline ``name`` each master holds (a SCAN of each)."""
    out = {}
    for node in client.get_primaries():
        conn = redis.Redis(host=node.host, port=node.port, socket_timeout=5)
        try:
            out[node.port] = sum(1 for _ in conn.scan_iter(match=key_pattern(name), count=1000))
        finally:
            conn.close()
    return out


def test_parity_over_every_master_sync_and_async_with_a_script_reload(
    redis_cluster_settings: Settings, redis_client: Any, unique: str
) -> None:
    ps = bucketed(_spec(unique), 16)  # every aggregate over 1 min to 1 day
    store = RedisFeatureStore(ps)
    events = _stream(1_500, 60, seed=7)
    online: list[FeatureResult] = []
    for b in range(0, len(events), 500):
        online.extend(store.compute_batch(redis_client, events[b : b + 500]))
    assert {r.status for r in online} == {"ok", "duplicate", "late"}
    _assert_parity(ps, events, online)
    per_master = _keys_per_master(redis_client, ps.name)
    assert len(per_master) == 3 and min(per_master.values()) > 10, per_master
    assert not list(redis_client.scan_iter(match=f"{ps.redis_prefix}:*")), "no key under the stage-1 prefix"

    fast = bucketed(_spec(unique + "a", lateness=0.0, features=SINCE_PREV_LONGEST), 16)
    astore = RedisFeatureStore(fast)
    aevents = _stream(1_000, 50, seed=11)

    async def replay_async() -> list[FeatureResult]:
        aclient = redis_cluster_settings.redis_async()
        try:
            out: list[FeatureResult] = []
            for b in range(0, len(aevents), 500):
                if b == 500:  # the script unknown mid-stream on every node (NOSCRIPT)
                    astore.script += "\n-- reloaded"
                    astore.sha = hashlib.sha1(astore.script.encode()).hexdigest()
                out.extend(await astore.acompute_batch(aclient, aevents[b : b + 500]))
            return out
        finally:
            await aclient.aclose()

    _assert_parity(fast, aevents, asyncio.run(replay_async()))


@pytest.mark.parametrize(
    ("data", "steps", "delay"),
    [(_phishing, LOGREG, 10), (_agrawal, TREE, 50)],
    ids=["phishing-logreg", "agrawal-tree"],
)
def test_fidelity_over_every_master(
    redis_client: Any, unique: str, data: Any, steps: list[Any], delay: int
) -> None:
    """test_redis_weir.py's fidelity test with 16 buckets: the features, the served records
    and the label join spread over the 3 masters, the same score as River's."""
    rows = data()[:1500]
    ps = bucketed(make_spec(unique, model={"name": "m", "steps": steps}), 16)
    result = replay(rows, ps, redis_client, delay=float(delay), step=1.0)
    assert result.core.labels_learned == len(rows) == result.labels
    assert dict(result.core.joins) == {"hit": len(rows)}
    ours = result.evaluator.get("accuracy")
    reference = evaluate.progressive_val_score(rows, build_model(ps.model), metrics.Accuracy(), delay=delay)
    assert ours is not None and abs(ours - reference.get()) < 1e-9, (ours, reference.get())
    per_master = _keys_per_master(redis_client, ps.name)
    assert len(per_master) == 3 and min(per_master.values()) > 0, per_master


def test_a_batch_is_one_call_per_node_and_redeliveries_are_answered_first_features(
    redis_cluster_settings: Settings, redis_client: Any, unique: str
) -> None:
    spec = bucketed(_redelivery_spec(unique), 12)
    store = RedisFeatureStore(spec)
    topic = spec.topics.events
    ents = [f"u{i}" for i in range(60)]
    events = [
        Event(f"e{i}", ents[i % 60], 1000.0 + i / 10, {"x": float(i), "c": "a|b" if i % 3 else None})
        for i in range(240)
    ]
    where = [(topic, i % 3, 100 + i) for i in range(len(events))]
    nodes = {redis_client.get_node_from_key(store.applied_key_of(e)).name for e in ents}
    assert len(nodes) == 3
    calls: list[tuple[str, str | None]] = []
    client: Any = _Counting(redis_client, calls)
    for n in redis_client.get_primaries():  # loaded beforehand: no NOSCRIPT in the count
        redis_client.execute_command("SCRIPT", "LOAD", store.script, target_nodes=n)

    first = store.compute_batch(client, events, where)
    assert [r.status for r in first] == ["ok"] * 240
    assert sorted(calls) == sorted(("EVALSHA", n) for n in nodes), calls  # one call per node

    # 1. Redelivered by offset, soon after: the first features and ages, still 3 calls.
    calls.clear()
    again = store.compute_batch(client, events, where)
    assert [r.status for r in again] == ["duplicate"] * 240
    assert [(r.features, r.freshness) for r in again] == [(r.features, r.freshness) for r in first]
    assert sorted(calls) == sorted(("EVALSHA", n) for n in nodes), calls

    # 2. The recent ids forgotten: the served records of e0..e99 (read by the client, one
    # call per node holding them), the others computed read-only, none stored again.
    served = ServedStore(spec)
    preds = [
        Prediction(e.event_id, e.entity_id, e.ts, "m", "v1", True, None, r.features or {}, time.time())
        for e, r in zip(events[:100], first[:100], strict=True)
    ]
    for p in preds:  # as the scorer's served records (the join side writes them per node)
        redis_client.set(served.keys.served(p.event_id), served.encode(p), ex=300)
    for key in redis_client.scan_iter(match=key_pattern(spec.name), count=1000):
        if b":recent:" in key:
            redis_client.unlink(key)
    sizes = [redis_client.zcard(store.window_key(e)) for e in ents]
    calls.clear()
    late_again = store.compute_batch(client, events, where)
    assert [r.status for r in late_again] == ["duplicate"] * 240
    assert [r.features for r in late_again[:100]] == [r.features for r in first[:100]]
    assert [r.freshness for r in late_again[:100]] == [None] * 100  # a served record keeps no ages
    # e180..e239, each its entity's 4th event: its window as it is now (4 events) and itself.
    assert [r.features["events_count_1h"] for r in late_again[180:] if r.features] == [5.0] * 60
    assert [redis_client.zcard(store.window_key(e)) for e in ents] == sizes
    evalsha = [str(n) for c, n in calls if c == "EVALSHA"]
    gets = [str(n) for c, n in calls if c == "EVAL"]
    assert sorted(evalsha) == sorted(nodes) and 1 <= len(gets) == len(set(gets)) <= 3, calls

    # 3. A producer's retry under a new offset: its entity's bucket remembers the id.
    retry = Event("e999", "u7", 2000.0, {"x": 1.0, "c": None})
    ok = store.compute_batch(client, [retry], [(topic, 0, 1000)])
    dup = store.compute_batch(client, [retry], [(topic, 1, 7)])
    assert ok[0].status == "ok" and dup[0].status == "duplicate" and dup[0].features == ok[0].features
    assert store.served_features(redis_client, "e999", "u7") == ok[0].features

    # The footprint and delete_keys, given the pipeline's prefix, find every bucket's keys.
    n = sum(_keys_per_master(redis_client, spec.name).values())
    footprint = RedisFootprint(spec.redis_prefix, spec.name)
    while not footprint.step(redis_client):
        pass
    assert sum(k for k, _ in footprint.last.values()) == n
    assert {"win", "meta", "applied", "recent", "served"} <= set(footprint.last), footprint.last
    assert admin.delete_keys(redis_client, spec.redis_prefix) == n
    assert sum(_keys_per_master(redis_client, spec.name).values()) == 0


def _events(ents: list[str], n: int, t0: float, seed: int) -> list[Event]:
    """``n`` events in time order over ``ents``, no late or redelivered one."""
    rng = random.Random(seed)
    return [
        Event(
            f"m{seed}-{i}",
            ents[i % len(ents)],
            t0 + i * 0.5,
            {
                "amount": rng.uniform(-5, 50),
                "score": None if rng.random() < 0.3 else rng.gauss(0, 10),
                "country": rng.choice(["fr", "de", None, "a|b"]),
                "flag": rng.choice([True, False, None]),
            },
        )
        for i in range(n)
    ]


def _set_slot_owner(ports: list[int], slot: int, dst: int) -> int:
    """Move an EMPTY slot to the master on port ``dst`` as ``redis-cli --cluster reshard``
    does (importing, migrating, then the owner on every master); returns the old owner."""
    conns = {p: redis.Redis(port=p, socket_timeout=5, decode_responses=True) for p in ports}
    try:
        ids = {p: str(c.execute_command("CLUSTER", "MYID")) for p, c in conns.items()}
        src = next(p for p, c in conns.items() if slot_served(c, slot))
        if src == dst:
            return src
        assert conns[src].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        conns[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        conns[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        for p in [dst, src, *[p for p in ports if p not in (src, dst)]]:
            conns[p].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
        # Every node, replicas too (they learn it by gossip): a client refreshing its slot
        # map from a replica that has not would be sent to the old owner once more (a CI
        # run counted two retries where the move makes one).
        for line in str(conns[dst].execute_command("CLUSTER", "NODES")).splitlines():
            port = int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            conns.setdefault(port, redis.Redis(port=port, socket_timeout=5, decode_responses=True))
        deadline = time.monotonic() + 30
        while not all(_owner(c, slot) == ids[dst] for c in conns.values()):
            assert time.monotonic() < deadline, f"slot {slot} not moved to {dst} on every node"
            time.sleep(0.1)
        return src
    finally:
        for c in conns.values():
            c.close()


def _empty(client: Any, slot: int) -> bool:
    node = client.nodes_manager.get_node_from_slot(slot)
    return int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot, target_nodes=node)) == 0


def slot_served(conn: redis.Redis, slot: int) -> bool:
    me = str(conn.execute_command("CLUSTER", "MYID"))
    return _owner(conn, slot) == me


def _owner(conn: redis.Redis, slot: int) -> str:
    """The id of the node owning ``slot`` as ``conn``'s node sees it."""
    for row in conn.execute_command("CLUSTER", "SLOTS"):
        if int(row[0]) <= slot <= int(row[1]):
            return str(row[2][2])
    return ""


@pytest.mark.parametrize("declared", [True, False], ids=["declared-key-moved", "other-key-moved"])
def test_a_slot_moved_mid_stream_is_retried_and_nothing_counted_twice(
    redis_cluster_settings: Settings, redis_client: Any, unique: str, declared: bool
) -> None:
    """The moved bucket is the first of its old master's call (its declared key: ``MOVED``,
    which redis-py follows to the new owner, where another bucket of the call is not
    local), or another (not local on the old master)."""
    spec = bucketed(_spec(unique, features=SINCE_PREV_LONGEST), 6)
    store = RedisFeatureStore(spec)
    B = spec.redis.buckets
    prefixes = [bucket_prefix(spec.name, "e", b, B) for b in range(B)]
    slots = [redis_client.keyslot(p + ":applied") for p in prefixes]
    owner = [redis_client.nodes_manager.get_node_from_slot(s).port for s in slots]
    ports = sorted(n.port for n in redis_client.get_primaries())
    # A bucket sharing its master with another (so that master's call names two slots),
    # its slot empty (a fresh pipeline name): moved to another master below. The events
    # come in bucket order, so a master's call declares its lowest bucket's key.
    shared = next(p for p in owner if owner.count(p) > 1)
    b = [k for k in range(B) if owner[k] == shared][0 if declared else 1]
    assert _empty(redis_client, slots[b])
    src = owner[b]
    dst = next(p for p in ports if p != src)
    ents = [f"w{i}" for i in range(300)]
    by_bucket = {k: [e for e in ents if bucket_of(e, B) == k][:5] for k in range(B)}
    assert all(len(v) == 5 for v in by_bucket.values())
    mine = [e for v in by_bucket.values() for e in v]
    first, later = _events(mine, 150, 1_700_000_000.0, 1), _events(mine, 150, 1_700_000_100.0, 2)
    topic = spec.topics.events
    msgs = [RawMessage(None, None, topic, 0, i) for i in range(300)]
    registry = CollectorRegistry()
    health = DependencyHealth(registry, spec.name)
    scorer = Scorer(spec, store, None, health=health, backoff=Backoff(0.05, 0.2))  # type: ignore[arg-type]
    calls: list[tuple[str, str | None]] = []

    async def run() -> tuple[list[FeatureResult], list[FeatureResult]]:
        aclient = redis_cluster_settings.redis_async()
        client = _Counting(aclient, calls)
        try:
            await aclient.initialize()  # the slot map as it is now: stale after the move
            _set_slot_owner(ports, slots[b], dst)
            one, _ = await scorer.compute_features(client, list(zip(first, msgs[:150], strict=True)), 0.0)
            two, _ = await scorer.compute_features(client, list(zip(later, msgs[150:], strict=True)), 0.0)
            return [r for _, r in one], [r for _, r in two]
        finally:
            await aclient.aclose()

    try:
        out1, out2 = asyncio.run(run())
        # Retried once: the first attempt's call to the old owner failed, the others applied.
        labels = {"pipeline": spec.name, "dependency": "redis"}
        assert registry.get_sample_value("weir_dependency_retries_total", labels) == 1
        assert len([c for c in calls if c[0] == "EVALSHA"]) >= 6, calls
        # Events of buckets on the other masters were applied by the first attempt: the
        # retry answers them as redeliveries (their first features); the rest is new.
        applied_first = [owner[bucket_of(e.entity_id, B)] != src for e in first]
        assert [r.status for r in out1] == ["duplicate" if a else "ok" for a in applied_first]
        assert 0 < sum(applied_first) < len(first)
        assert all(r.status == "ok" for r in out2)
        # Online == offline over both batches: every event counted once in its windows.
        as_served = [FeatureResult("ok", r.features, r.freshness) for r in out1] + out2
        _assert_parity(spec, first + later, as_served)
        # The moved bucket's keys are on its new master.
        conn = redis.Redis(port=dst, socket_timeout=5)
        try:
            assert any(True for _ in conn.scan_iter(match=prefixes[b] + ":win:*"))
        finally:
            conn.close()
    finally:
        for p in ports:  # the slot must be empty to move back
            conn = redis.Redis(port=p, socket_timeout=5)
            try:
                for key in conn.scan_iter(match=key_pattern(spec.name), count=1000):
                    conn.unlink(key)
            finally:
                conn.close()
        _set_slot_owner(ports, slots[b], src)
