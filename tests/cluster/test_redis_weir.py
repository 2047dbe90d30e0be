"""Weir's Redis code on the local Redis Cluster (``WEIR_REDIS_CLUSTER=true``, 3 masters).

Settings alone select it: ``Settings.redis()`` / ``redis_async()`` give a ``RedisCluster``.
A pipeline's keys share one hash slot (``weir:{<name>}:...``), so the feature script, the
join's scripts and pipelines and the registry's transactions run there as on one Redis.
Checked with the tests of tests/integration, not copies of them:

* feature parity (online Lua == offline pandas) through the sync and the asyncio cluster
  clients, a NOSCRIPT reload included (the helpers of test_features_parity.py);
* fidelity: the live path (served store, label join, learner) replayed with delayed labels
  scores what River's progressive validation scores (test_fidelity.py's helpers);
* the registry (save, aliases, rollback, snapshots, pruning under WATCH, checkpoints,
  idempotent saves): test_learner_registry.py's tests, imported, on the cluster client;
* early labels held and resolved by the sweep; delete_keys, the memory footprint's SCAN
  over every master and check_redis.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import Connection as AsyncConnection
from redis.cluster import RedisCluster
from river import evaluate, metrics

from features.base import FeatureResult
from features.online import RedisFeatureStore
from models.factory import build_model
from models.join import LabelJoiner, ServedStore
from models.replay import replay
from streams import admin
from tests.integration.test_features_parity import SINCE_PREV_LONGEST, _assert_parity, _spec, _stream
from tests.integration.test_fidelity import LOGREG, TREE, _agrawal, _phishing
from tests.integration.test_learner_registry import (  # noqa: F401 (fixtures and tests, run here)
    make_spec,
    registry,
    spec,
    test_aliases_and_rollback,
    test_checkpoint_roundtrip_and_integrity,
    test_rollback_to_a_pruned_version_changes_nothing,
    test_save_load_roundtrip,
    test_save_with_a_token_is_stored_once_however_often_it_is_retried,
    test_snapshots_publish_load_prune,
    test_versions_beyond_retention_are_pruned,
)
from weir.errors import StackError
from weir.footprint import RedisFootprint
from weir.metrics import LearnerMetrics
from weir.redis_packing import hiredis_packing
from weir.settings import Settings, load_settings
from weir.types import Label, Prediction


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: RedisCluster, unique: str) -> Any:
    yield
    for key in redis_client.scan_iter(match=f"*{unique}*", count=1000):
        redis_client.unlink(key)


def test_settings_give_a_cluster_client(redis_cluster_settings: Settings, redis_client: Any) -> None:
    assert isinstance(redis_client, RedisCluster)
    assert len(redis_client.get_primaries()) == 3
    conn = redis_client.get_default_node().redis_connection.connection_pool.connection_kwargs
    assert conn["socket_timeout"] == redis_cluster_settings.redis_timeout
    admin.check_redis(redis_cluster_settings, timeout=5)
    single = load_settings(redis_url="redis://127.0.0.1:7000")
    with pytest.raises(StackError, match="WEIR_REDIS_CLUSTER=true"):
        admin.check_redis(single, timeout=5)


def test_feature_parity_sync_and_async_with_a_script_reload(
    redis_cluster_settings: Settings, redis_client: Any, unique: str
) -> None:
    ps = _spec(unique)  # every aggregate over 1 min to 1 day
    store = RedisFeatureStore(ps)
    events = _stream(3_000, 100, seed=7)
    online: list[FeatureResult] = []
    for b in range(0, len(events), 500):
        online.extend(store.compute_batch(redis_client, events[b : b + 500]))
    assert {r.status for r in online} == {"ok", "duplicate", "late"}
    _assert_parity(ps, events, online)
    # One slot, so one master holds every key of the pipeline.
    keys = list(redis_client.scan_iter(match=f"{ps.redis_prefix}:*", count=1000))
    assert len(keys) > 100
    assert len({redis_client.keyslot(k) for k in keys}) == 1

    fast = _spec(unique + "a", lateness=0.0, features=SINCE_PREV_LONGEST)
    astore = RedisFeatureStore(fast)
    aevents = _stream(2_000, 80, seed=11)

    async def replay_async() -> list[FeatureResult]:
        aclient = redis_cluster_settings.redis_async()
        assert isinstance(aclient, AsyncRedisCluster)
        try:
            out: list[FeatureResult] = []
            for b in range(0, len(aevents), 500):
                if b == 1000:  # the script unknown mid-stream (NOSCRIPT), as after a failover
                    astore.script += "\n-- reloaded"
                    astore.sha = hashlib.sha1(astore.script.encode()).hexdigest()
                out.extend(await astore.acompute_batch(aclient, aevents[b : b + 500]))
            # every node's connections pack with hiredis (weir.redis_packing), as the blocking ones do
            made = [c for node in aclient.get_nodes() for c in node._connections]
            assert made and all(isinstance(c, hiredis_packing(AsyncConnection)) for c in made), made
            return out
        finally:
            await aclient.aclose()

    _assert_parity(fast, aevents, asyncio.run(replay_async()))


@pytest.mark.parametrize(
    ("data", "steps", "delay"),
    [(_phishing, LOGREG, 10), (_agrawal, TREE, 50)],
    ids=["phishing-logreg", "agrawal-tree"],
)
def test_fidelity_on_the_cluster(
    redis_client: Any, unique: str, data: Any, steps: list[Any], delay: int
) -> None:
    rows = data()[:1500]
    ps = make_spec(unique, model={"name": "m", "steps": steps})
    result = replay(rows, ps, redis_client, delay=float(delay), step=1.0)
    assert result.core.labels_learned == len(rows) == result.labels
    assert dict(result.core.joins) == {"hit": len(rows)}
    ours = result.evaluator.get("accuracy")
    reference = evaluate.progressive_val_score(rows, build_model(ps.model), metrics.Accuracy(), delay=delay)
    assert ours is not None and abs(ours - reference.get()) < 1e-9, (ours, reference.get())


def test_early_labels_are_held_then_resolved_by_the_sweep(redis_client: Any, unique: str) -> None:
    ps = make_spec(unique)
    joiner = LabelJoiner(ps, redis_client)
    now = 1_000.0
    labels = [Label(f"e{i}", True, now) for i in range(5)]
    assert [r.outcome for r in joiner.join(labels, now=now)] == ["early"] * 5
    assert redis_client.zcard(joiner.keys.early_index) == 5
    served = ServedStore(ps)
    preds = [Prediction(f"e{i}", "u", now, "lr", "v1", True, None, {"a": 1.0}, now) for i in range(5)]
    pipe = redis_client.pipeline(transaction=False)
    served.add_to_pipeline(pipe, preds, now=now)
    pipe.execute()
    _, results = joiner.sweep(now=now + 1)
    assert sorted((r.event_id, r.outcome) for r in results) == [(f"e{i}", "resolved") for i in range(5)]
    # Learned and in a published snapshot: the next sweep deletes the holds (one DEL of 5 keys).
    joiner.mark_learned([(f"e{i}", i + 1) for i in range(5)])
    joiner.published(5)
    assert joiner.sweep(now=now + 2) == (0, [])
    assert redis_client.zcard(joiner.keys.early_index) == 0
    assert not any(redis_client.exists(joiner.keys.early(f"e{i}")) for i in range(5))


def test_footprint_and_delete_keys_see_every_master(
    redis_client: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ps = make_spec(unique)
    p = ps.redis_prefix
    for i in range(200):
        redis_client.set(f"{p}:served:e{i}", b"x" * 100, ex=60)
    # Keys of another layout spread over the masters (no hash tag): still all found.
    spread = f"weir:{unique}-spread"
    for i in range(60):
        redis_client.set(f"{spread}:served:e{i}", b"x", ex=60)
    assert len({redis_client.get_node_from_key(f"{spread}:served:e{i}").name for i in range(60)}) == 3

    # The masters each SCAN call went to (the real call, recorded on the way).
    scanned: list[str] = []
    scan = redis_client.scan

    def recorded_scan(*args: Any, **kwargs: Any) -> Any:
        scanned.append(kwargs["target_nodes"].name)
        return scan(*args, **kwargs)

    monkeypatch.setattr(redis_client, "scan", recorded_scan)
    masters = {n.name for n in redis_client.get_primaries()}
    metrics_ = LearnerMetrics(CollectorRegistry())
    for prefix, n in ((p, 200), (spread, 60)):
        scanned.clear()
        footprint = RedisFootprint(prefix, "p", metrics_)
        steps = 1
        while not footprint.step(redis_client):
            steps += 1
            assert steps < 10_000
        assert set(scanned) == masters, "a pass scans every master"
        assert footprint.last["served"][0] == n
    monkeypatch.undo()
    assert metrics_.registry.get_sample_value("weir_redis_maxmemory_bytes", {"pipeline": "p"}) is not None
    assert admin.delete_keys(redis_client, p) == 200
    assert admin.delete_keys(redis_client, spread) == 60
    assert not list(redis_client.scan_iter(match=f"*{unique}*"))
