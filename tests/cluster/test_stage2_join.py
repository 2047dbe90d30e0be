"""Redis Cluster stage 2, the label join: one pipeline's join keys over every master.

With ``spec.redis.buckets`` B > 1 (64 here: every master owns some of the buckets) an
event's served record, its held label and its bucket's pending, expired and early sets
are under ``weir:{<name>#j<b>}``, ``b = crc32(event id) mod B``. Checked against the
local Redis Cluster (3 masters, Redis 7.0):

* the join's keys land on all 3 masters, none under the stage-1 prefix;
* one stream run with B == 1 and with B == 64 gives the same outcomes (hit, duplicate,
  early, resolved, unknown, expired, expiries) and learns the same examples;
* each batch is one call per node (served records, sync and asyncio; the join; the
  holds; the sweep's expiries, held labels and their state);
* what Redis 7.0 requires of such a call (the ``allow-cross-slot-keys`` flag), a call
  to a node that does not own its slots is a transient error, and a batch retried after
  a partial application changes nothing;
* a backlog of held labels is resolved round robin over the buckets, each label once;
* River fidelity: a replay over the buckets scores what River's progressive validation
  scores;
* role ``all``'s learner awaits the label path on the asyncio cluster client (B == 1 and
  B == 64) with the outcomes of the blocking driver, nothing sent to its thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, ClassVar

import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from river import evaluate, metrics

import models.join as join
from models.factory import build_model
from models.join import Keys, LabelJoiner, ServedStore, bucket_calls, node_call, nodes_of
from models.learner import LearnerCore, run_step
from models.replay import replay
from tests.cluster.conftest import REDIS_URL
from tests.integration.test_fidelity import LOGREG, _phishing
from tests.integration.test_learner_join import label_msg, label_path_both_drivers
from tests.integration.test_learner_registry import make_spec
from weir.resilience import Backoff, DependencyHealth, is_transient, retry_sync
from weir.settings import Settings
from weir.slots import bucket_of
from weir.spec import PipelineSpec
from weir.types import Label, Prediction

B = 64
HORIZON = 3.0


@pytest.fixture(autouse=True)
def _drop_keys(redis_client: RedisCluster, unique: str) -> Any:
    yield
    for key in redis_client.scan_iter(match=f"*{unique}*", count=1000):
        redis_client.unlink(key)


def _spec(unique: str, buckets: int, **over: Any) -> PipelineSpec:
    return make_spec(f"{unique}b{buckets}", redis={"buckets": buckets}, **over)


def _pred(eid: str, t: float, a: float = 1.0) -> Prediction:
    return Prediction(eid, "ent-" + eid, t, "lr", "v1", a > 0, {"False": 0.4, "True": 0.6}, {"a": a}, t)


def _core(spec: PipelineSpec, client: Any) -> LearnerCore:
    return LearnerCore(spec, build_model(spec.model), None, client, version_id="v1")


def _masters(client: RedisCluster, pattern: str) -> tuple[int, set[str]]:
    keys = list(client.scan_iter(match=pattern, count=1000))
    return len(keys), {client.get_node_from_key(k).name for k in keys}


def _ids_in(spec: PipelineSpec, buckets: set[int], n: int, stem: str = "m") -> list[str]:
    """``n`` event ids whose buckets are in ``buckets``."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        eid = f"{stem}{i}"
        if bucket_of(eid, spec.redis.buckets) in buckets:
            out.append(eid)
        i += 1
    return out


