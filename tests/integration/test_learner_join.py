"""Label join outcomes and crash recovery against the real Redis (LabelJoiner + LearnerCore)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from models.factory import build_model, predict
from models.join import Keys, ServedStore
from models.learner import LabelMessage, LearnerCore, run_step, status_key
from models.registry import ModelRegistry
from weir.contracts import decode_dead_letter
from weir.errors import IntegrityError
from weir.metrics import LearnerMetrics
from weir.spec import PipelineSpec
from weir.types import FeatureVector, Label, Prediction

from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration


def serve(client: Any, spec: PipelineSpec, core: LearnerCore, eid: str, a: float, ts: float) -> Prediction:
    features: FeatureVector = {"a": a, "b": None}
    pred, proba = predict(core.model, {"a": a}, spec.task)
    p = Prediction(
        event_id=eid,
        entity_id="ent-" + eid,
        ts=ts,
        model=spec.model.name,
        model_version=f"{core.version_id}.0",
        prediction=pred,
        proba=proba,
        features=features,
        scored_at=time.time(),
    )
    ServedStore(spec).write(client, [p])  # one pipeline; with buckets, one call per node
    return p


def label_msg(eid: str, label: Any, ts: float, offset: int, partition: int = 0) -> LabelMessage:
    body = orjson.dumps({"event_id": eid, "label": label, "ts": ts})
    return LabelMessage(value=body, partition=partition, offset=offset)


@pytest.fixture
def metrics() -> LearnerMetrics:
    return LearnerMetrics(CollectorRegistry())


def _core(spec: PipelineSpec, client: Any, metrics: LearnerMetrics | None = None) -> LearnerCore:
    return LearnerCore(spec, build_model(spec.model), None, client, version_id="v1", metrics=metrics)


def _joins(metrics: LearnerMetrics, spec: PipelineSpec, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "weir_label_joins_total", {"pipeline": spec.name, "outcome": outcome}
    )
    return value or 0.0


def test_hit_learns_served_features(redis_client: Any, unique: Any, metrics: LearnerMetrics) -> None:
    spec = make_spec(unique)
    core = _core(spec, redis_client, metrics)
    now = time.time()
    served = serve(redis_client, spec, core, "e1", 4.0, now - 5)
    out = core.process([label_msg("e1", 1, now, offset=0)])
    assert [r.outcome for r in out.results] == ["hit"]
    rec = orjson.loads(out.training_log[0])
    assert rec["features"] == {"a": 4.0, "b": None}  # as served, not recomputed
    assert rec["label"] is True and rec["prediction"] == served.prediction
    assert rec["model_version"] == "v1.0" and rec["ts"] == pytest.approx(now - 5)
    assert core.labels_learned == 1 and core.offsets == {0: 1}
    assert core.evaluator.count("v1") == 1
    assert _joins(metrics, spec, "hit") == 1
    delay = metrics.registry.get_sample_value("weir_label_delay_seconds_sum", {"pipeline": spec.name})
    assert delay == pytest.approx(5, abs=0.01)
    learned = metrics.registry.get_sample_value(
        "weir_labels_learned_total", {"pipeline": spec.name, "model": "lr"}
    )
    assert learned == 1


def test_duplicate_label_learned_once(redis_client: Any, unique: Any, metrics: LearnerMetrics) -> None:
    spec = make_spec(unique)
    core = _core(spec, redis_client, metrics)
    now = time.time()
    serve(redis_client, spec, core, "e1", 1.0, now)
    out = core.process([label_msg("e1", 1, now, 0), label_msg("e1", 1, now, 1)])
    assert [r.outcome for r in out.results] == ["hit", "duplicate"]
    out = core.process([label_msg("e1", 0, now, 2)])
    assert [r.outcome for r in out.results] == ["duplicate"]
    assert core.labels_learned == 1 and _joins(metrics, spec, "duplicate") == 2


def test_early_label_held_then_resolved_by_sweep(
    redis_client: Any, unique: Any, metrics: LearnerMetrics
) -> None:
    spec = make_spec(unique)
    core = _core(spec, redis_client, metrics)
    now = time.time()
    out = core.process([label_msg("e1", "true", now, 0)])
    assert [r.outcome for r in out.results] == ["early"] and core.labels_learned == 0
    assert redis_client.exists(f"{spec.redis_prefix}:early:e1")
    # a second label for the same held event is a duplicate
    assert [r.outcome for r in core.process([label_msg("e1", 1, now, 1)]).results] == ["duplicate"]
    assert core.sweep().results == []  # still not served
    serve(redis_client, spec, core, "e1", 2.0, now - 1)
    out = core.sweep()
    assert [r.outcome for r in out.results] == ["resolved"]
    assert core.labels_learned == 1 and len(out.training_log) == 1
    assert core.sweep().results == []  # not learned twice
    # once a snapshot contains it, the held label is cleaned up
    core.joiner.published_seq = core.labels_learned
    core.sweep()
    assert not redis_client.exists(f"{spec.redis_prefix}:early:e1")


def test_a_backlog_of_held_labels_is_swept_in_chunks(redis_client: Any, unique: Any) -> None:
    """Each sweep looks at one chunk of held labels, so a backlog never stalls the learner,
    and every held label is resolved once its event is served, over a few sweeps."""
    from models.join import SWEEP_HELD_CHUNK

    spec = make_spec(unique)
    core = _core(spec, redis_client)
    now = time.time()
    n = 2 * SWEEP_HELD_CHUNK + 37
    out = core.process([label_msg(f"e{i}", i % 2 == 0, now, i) for i in range(n)])
    assert {r.outcome for r in out.results} == {"early"}
    for i in range(0, n, 3):  # a third of the events get served
        serve(redis_client, spec, core, f"e{i}", float(i), now - 1)
    served = len(range(0, n, 3))
    sizes = []
    for _ in range(3):
        got = core.sweep().results
        sizes.append(len(got))
        assert all(r.outcome == "resolved" for r in got)
    assert sum(sizes) == served and core.labels_learned == served
    assert max(sizes) <= SWEEP_HELD_CHUNK // 3 + 1, sizes  # one chunk per sweep
    assert core.sweep().results == []  # the cursor wrapped: nothing learned twice
    for i in range(1, n, 3):  # more events come
        serve(redis_client, spec, core, f"e{i}", float(i), now - 1)
    more = sum(len(core.sweep().results) for _ in range(4))
    assert more == len(range(1, n, 3)) and core.labels_learned == served + more


def test_unknown_when_event_never_served(redis_client: Any, unique: Any, metrics: LearnerMetrics) -> None:
    spec = make_spec(unique, labels={"horizon": 0.3})
    core = _core(spec, redis_client, metrics)
    now = time.time()
    assert [r.outcome for r in core.process([label_msg("e9", 0, now, 0)]).results] == ["early"]
    time.sleep(0.4)
    out = core.sweep()
    assert [r.outcome for r in out.results] == ["unknown"]
    assert _joins(metrics, spec, "unknown") == 1
    assert not redis_client.zcard(f"{spec.redis_prefix}:join:early")


def test_expired_label_and_expiry_counted(redis_client: Any, unique: Any, metrics: LearnerMetrics) -> None:
    spec = make_spec(unique, labels={"horizon": 0.3})
    core = _core(spec, redis_client, metrics)
    serve(redis_client, spec, core, "e1", 1.0, time.time())
    serve(redis_client, spec, core, "e2", 1.0, time.time())
    time.sleep(0.4)
    out = core.sweep()
    assert out.expiries == 2 and core.expiries == 2
    assert metrics.registry.get_sample_value("weir_label_expiries_total", {"pipeline": spec.name}) == 2
    out = core.process([label_msg("e1", 1, time.time(), 0)])
    assert [r.outcome for r in out.results] == ["expired"] and core.labels_learned == 0


def test_a_backlog_of_expiries_is_moved_in_bounded_slices(
    redis_client: Any, unique: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep moves at most EXPIRE_CHUNK x EXPIRE_CALLS expiries (each script call a short
    slice of Redis time); the rest go with the next sweeps, none counted twice."""
    import models.join as join

    monkeypatch.setattr(join, "EXPIRE_CHUNK", 40)
    monkeypatch.setattr(join, "EXPIRE_CALLS", 2)
    spec = make_spec(unique, labels={"horizon": 60})
    core = _core(spec, redis_client)
    served_at = time.time() - 61  # deadlines passed a second ago
    pipe = redis_client.pipeline(transaction=False)
    ServedStore(spec).add_to_pipeline(
        pipe, [_prediction(f"e{i}", served_at) for i in range(205)], now=served_at
    )
    pipe.execute()
    counts = [core.sweep(snapshot=False).expiries for _ in range(4)]
    assert counts == [80, 80, 45, 0]
    assert redis_client.zcard(Keys(spec).expired) == 205 and core.expiries == 205


def test_hit_removes_pending_so_no_expiry(redis_client: Any, unique: Any) -> None:
    spec = make_spec(unique, labels={"horizon": 0.3})
    core = _core(spec, redis_client)
    serve(redis_client, spec, core, "e1", 1.0, time.time())
    core.process([label_msg("e1", 1, time.time(), 0)])
    time.sleep(0.4)
    assert core.sweep().expiries == 0


def test_invalid_labels_dead_lettered(redis_client: Any, unique: Any, metrics: LearnerMetrics) -> None:
    spec = make_spec(unique)
    core = _core(spec, redis_client, metrics)
    now = time.time()
    msgs = [
        LabelMessage(value=b"not json", partition=2, offset=7),
        label_msg("e1", "maybe", now, 8, partition=2),
        LabelMessage(value=b'{"event_id": "e2"}', partition=2, offset=9),
    ]
    out = core.process(msgs)
    assert [r.outcome for r in out.results] == ["invalid"] * 3
    dls = [decode_dead_letter(d) for d in out.dead_letters]
    assert [d["reason"] for d in dls] == ["not_json", "label_type", "missing_field"]
    assert dls[1]["partition"] == 2 and dls[1]["offset"] == 8
    assert dls[1]["topic"] == spec.topics.labels and "binary label" in dls[1]["detail"]
    assert core.offsets == {2: 10} and _joins(metrics, spec, "invalid") == 3
    for reason in ("not_json", "label_type", "missing_field"):
        labels = {"pipeline": spec.name, "reason": reason}
        assert metrics.registry.get_sample_value("weir_dead_letters_total", labels) == 1