class _Run:
    """One stream through a learner: hits, duplicates, early labels (resolved or never
    served), events whose horizon passes unlabelled, then labels after the horizon."""

    H: ClassVar[list[str]] = [f"h{i}" for i in range(100)]
    X: ClassVar[list[str]] = [f"x{i}" for i in range(60)]
    E: ClassVar[list[str]] = [f"e{i}" for i in range(50)]

    def __init__(self, spec: PipelineSpec, client: Any) -> None:
        self.spec, self.client = spec, client
        self.core = _core(spec, client)
        self.served = ServedStore(spec)
        self.offset = 0
        self.outcomes: Counter[str] = Counter()
        self.expiries = 0
        self.log: list[tuple[str, Any, Any]] = []  # learned: (event id, label, features)
        self.held_on: dict[str, set[str]] = {}  # early:*, join:early -> masters, all 50 held

    def _labels(self, ids: list[str], t: float) -> list[Any]:
        msgs = []
        for eid in ids:
            msgs.append(label_msg(eid, int(eid[1:]) % 2 == 0, t, self.offset))
            self.offset += 1
        return msgs

    def _take(self, out: Any) -> None:
        self.outcomes.update(r.outcome for r in out.results)
        self.expiries += out.expiries
        for rec in out.training_log:
            ex = orjson.loads(rec)
            self.log.append((ex["event_id"], ex["label"], ex["features"]))

    def before_horizon(self, t: float) -> None:
        self.served.write(
            self.client, [_pred(e, t, float(i % 7 - 3)) for i, e in enumerate(self.H + self.X)], now=t
        )
        core = self.core
        self._take(core.process(self._labels([*self.H, self.H[0]], t)))  # one duplicate within the batch
        self._take(core.process(self._labels(self.H[:20], t)))  # 20 more, already learned
        self._take(core.process(self._labels(self.E, t)))  # early: held
        # Where the 50 holds are, before 40 of them resolve: 10 keys left afterwards miss
        # one of 3 masters about one time in 20.
        for what in ("early:*", "join:early"):
            self.held_on[what] = _masters(self.client, f"weir:{{{self.spec.name}#j*}}:{what}")[1]
        self.served.write(self.client, [_pred(e, t, 2.0) for e in self.E[:40]], now=t)  # 10 never served
        self._take(core.sweep(now=t, snapshot=False))
        while core.joiner.more_held:
            self._take(run_step(core.held_step(now=t)))
        # A snapshot has what was learned: the next call deletes their served records, the
        # sweep their holds.
        core.joiner.published(core.labels_learned)
        self._take(core.sweep(now=t, snapshot=False))

    def after_horizon(self) -> None:
        self._take(self.core.sweep(snapshot=False))  # X expire, the 10 held labels are unknown
        self._take(self.core.process(self._labels(self.X, time.time())))  # after the horizon


def test_outcomes_and_examples_with_buckets_equal_those_of_one_slot(redis_client: Any, unique: str) -> None:
    one, spread = (_Run(_spec(unique, b, labels={"horizon": HORIZON}), redis_client) for b in (1, B))
    t = time.time()
    one.before_horizon(t)
    spread.before_horizon(t)
    # Before the horizon: served records, pending sets, holds and early indexes on every master.
    name = spread.spec.name
    for what in ("served:*", "join:pending"):
        n, masters = _masters(redis_client, f"weir:{{{name}#j*}}:{what}")
        assert len(masters) == 3, (what, n, masters)
    for what, masters in spread.held_on.items():
        assert len(masters) == 3, (what, masters)
    assert not list(redis_client.scan_iter(match=f"weir:{{{name}}}:*")), "keys under the stage-1 prefix"
    for run in (one, spread):  # learned and in a snapshot: records and holds deleted
        k = Keys(run.spec)
        assert not redis_client.exists(*(k.served(e) for e in run.H + run.E[:40]))
        assert redis_client.exists(*(k.served(e) for e in run.X)) == len(run.X)
        assert not redis_client.exists(*(k.early(e) for e in run.E[:40]))
        assert redis_client.exists(*(k.early(e) for e in run.E[40:])) == 10
    time.sleep(max(0.0, t + HORIZON + 0.5 - time.time()))
    one.after_horizon()
    spread.after_horizon()
    _, masters = _masters(redis_client, f"weir:{{{name}#j*}}:join:expired")
    assert len(masters) == 3, masters

    expected = Counter(hit=100, duplicate=21, early=50, resolved=40, unknown=10, expired=60)
    assert one.outcomes == expected, one.outcomes
    assert spread.outcomes == expected, spread.outcomes
    assert one.expiries == spread.expiries == 60
    assert spread.core.labels_learned == one.core.labels_learned == 140
    # The same examples; the hits in the same order (a sweep's resolved labels come bucket
    # by bucket instead of in the early index's order).
    assert sorted(spread.log, key=str) == sorted(one.log, key=str)
    assert spread.log[:100] == one.log[:100]


def _kinds() -> dict[str, str]:
    return {
        join._SERVED_LUA_X: "served",
        join._JOIN_LUA_X: "join",
        join._HOLD_LUA_X: "hold",
        join._EXPIRE_LUA_X: "expire",
        join._HELD_RANGE_LUA_X: "held",
        join._UNHOLD_LUA_X: "unhold",
    }