def test_status_written(redis_client: Any, unique: Any) -> None:
    spec = make_spec(unique, learner={"snapshot_every_labels": 2})
    registry = ModelRegistry(redis_client, spec)
    core = LearnerCore.start(spec, registry, redis_client)
    now = time.time()
    for i in range(2):
        serve(redis_client, spec, core, f"e{i}", float(i), now)
    out = core.process([label_msg(f"e{i}", i, now, i) for i in range(2)])
    assert out.snapshot_id == "v1.1"
    status = orjson.loads(redis_client.get(status_key(spec)))
    assert status["labels_learned"] == 2 and status["joins"] == {"hit": 2}
    assert status["snapshot_id"] == "v1.1" and status["metrics"]["v1"]["n"] == 2


def test_crash_recovery_no_loss_no_double_learning(redis_client: Any, unique: Any) -> None:
    """Learn 3, snapshot, learn 2 more, die; the restart replays from the snapshot's offsets:
    the 2 lost-with-the-process labels are learned again, the first 3 are not."""
    spec = make_spec(unique, learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 3600})
    registry = ModelRegistry(redis_client, spec, key=b"k")
    core = LearnerCore.start(spec, registry, redis_client)
    assert core.version_id == "v1" and registry.alias("champion") == "v1"
    now = time.time()
    msgs = []
    for i in range(5):
        serve(redis_client, spec, core, f"e{i}", float(i), now)
        msgs.append(label_msg(f"e{i}", i % 2, now, offset=100 + i))
    core.process(msgs[:3])
    sid = core.maybe_snapshot(force=True)
    assert sid == "v1.1"
    core.process(msgs[3:])
    assert core.labels_learned == 5
    del core  # SIGKILL: nothing after the snapshot survives except Redis markers

    again = LearnerCore.start(spec, registry, redis_client)
    assert again.labels_learned == 3 and again.offsets == {0: 103}
    out = again.process(msgs[3:])  # what the consumer reads after seeking to 103
    assert [r.outcome for r in out.results] == ["hit", "hit"]
    assert again.labels_learned == 5
    # a redelivery of an already-snapshotted label is a duplicate
    assert [r.outcome for r in again.process(msgs[:1]).results] == ["duplicate"]
    # and the markers of this run are honoured within the run
    assert [r.outcome for r in again.process(msgs[3:4]).results] == ["duplicate"]
    # after the next restart, the new run's snapshotted markers count as learned
    again.maybe_snapshot(force=True)
    third = LearnerCore.start(spec, registry, redis_client)
    assert third.labels_learned == 5
    assert [r.outcome for r in third.process(msgs[3:]).results] == ["duplicate", "duplicate"]


def test_served_records_are_deleted_once_their_labels_are_in_a_snapshot(
    redis_client: Any, unique: Any
) -> None:
    """A joined event's served record stays while a crash could need it (until the
    snapshot containing its label), then goes with the next call; its learned state stays."""
    spec = make_spec(unique, learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 3600})
    registry = ModelRegistry(redis_client, spec, key=b"k")
    core = LearnerCore.start(spec, registry, redis_client)
    keys = Keys(spec)
    now = time.time()
    for i in range(3):
        serve(redis_client, spec, core, f"e{i}", float(i), now)
    core.process([label_msg(f"e{i}", 1, now, offset=i) for i in range(2)])
    assert redis_client.exists(keys.served("e0"), keys.served("e1")) == 2  # not in a snapshot yet
    assert core.joiner.learned(["e0", "e1"]) == [True, True]
    assert core.maybe_snapshot(force=True) == "v1.1"
    core.process([label_msg("e2", 0, now, offset=2)])  # the next call deletes them
    assert redis_client.exists(keys.served("e0"), keys.served("e1")) == 0
    assert redis_client.exists(keys.served("e2")) == 1  # learned after the snapshot: kept
    assert core.joiner.learned(["e0", "e1", "e2"]) == [True, True, True]
    # a label delivered again for a deleted record is still a duplicate
    assert [r.outcome for r in core.process([label_msg("e0", 1, now, offset=3)]).results] == ["duplicate"]
    # a crash now: e2 (after the snapshot) is learned again from its record
    again = LearnerCore.start(spec, registry, redis_client)
    assert [r.outcome for r in again.process([label_msg("e2", 0, now, offset=2)]).results] == ["hit"]


def _counting_client(settings: Any, calls: list[str]) -> Any:
    """The real Redis client, appending to ``calls`` each command (and pipeline) it sends."""
    import redis

    class Counting(redis.Redis):
        def execute_command(self, *args: Any, **options: Any) -> Any:
            calls.append(str(args[0]))
            return super().execute_command(*args, **options)

        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            calls.append("PIPELINE")
            return super().pipeline(transaction, shard_hint)

    return Counting.from_url(settings.redis_url, **settings.redis_kwargs())


def test_a_batch_of_labels_is_one_redis_call(redis_client: Any, unique: Any, settings: Any) -> None:
    """Join (and the previous batch's markers) in one script call; no per-label call."""
    calls: list[str] = []
    client = _counting_client(settings, calls)
    spec = make_spec(unique)
    core = _core(spec, client)
    now = time.time()
    for i in range(200):
        serve(redis_client, spec, core, f"e{i}", float(i), now)
    for lo in (0, 100):
        calls.clear()
        out = run_step(
            core.process_step([label_msg(f"e{i}", i % 2, now, offset=i) for i in range(lo, lo + 100)])
        )
        assert [r.outcome for r in out.results] == ["hit"] * 100
        assert calls in (["EVALSHA"], ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]), calls  # loaded on first use
    assert core.labels_learned == 200 and core.joiner.unwritten == 100
    assert core.joiner.learned([f"e{i}" for i in range(200)]) == [True] * 200
    client.close()