def _counting_cluster(settings: Settings, calls: list[tuple[str, int | None]]) -> Any:
    """A ``RedisCluster`` appending ``(script or command, target port)`` for each command."""
    kinds = _kinds()

    class Counting(RedisCluster):
        def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if args[0] != "COMMAND":  # redis-py's own, once: the commands' key specs
                node = kwargs.get("target_nodes")
                kind = kinds.get(args[1], "EVAL?") if args[0] == "EVAL" else str(args[0])
                calls.append((kind, getattr(node, "port", None)))
            return super().execute_command(*args, **kwargs)

    return Counting.from_url(REDIS_URL, **settings.redis_kwargs())


def _per_node(calls: list[tuple[str, int | None]]) -> Counter[str]:
    """Calls by kind; asserting each went to a node, at most one of a kind per node."""
    assert all(port is not None for _, port in calls), calls
    assert len(set(calls)) == len(calls), calls  # one of a kind per node
    return Counter(kind for kind, _ in calls)


def test_one_call_per_node_per_batch(redis_cluster_settings: Settings, unique: str) -> None:
    calls: list[tuple[str, int | None]] = []
    client = _counting_cluster(redis_cluster_settings, calls)
    spec = _spec(unique, B)
    served = ServedStore(spec)
    t = time.time()
    try:
        served.write(client, [_pred(f"s{i}", t) for i in range(300)], now=t)
        assert _per_node(calls) == {"served": 3}

        akinds = _kinds()
        acalls: list[tuple[str, int | None]] = []

        class ACounting(AsyncRedisCluster):
            async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
                if args[0] != "COMMAND":
                    node = kwargs.get("target_nodes")
                    acalls.append((akinds.get(args[1], "EVAL?"), getattr(node, "port", None)))
                return await super().execute_command(*args, **kwargs)

        async def scorer_batch() -> None:
            aclient = ACounting.from_url(REDIS_URL, **redis_cluster_settings.redis_kwargs())
            try:
                await served.awrite(aclient, [_pred(f"a{i}", t) for i in range(300)], now=t)
            finally:
                await aclient.aclose()

        asyncio.run(scorer_batch())
        assert _per_node(acalls) == {"served": 3}

        core = _core(spec, client)
        calls.clear()
        out = run_step(core.process_step([label_msg(f"s{i}", 1, t, i) for i in range(300)]))
        assert Counter(r.outcome for r in out.results) == {"hit": 300}
        assert _per_node(calls) == {"join": 3}  # the join (reads; no marks queued yet)
        calls.clear()
        out = run_step(core.process_step([label_msg(f"n{i}", 1, t, 300 + i) for i in range(60)]))
        assert Counter(r.outcome for r in out.results) == {"early": 60}
        assert _per_node(calls) == {"join": 3, "hold": 3}  # the 300 marks ride with the join
        calls.clear()
        assert run_step(core.sweep_step(now=t)).results == []  # the held labels' events not served
        assert _per_node(calls) == {"expire": 3, "held": 3, "join": 3}
        assert core.joiner.learned([f"s{i}" for i in range(300)]) == [True] * 300
    finally:
        client.close()


def test_what_redis_requires_of_a_call_over_several_slots(redis_client: Any, unique: str) -> None:
    """Redis 7.0 (local cluster): declared keys of two slots fail (``CROSSSLOT``) with the
    ``allow-cross-slot-keys`` flag or without; a script with the flag declaring one key
    reads keys of its node's other slots, not a key of another node. Hence the join's
    calls: one declared key, the flag, the other buckets in ARGV."""
    spec = _spec(unique, B)
    k = Keys(spec)
    groups = nodes_of(redis_client, k, range(B))
    node, buckets = groups[0]
    two = [k.pending_of(b) for b in buckets[:2]]
    other = k.pending_of(groups[1][1][0])
    body = "return redis.call('EXISTS', KEYS[1]) + redis.call('EXISTS', ARGV[1])"
    flagged = join._CROSS_SLOT + body
    for text in (body, flagged):
        with pytest.raises(redis.exceptions.ClusterCrossSlotError):
            redis_client.execute_command("EVAL", text, 2, *two, two[1], target_nodes=node)
    assert redis_client.execute_command("EVAL", flagged, 1, two[0], two[1], target_nodes=node) == 0
    unflagged = "#!lua\n" + body  # a script with flags, but not that one
    with pytest.raises(redis.ResponseError, match="do not hash to the same slot"):
        redis_client.execute_command("EVAL", unflagged, 1, two[0], two[1], target_nodes=node)
    with pytest.raises(redis.ResponseError, match="non local key"):
        redis_client.execute_command("EVAL", flagged, 1, two[0], other, target_nodes=node)