def test_early_labels_are_held_in_one_call(redis_client: Any, unique: Any, settings: Any) -> None:
    """A batch of early labels: the join's call and one call holding them all (not three
    commands per label); the holds are the labels, the index has their deadlines."""
    calls: list[str] = []
    client = _counting_client(settings, calls)
    spec = make_spec(unique)
    core = _core(spec, client)
    now = time.time()
    run_step(core.process_step([label_msg("warm", 1, now, offset=0)]))  # scripts loaded
    calls.clear()
    out = run_step(core.process_step([label_msg(f"e{i}", i % 2, now, offset=i + 1) for i in range(50)]))
    assert [r.outcome for r in out.results] == ["early"] * 50
    assert calls == ["EVALSHA", "EVALSHA"], calls
    keys = Keys(spec)
    assert redis_client.zcard(keys.early_index) == 51
    assert redis_client.zscore(keys.early_index, "e7") == pytest.approx(now + spec.labels.horizon)
    assert orjson.loads(redis_client.get(keys.early("e7")))["src"] == "0:8"
    assert 0 < redis_client.pttl(keys.early("e7")) <= spec.labels.horizon * 1000
    # a second label for a held event (another message) is a duplicate, this one's retry is not
    again = run_step(core.process_step([label_msg("e7", 0, now, offset=60)]))
    assert [r.outcome for r in again.results] == ["duplicate"]
    client.close()


def _held_backlog(
    redis_client: Any, unique: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, Any, Any, float]:
    """A learner whose sweep looks at chunks of 20 held labels, with 3 chunks and 7 labels
    (``e0``...) held, none served yet: ``(chunk, spec, core, now)``."""
    import models.join

    chunk = 20
    monkeypatch.setattr(models.join, "SWEEP_HELD_CHUNK", chunk)
    spec = make_spec(unique)
    core = _core(spec, redis_client)
    now = time.time()
    core.process([label_msg(f"e{i}", i % 2 == 0, now, i) for i in range(3 * chunk + 7)])
    return chunk, spec, core, now


def test_a_backlog_of_held_labels_goes_on_between_sweeps(
    redis_client: Any, unique: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a full chunk that resolved labels, the next chunks are looked at at once
    (held_step), not one chunk per sweep; each label is learned once."""
    chunk, spec, core, now = _held_backlog(redis_client, unique, monkeypatch)
    n = 3 * chunk + 7
    for i in range(n):
        serve(redis_client, spec, core, f"e{i}", float(i), now - 1)
    learned = len(core.sweep().results)
    assert learned == chunk and core.joiner.more_held
    steps = 0
    while core.joiner.more_held:
        learned += len(run_step(core.held_step()).results)
        steps += 1
    assert steps == 3  # two more full chunks, then the last 7
    assert learned == n == core.labels_learned
    assert core.sweep().results == []  # nothing learned twice
    assert not core.joiner.more_held
    # Five more held behind them; once a snapshot has the first n, a sweep lets their holds
    # go chunk after chunk and reaches the five at once, not a chunk per sweep.
    later = [f"e{i}" for i in range(n, n + 5)]
    core.process([label_msg(e, True, now + 1, n + i) for i, e in enumerate(later)])
    for e in later:
        serve(redis_client, spec, core, e, 1.0, now - 1)
    core.joiner.published(core.labels_learned)
    out = core.sweep()
    assert out.results == [] and core.joiner.more_held  # a full chunk of holds let go
    while core.joiner.more_held:
        learned += len(run_step(core.held_step()).results)
    assert learned == n + 5 == core.labels_learned
    held = {m.decode() for m in redis_client.zrange(Keys(spec).early_index, 0, -1)}
    assert set(later) <= held  # learned, held until a snapshot has them


def test_held_labels_waiting_for_their_events_are_looked_at_again(
    redis_client: Any, unique: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``joiner.held_waiting`` says when a walk of the early index left labels waiting for
    their events, even in a chunk it walked past (the learner looks again within
    HELD_EVERY, not a sweep later), and goes False once none waits."""
    chunk, spec, core, now = _held_backlog(redis_client, unique, monkeypatch)
    n = 3 * chunk + 7
    ids = [f"e{i}" for i in range(n)]
    second = set(ids[chunk : 2 * chunk])
    for i, e in enumerate(ids):
        if e not in second:
            serve(redis_client, spec, core, e, float(i), now - 1)
    learned = len(core.sweep().results)
    walk = 0
    while core.joiner.more_held or walk == 0:  # to the index's end, past the second chunk
        learned += len(run_step(core.held_step()).results)
        walk += 1
    assert learned == n - chunk
    assert core.joiner.held_waiting  # the second chunk's labels wait, walked past
    for i, e in enumerate(ids):
        if e in second:
            serve(redis_client, spec, core, e, float(i), now - 1)
    steps = 0
    while core.joiner.held_waiting and steps < 20:
        learned += len(run_step(core.held_step()).results)
        steps += 1
    assert learned == n == core.labels_learned
    assert not core.joiner.held_waiting and steps < 20
    assert run_step(core.held_step()).results == []  # nothing learned twice


def test_follow_champion(redis_client: Any, unique: Any) -> None:
    spec = make_spec(unique)
    registry = ModelRegistry(redis_client, spec)
    core = LearnerCore.start(spec, registry, redis_client)
    v2 = registry.save(build_model(spec.model), parent="v1", trigger="drift", reason="test", meta={})
    registry.set_alias("champion", v2.id)
    sid = core.maybe_snapshot(force=True)
    assert core.version_id == "v2" and sid == "v2.1"


def test_rollback_returns_the_predecessor_with_what_it_learned(redis_client: Any, unique: Any) -> None:
    """A promotion parks the outgoing version; a rollback resumes it, not its first blob."""
    spec = make_spec(unique)
    registry = ModelRegistry(redis_client, spec, key=b"k")
    core = LearnerCore.start(spec, registry, redis_client)
    now = time.time()
    for i in range(200):  # v1 learns online: a > 0 is True
        eid = f"e{i}"
        a = float(i % 20 - 10)
        serve(redis_client, spec, core, eid, a, now)
        core.process([label_msg(eid, a > 0, now, offset=i)])
    assert core.labels_learned == 200
    learned = predict(core.model, {"a": 9.0}, spec.task)[1]
    first_blob = predict(registry.load("v1")[0], {"a": 9.0}, spec.task)[1]
    assert learned != first_blob, "v1 learned nothing online"

    v2 = registry.save(build_model(spec.model), parent="v1", trigger="manual", reason="forced", meta={})
    registry.set_alias("champion", v2.id)
    assert core.follow_champion() and core.version_id == "v2"
    registry.rollback("champion")
    assert core.follow_champion() and core.version_id == "v1"
    assert predict(core.model, {"a": 9.0}, spec.task)[1] == learned
    _, parked = registry.load_live("v2")
    assert parked is not None and parked["parked_by"] == "learner"

    # the parked blob is checked like every other: a tampered one is refused
    redis_client.set(f"{spec.redis_prefix}:registry:parkblob:v1", b"not a pickle")
    with pytest.raises(IntegrityError, match="parked state of v1"):
        registry.load_live("v1")


def test_snapshot_every_seconds(redis_client: Any, unique: Any) -> None:
    spec = make_spec(unique, learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 10})
    clock = [1000.0]
    registry = ModelRegistry(redis_client, spec)
    core = LearnerCore.start(spec, registry, redis_client, clock=lambda: clock[0])
    now = time.time()
    serve(redis_client, spec, core, "e1", 1.0, now)
    assert core.process([label_msg("e1", 1, now, 0)]).snapshot_id is None
    clock[0] += 10
    assert core.sweep().snapshot_id == "v1.1"
    clock[0] += 60
    assert core.sweep().snapshot_id is None  # nothing new: no snapshot