def test_a_call_to_a_node_without_its_slots_is_followed_or_retried_regrouped(
    redis_client: Any, unique: str
) -> None:
    """A call grouped on a stale slot map: sent to a node that lost all of its buckets (a
    failover: they moved together), redis-py follows the ``MOVED`` of its declared key and
    the call runs on the new owner; one naming a bucket whose slot is elsewhere (a
    resharding) fails, transient, the slot map reloaded, and the retried batch, regrouped,
    stores every record once."""
    spec = _spec(unique, B)
    k, served = Keys(spec), ServedStore(spec)
    groups = nodes_of(redis_client, k, range(B))
    (node, buckets), (_, elsewhere) = groups[0], groups[1]
    wrong = next(n for n in redis_client.get_primaries() if n.name != node.name)
    t = time.time()
    together = [_pred(e, t) for e in _ids_in(spec, set(buckets[:2]), 20)]
    ((_, declared, args, _),) = bucket_calls(redis_client, k, served._groups(together, t), k.pending_of)
    node_call(redis_client, wrong, join._SERVED_LUA_X, declared, args)  # MOVED, followed
    assert sum(redis_client.zcard(k.pending_of(b)) for b in buckets[:2]) == 20

    split = [_pred(e, t) for e in _ids_in(spec, {buckets[2], elsewhere[0]}, 20, stem="s")]
    groups_ = served._groups(split, t)
    args = join.per_bucket_args([groups_[buckets[2]], groups_[elsewhere[0]]])
    with pytest.raises(redis.RedisError) as err:
        node_call(redis_client, node, join._SERVED_LUA_X, [k.pending_of(buckets[2])], args)
    assert is_transient(err.value) and "non local key" in str(err.value), repr(err.value)
    served.write(redis_client, split, now=t)  # what the retry does: regrouped
    assert sum(redis_client.zcard(k.pending_of(b)) for b in (buckets[2], elsewhere[0])) == 20
    assert redis_client.exists(*(k.served(p.event_id) for p in split)) == 20


def test_a_batch_retried_after_a_partial_application_changes_nothing(redis_client: Any, unique: str) -> None:
    spec = _spec(unique, B)
    k, served = Keys(spec), ServedStore(spec)
    t = time.time()
    preds = [_pred(f"p{i}", t, float(i)) for i in range(200)]
    calls = bucket_calls(redis_client, k, served._groups(preds, t), k.pending_of)
    assert len(calls) == 3
    node, declared, args, _ = calls[0]
    node_call(redis_client, node, join._SERVED_LUA_X, declared, args)  # one node done, then MOVED
    later = [_pred(p.event_id, t + 1, -1.0) for p in preds]  # a redelivery would serve this
    served.write(redis_client, later, now=t)  # the retried batch
    assert sum(redis_client.zcard(k.pending_of(b)) for b in range(B)) == 200
    first = redis_client.get(k.served(preds[0].event_id))
    assert first is not None and served.decode(preds[0].event_id, first).features in ({"a": 0.0}, {"a": -1.0})
    kept = {e: redis_client.get(k.served(e)) for e in ("p1", "p2", "p3")}

    core = _core(spec, redis_client)
    out = core.process([label_msg(p.event_id, 1, t, i) for i, p in enumerate(preds)])
    assert Counter(r.outcome for r in out.results) == {"hit": 200}
    marks = list(core.joiner._marks)
    core.joiner.flush()
    core.joiner._marks = marks  # the marks' call retried after it was applied
    core.joiner.flush()
    assert core.joiner.learned([p.event_id for p in preds]) == [True] * 200
    scores = [s for b in range(B) for _, s in redis_client.zrange(k.pending_of(b), 0, -1, withscores=True)]
    assert len(scores) == 200 and all(s < 0 for s in scores)  # negated once, not flipped back
    again = core.process([label_msg(p.event_id, 0, t, 200 + i) for i, p in enumerate(preds)])
    assert Counter(r.outcome for r in again.results) == {"duplicate": 200}
    for e, raw in kept.items():  # marked records keep the record first stored
        now_raw = redis_client.get(k.served(e))
        assert now_raw is not None and raw is not None and now_raw[:1] == b"\x02" and now_raw.endswith(raw)

    # A retried hold finds its own body (early), another message for the event is a duplicate.
    joiner = LabelJoiner(spec, redis_client)
    labels = [Label(e, True, t) for e in _ids_in(spec, set(range(B)), 30, stem="h")]
    sources = [f"0:{i}" for i in range(30)]
    assert {r.outcome for r in joiner.join(labels, now=t, sources=sources)} == {"early"}
    assert {r.outcome for r in joiner.join(labels, now=t, sources=sources)} == {"early"}
    assert {r.outcome for r in joiner.join(labels, now=t, sources=["1:0"] * 30)} == {"duplicate"}
    assert sum(redis_client.zcard(k.early_index_of(b)) for b in range(B)) == 30