def test_resolved_early_label_lost_in_crash_is_relearned(redis_client: Any, unique: Any) -> None:
    spec = make_spec(unique, learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 3600})
    registry = ModelRegistry(redis_client, spec)
    core = LearnerCore.start(spec, registry, redis_client)
    now = time.time()
    core.process([label_msg("e1", 1, now, 0)])  # early, held
    core.maybe_snapshot(force=True)  # offsets move past the label
    serve(redis_client, spec, core, "e1", 1.0, now)
    assert [r.outcome for r in core.sweep().results] == ["resolved"]
    del core  # dies before the next snapshot
    again = LearnerCore.start(spec, registry, redis_client)
    assert again.labels_learned == 0
    assert [r.outcome for r in again.sweep().results] == ["resolved"]  # learned again
    assert again.labels_learned == 1
    assert again.sweep().results == []


def _prediction(eid: str, ts: float) -> Prediction:
    return Prediction(eid, "ent", ts, "lr", "v1", True, {"True": 0.6, "False": 0.4}, {"a": 1.0}, ts)


def test_join_state_bounded_by_the_horizon_without_a_learner(redis_client: Any, unique: Any) -> None:
    """A scorer serving with no learner running: the pending set keeps at most two
    horizons of ids, and every key of the join expires (#11 point 8a)."""
    horizon = 10.0
    spec = make_spec(unique, labels={"horizon": horizon})
    store, keys = ServedStore(spec), Keys(spec)
    t0 = time.time() - 1000
    per_second, seconds = 20, 120
    sizes = []
    for sec in range(seconds):  # 120 s of serving (clock simulated), 20 events a second
        now = t0 + sec
        pipe = redis_client.pipeline(transaction=False)
        store.add_to_pipeline(pipe, [_prediction(f"e{sec}-{j}", now) for j in range(per_second)], now=now)
        pipe.execute()
        sizes.append(redis_client.zcard(keys.pending))
    bound = int(2 * horizon + 1) * per_second  # deadlines within [now - horizon, now + horizon]
    assert max(sizes) <= bound, max(sizes)
    assert sizes[-1] >= horizon * per_second  # still there for a learner that comes back
    assert 0 < redis_client.pttl(keys.pending) <= 2 * horizon * 1000
    assert 0 < redis_client.pttl(keys.served(f"e{seconds - 1}-0")) <= horizon * 1000
    # what the learner writes expires too: held labels and their index
    core = _core(spec, redis_client)
    core.process([label_msg("never-served", 1, time.time(), 0)])
    assert 0 < redis_client.pttl(keys.early("never-served")) <= horizon * 1000
    assert 0 < redis_client.pttl(keys.early_index) <= 2 * horizon * 1000


def test_retried_hold_counts_early_and_a_second_label_duplicate(redis_client: Any, unique: Any) -> None:
    """A hold whose call timed out but was applied is retried: the retry finds its own
    hold (same source message) and says ``early``; another message for the event is a
    ``duplicate``."""
    spec = make_spec(unique)
    core = _core(spec, redis_client)
    lab = Label("e1", True, time.time())
    assert [r.outcome for r in core.joiner.join([lab], sources=["0:5"])] == ["early"]
    assert [r.outcome for r in core.joiner.join([lab], sources=["0:5"])] == ["early"]  # the retry
    assert [r.outcome for r in core.joiner.join([lab], sources=["1:9"])] == ["duplicate"]
    assert redis_client.zcard(Keys(spec).early_index) == 1


def _label_path(spec: PipelineSpec, redis_client: Any, core: LearnerCore, drive: Any) -> list[Any]:
    """A label path through every call of the join: hits and early labels (held), the
    holds resolved by a sweep, a duplicate, then a sweep a horizon later (expiries).
    ``drive(step)`` runs a step; returns what each step returned."""
    now = time.time()
    for i in range(13):  # e10-e12 never labelled: they expire
        serve(redis_client, spec, core, f"e{i}" if i < 10 else f"x{i}", float(i), now - 5)
    out: list[Any] = []
    first = drive(core.process_step([label_msg(f"e{i}", i % 2, now, offset=i) for i in range(15)], now))
    out.append([r.outcome for r in first.results])
    out.append(core.joiner.unwritten)  # the hits' marks, sent with the next call
    for i in range(10, 15):
        serve(redis_client, spec, core, f"e{i}", float(i), now - 1)
    swept = drive(core.sweep_step(now + 1))
    out.append((swept.expiries, sorted((r.outcome, r.event_id) for r in swept.results)))
    again = drive(core.process_step([label_msg("e3", 1, now, offset=15)], now + 2))
    out.append([r.outcome for r in again.results])
    late = drive(core.sweep_step(now + 2 * spec.labels.horizon + 60))
    out.append((late.expiries, [r.outcome for r in late.results]))
    out.append((core.labels_learned, core.joiner.unwritten))
    return out


def label_path_both_drivers(
    settings: Any, redis_client: Any, core_client: Any, name: str, buckets: int
) -> tuple[list[Any], list[Any], list[str]]:
    """:func:`_label_path` with role ``learner``'s blocking driver and with role ``all``'s
    (``run_async``'s: an asyncio client of ``settings``, the learning on the loop's
    thread), each on its own pipeline ``name``-blocking / ``name``-async with ``buckets``.
    ``core_client`` is the async run's blocking client. Returns (blocking, asyncio,
    the calls the asyncio run sent to the worker thread)."""
    import asyncio

    from streams.learner import LearnerLoop

    def bucketed(tag: str) -> PipelineSpec:
        spec = make_spec(f"{name}-{tag}")
        return spec.model_copy(update={"redis": spec.redis.model_copy(update={"buckets": buckets})})

    blocking_spec = bucketed("blocking")
    blocking = _core(blocking_spec, redis_client)
    expected = _label_path(
        blocking_spec, redis_client, blocking, LearnerLoop(blocking_spec, settings, blocking)._drive
    )

    spec = bucketed("async")
    core = _core(spec, core_client)
    loop = LearnerLoop(spec, settings, core)
    threaded: list[str] = []

    async def on_thread(fn: Any, op: Any) -> Any:
        threaded.append(op.what)
        return fn(op)

    async def main() -> list[Any]:
        loop.aredis = settings.redis_async()
        aloop = asyncio.get_running_loop()

        def drive(step: Any) -> Any:  # from the path's thread, each step run on the loop
            return asyncio.run_coroutine_threadsafe(loop._drive_async(step, on_thread), aloop).result(60)

        try:
            return await asyncio.to_thread(_label_path, spec, redis_client, core, drive)
        finally:
            await loop.aredis.aclose()

    return expected, asyncio.run(main()), threaded


@pytest.mark.parametrize("buckets", [1, 4])
def test_role_all_awaits_the_label_path_on_an_asyncio_client(
    redis_client: Any, unique: Any, settings: Any, buckets: int
) -> None:
    """Role ``all``'s driver (``run_async``): the join, its holds, the marks, the sweep's
    expiries and held labels go through the loop's asyncio client: no blocking Redis call
    and no trip to the worker thread for them, and the same outcomes as the blocking
    driver of role ``learner`` on the same path."""
    calls: list[str] = []
    client = _counting_client(settings, calls)
    expected, got, threaded = label_path_both_drivers(settings, redis_client, client, unique, buckets)
    assert got == expected
    assert got[0] == ["hit"] * 10 + ["early"] * 5 and got[1] == 10
    assert got[2] == (0, [("resolved", f"e{i}") for i in range(10, 15)])
    assert got[3] == ["duplicate"] and got[4] == (3, []) and got[5] == (15, 0)
    assert calls == [] and threaded == []
    client.close()