@pytest.mark.parametrize("chunk", [B, 16], ids=["every-bucket-a-step", "16-buckets-a-step"])
def test_a_backlog_of_held_labels_is_resolved_round_robin(
    redis_client: Any, unique: str, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Each bucket's share of a chunk (here 1 label a bucket a step; with a chunk smaller
    than the buckets, the next ``chunk`` buckets a step, round robin): each label is learned
    once, and the learner goes on at once while chunks are full (held_step)."""
    monkeypatch.setattr(join, "SWEEP_HELD_CHUNK", chunk)
    spec = _spec(unique, B)
    core = _core(spec, redis_client)
    t = time.time()
    n = 150
    core.process([label_msg(f"e{i}", i % 2 == 0, t, i) for i in range(n)])
    ServedStore(spec).write(redis_client, [_pred(f"e{i}", t) for i in range(n)], now=t)
    per_bucket = Counter(bucket_of(f"e{i}", B) for i in range(n))
    learned: Counter[str] = Counter()
    sweeps = steps = 0
    while len(learned) < n:
        got = core.sweep(now=t, snapshot=False).results
        if sweeps == 0 and chunk == B:
            assert len(got) == len(per_bucket)  # one label of every bucket holding some
        learned.update(r.event_id for r in got)
        sweeps += 1
        while core.joiner.more_held:
            learned.update(r.event_id for r in run_step(core.held_step(now=t)).results)
            steps += 1
        assert sweeps <= B, (sweeps, steps, len(learned))
    assert set(learned.values()) == {1} and core.labels_learned == n
    if chunk == B:
        assert sweeps == 1 and steps >= max(per_bucket.values()) - 1
    assert core.sweep(now=t, snapshot=False).results == []  # nothing learned twice


def test_expiries_are_moved_bucket_window_by_window(
    redis_client: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fewer expiries per call than buckets, each sweep walks the next buckets: all of
    them expire within B / EXPIRE_CHUNK sweeps, none counted twice."""
    monkeypatch.setattr(join, "EXPIRE_CHUNK", 16)
    spec = _spec(unique, B, labels={"horizon": 60})
    core = _core(spec, redis_client)
    served_at = time.time() - 61  # deadlines passed a second ago
    ServedStore(spec).write(redis_client, [_pred(f"x{i}", served_at) for i in range(200)], now=served_at)
    counts = [core.sweep(snapshot=False).expiries for _ in range(B // 16 + 1)]
    assert sum(counts) == 200 and counts[-1] == 0, counts
    assert sum(redis_client.zcard(Keys(spec).expired_of(b)) for b in range(B)) == 200


def test_fidelity_over_the_buckets(redis_client: Any, unique: str) -> None:
    rows = _phishing()[:1000]
    ps = _spec(unique, B, model={"name": "m", "steps": LOGREG})
    result = replay(rows, ps, redis_client, delay=10.0, step=1.0)
    assert result.core.labels_learned == len(rows) == result.labels
    assert dict(result.core.joins) == {"hit": len(rows)}
    ours = result.evaluator.get("accuracy")
    reference = evaluate.progressive_val_score(rows, build_model(ps.model), metrics.Accuracy(), delay=10)
    assert ours is not None and abs(ours - reference.get()) < 1e-9, (ours, reference.get())
    _, masters = _masters(redis_client, f"weir:{{{ps.name}#j*}}:served:*")
    assert len(masters) == 3


@pytest.mark.parametrize("declared", [True, False], ids=["declared-key-moved", "other-key-moved"])
def test_a_slot_moved_mid_stream_is_retried_regrouped_and_nothing_learned_twice(
    redis_cluster_settings: Settings, redis_client: Any, unique: str, declared: bool
) -> None:
    """A real ``CLUSTER SETSLOT`` of a bucket's slot to another master while the scorer's
    and the learner's clients hold the old slot map. The bucket moved is the first of its
    old master's call (its declared key: ``MOVED``, followed by redis-py to the new owner,
    where the call's other buckets are not local) or another (not local on the old
    master). Each side's batch is retried once (weir.resilience), regrouped; the part
    applied before changes nothing: every record stored once, every label learned once."""
    from tests.cluster.test_stage2_features import _empty, _set_slot_owner

    n_buckets = 6
    spec = _spec(unique, n_buckets)
    k, served = Keys(spec), ServedStore(spec)
    slots = [redis_client.keyslot(k.pending_of(b)) for b in range(n_buckets)]
    owner = [redis_client.nodes_manager.get_node_from_slot(s).port for s in slots]
    ports = sorted(n.port for n in redis_client.get_primaries())
    shared = next(p for p in owner if owner.count(p) > 1)  # 6 buckets on 3 masters
    b = [x for x in range(n_buckets) if owner[x] == shared][0 if declared else 1]
    src, dst = owner[b], next(p for p in ports if p != owner[b])
    # 5 events a bucket, in bucket order: a master's call declares its lowest bucket's key.
    ids = [e for x in range(n_buckets) for e in _ids_in(spec, {x}, 5, stem=f"b{x}-")]
    assert _empty(redis_client, slots[b])
    scorer_client, learner_client = redis_cluster_settings.redis(), redis_cluster_settings.redis()
    registry = CollectorRegistry()
    health = {side: DependencyHealth(registry, f"{spec.name}-{side}") for side in ("scorer", "learner")}
    fast = Backoff(0.05, 0.2)

    def retries(side: str) -> float:
        labels = {"pipeline": f"{spec.name}-{side}", "dependency": "redis"}
        return registry.get_sample_value("weir_dependency_retries_total", labels) or 0.0

    def learner_io(op: Any) -> Any:
        return retry_sync(op.call, what=op.what, health=health["learner"], backoff=fast)

    try:
        _set_slot_owner(ports, slots[b], dst)  # both clients' maps are stale now
        t = time.time()
        preds = [_pred(e, t) for e in ids]
        retry_sync(
            lambda: served.write(scorer_client, preds, now=t),
            what="served",
            health=health["scorer"],
            backoff=fast,
        )
        assert retries("scorer") == 1
        assert redis_client.exists(*(k.served(e) for e in ids)) == len(ids)
        assert sum(redis_client.zcard(k.pending_of(x)) for x in range(n_buckets)) == len(ids)
        assert redis_client.get_node_from_key(k.served(ids[5 * b])).port == dst

        core = _core(spec, learner_client)
        out = run_step(core.process_step([label_msg(e, 1, t, i) for i, e in enumerate(ids)]), call=learner_io)
        assert Counter(r.outcome for r in out.results) == {"hit": len(ids)}
        assert retries("learner") == 1 and core.labels_learned == len(ids)
        again = run_step(
            core.process_step([label_msg(e, 0, t, 100 + i) for i, e in enumerate(ids)]), call=learner_io
        )
        assert Counter(r.outcome for r in again.results) == {"duplicate": len(ids)}
        assert core.joiner.learned(ids) == [True] * len(ids)
    finally:
        scorer_client.close()
        learner_client.close()
        for key in redis_client.scan_iter(match=f"*{unique}*", count=1000):  # empty, to move back
            redis_client.unlink(key)
        _set_slot_owner(ports, slots[b], src)


@pytest.mark.parametrize("buckets", [1, B])
def test_role_all_awaits_the_label_path_on_the_asyncio_cluster_client(
    redis_client: RedisCluster, redis_cluster_settings: Settings, unique: str, buckets: int
) -> None:
    """The asyncio variants on a Redis Cluster: ``EVALSHA`` of the join's scripts through
    the asyncio cluster client (B == 1, one slot), one ``EVAL`` per node at once (B == 64);
    the same outcomes as the blocking cluster client's, no call on the learner's thread."""
    expected, got, threaded = label_path_both_drivers(
        redis_cluster_settings, redis_client, redis_client, unique, buckets
    )
    assert got == expected
    assert got[0] == ["hit"] * 10 + ["early"] * 5
    assert got[2] == (0, [("resolved", f"e{i}") for i in range(10, 15)])
    assert got[4] == (3, []) and got[5] == (15, 0)
    assert threaded == []
