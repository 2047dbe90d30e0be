"""The scoring worker under faults, from outside: a real `weir worker --role scorer` process,
the real Kafka, and a PRIVATE redis-server (started here on a free port, so pausing it
disturbs no one else).

* Redis paused (SIGSTOP) for 20 s mid-stream: the worker stays up, shows
  ``weir_dependency_up{dependency="redis"} 0`` then 1, and every event gets its prediction.
  A SIGTERM during a second pause stops it within seconds and its successor loses nothing.
* A failure injected into the batches in flight (Redis refuses the feature script, NOPERM,
  for a few seconds) and poison events (the model raises on them): every good event is
  predicted, each poison event is dead-lettered with ``model_error``, nothing else is.
* Kafka refuses every prediction for good (the topic's ``max.message.bytes`` is too small):
  the worker exits with status 70 within seconds instead of staying up idle, and once the
  topic is fixed a restarted worker predicts every event: the failed batch was not acked.
* kill -9 of one of two scorers mid-stream, restart at once: the restarted one takes its
  static-membership slot and its partitions back within seconds and no event is lost. The
  recovery time is printed.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from river import linear_model

from models.factory import build_model
from models.registry import ModelRegistry
from tests.integration.conftest import wait_for
from tests.integration.private_redis import PrivateRedis
from tests.integration.processes import Worker, assigned_members, free_port, metric
from weir.contracts import decode_dead_letter
from weir.spec import PipelineSpec, parse_spec

POISON = 666.0


class PoisonClassifier(linear_model.LogisticRegression):
    """A logistic regression that raises on one input value: a model bug one event triggers."""

    def predict_proba_one(self, x: dict[Hashable, Any], **kwargs: Any) -> dict[bool | str | int, float]:
        if x.get("x") == POISON:
            raise ArithmeticError(f"poison input x={x['x']}")
        return super().predict_proba_one(x, **kwargs)


# -- a private Redis ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()  # continues it first: a failed test may leave it stopped


# -- the pipeline ------------------------------------------------------------------------------


@pytest.fixture
def spec(make_topics: Any, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch) -> PipelineSpec:
    """A small pipeline on the private Redis, with a champion model for the scorer to load."""
    base = parse_spec(
        {
            "name": "wfault",
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}, {"agg": "count", "window": "1h"}],
            "late_events": "ignore",
            "topics": {"partitions": 2},
            "model": {"name": "poisonable", "steps": [f"{__name__}.PoisonClassifier"]},
            "scoring": {"batch_size": 100, "batch_within": "20ms"},
        }
    )
    spec = make_topics.for_spec(base)
    registry = ModelRegistry(private_redis.client(), spec)
    model = build_model(spec.model, prefixes=("river.", "tests."))
    version = registry.save(model, parent=None, trigger="manual", reason="test")
    registry.set_alias("champion", version.id)
    # Every weir process this test starts reads the private Redis and may build the test's
    # model class (processes.py copies os.environ).
    monkeypatch.setenv("WEIR_REDIS_URL", private_redis.url)
    monkeypatch.setenv("WEIR_MODEL_ALLOW", "tests.")
    return spec


def _event(i: int, x: float | None = None) -> bytes:
    value = float(i % 50) if x is None else x
    return orjson.dumps(
        {"event_id": f"e{i}", "entity_id": f"c{i % 20}", "ts": time.time(), "data": {"x": value}}
    )


class Feeder(threading.Thread):
    """Sends events ``e0, e1, ...`` at ``rate`` per second until stopped; ``sent`` lists them."""

    def __init__(self, settings: Any, topic: str, rate: float, poison: set[int] | None = None) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({**settings.confluent_config(), "linger.ms": 5})
        self.topic, self.rate = topic, rate
        self.poison = poison or set()
        self.sent: list[tuple[str, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        i = 0
        while not self.halt.is_set():
            value = _event(i, POISON if i in self.poison else None)
            self.producer.produce(self.topic, value, f"c{i % 20}".encode())
            self.producer.poll(0)
            self.sent.append((f"e{i}", time.time()))
            i += 1
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        assert self.producer.flush(30) == 0

    def stop(self) -> list[str]:
        self.halt.set()
        self.join(60)
        return [eid for eid, _ in self.sent]


@dataclass
class Watcher:
    """Reads a topic from its beginning in a thread: ``seen`` maps event_id to (arrival, record)."""

    settings: Any
    topic: str
    seen: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    partitioned: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    halt: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        consumer = Consumer(
            {
                **self.settings.confluent_config(),
                "group.id": f"watch-{self.topic}-{time.time()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        meta = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        try:
            while not self.halt.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    if msg.error() is None:
                        rec = orjson.loads(msg.value() or b"{}")
                        self.records.append(rec)
                        if "event_id" in rec:
                            self.seen.setdefault(rec["event_id"], (time.time(), rec))
                            # the last copy: a redelivered event's prediction is scored again
                            self.partitioned[rec["event_id"]] = (msg.partition() or 0, rec)
        finally:
            consumer.close()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(10)


def _start(spec: PipelineSpec, tmp: Path, settings: Any, port: int) -> Worker:
    worker = Worker(spec, tmp, role="scorer", metrics_port=port)
    try:
        wait_for(
            lambda: assigned_members(settings, spec.consumer_group) == 1, 60, "the worker to join its group"
        )
    except BaseException:
        print(worker.tail())
        raise
    return worker


def _all_predicted(watcher: Watcher, ids: list[str], timeout: float, worker: Worker) -> None:
    def done() -> bool:
        return all(i in watcher.seen for i in ids)

    try:
        wait_for(done, timeout, f"predictions for all {len(ids)} events")
    except BaseException:
        missing = [i for i in ids if i not in watcher.seen]
        print(f"{len(missing)} missing, e.g. {missing[:10]}\n{worker.tail(60)}")
        raise


# -- the tests -----------------------------------------------------------------------------------


def test_redis_paused_20s_mid_stream_loses_nothing_and_the_worker_stays_up(
    settings: Any, spec: PipelineSpec, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    port = free_port()
    worker = _start(spec, tmp_path / "first", settings, port)
    predictions = Watcher(settings, spec.topics.predictions)
    feeder = Feeder(settings, spec.topics.events, rate=100)
    try:
        feeder.start()
        wait_for(lambda: len(predictions.seen) >= 100, 60, "the first 100 predictions")
        up = {"pipeline": spec.name, "dependency": "redis"}
        assert metric(port, "weir_dependency_up", **up) == 1

        private_redis.pause()
        paused_at = time.monotonic()
        wait_for(lambda: metric(port, "weir_dependency_up", **up) == 0, 15, "weir_dependency_up{redis} == 0")
        time.sleep(max(0.0, 20 - (time.monotonic() - paused_at)))
        assert worker.alive(), f"the worker exited during the Redis pause:\n{worker.tail()}"
        sent_during = len(feeder.sent)
        private_redis.resume()
        resumed_at, resumed_wall = time.monotonic(), time.time()

        # Resumes: a prediction scored after the server came back, then the backlog drained.
        def scored_after_resume() -> bool:
            return any(rec["scored_at"] >= resumed_wall for _, rec in list(predictions.seen.values()))

        wait_for(scored_after_resume, 15, "a prediction scored after Redis came back")
        first_new = time.monotonic() - resumed_at
        backlog = [eid for eid, _ in feeder.sent[:sent_during]]
        _all_predicted(predictions, backlog, 30, worker)
        drained = time.monotonic() - resumed_at
        wait_for(
            lambda: metric(port, "weir_dependency_up", **up) == 1, 15, "weir_dependency_up{redis} back to 1"
        )
        print(
            f"\nRedis paused {resumed_at - paused_at:.1f}s: first prediction {first_new:.1f}s after SIGCONT, "
            f"backlog of {len(backlog)} events predicted {drained:.1f}s after SIGCONT"
        )

        assert (metric(port, "weir_dependency_retries_total", **up) or 0) > 0
        dead = metric(port, "weir_dead_letters_total", pipeline=spec.name)
        assert dead == 0, f"{dead} dead letters: an outage must never dead-letter events"
        assert worker.alive(), worker.tail()

        # A SIGTERM during an outage: the worker stops soon (faust's shutdown would wait for
        # the batch in hand until Redis is back), acks nothing unfinished, exits 0, and its
        # successor predicts what it left.
        private_redis.pause()
        wait_for(lambda: metric(port, "weir_dependency_up", **up) == 0, 15, "weir_dependency_up{redis} == 0")
        t_term = time.monotonic()
        code = worker.stop()
        stopped = time.monotonic() - t_term
        assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{worker.tail()}"
        assert stopped < 20, f"SIGTERM took {stopped:.1f}s during the outage"
        private_redis.resume()
        print(f"SIGTERM during the outage: stopped in {stopped:.1f}s")
        worker = _start(spec, tmp_path / "successor", settings, free_port())
        ids = feeder.stop()
        _all_predicted(predictions, ids, 60, worker)
    finally:
        private_redis.resume()
        feeder.halt.set()
        predictions.stop()
        code = worker.stop()
    assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{worker.tail()}"


def test_failed_batches_are_redone_and_poison_events_dead_lettered(
    settings: Any, spec: PipelineSpec, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    port = free_port()
    worker = _start(spec, tmp_path, settings, port)
    predictions = Watcher(settings, spec.topics.predictions)
    dead_letters = Watcher(settings, spec.topics.dead_letters)
    poison = {150, 151, 420}
    feeder = Feeder(settings, spec.topics.events, rate=150, poison=poison)
    admin = private_redis.client()
    try:
        feeder.start()
        wait_for(lambda: len(feeder.sent) > 200, 30, "200 events sent")
        # Inject a failure into the batches in flight: Redis refuses the feature script
        # (NOPERM) for 3 s. Not the events' fault: they must be retried, not dead-lettered.
        admin.execute_command("ACL", "SETUSER", "default", "-evalsha")
        time.sleep(3)
        admin.execute_command("ACL", "SETUSER", "default", "+evalsha")
        wait_for(lambda: len(feeder.sent) > 500, 30, "500 events sent")
        ids = feeder.stop()
        good = [i for i in ids if int(i[1:]) not in poison]
        _all_predicted(predictions, good, 60, worker)
        wait_for(lambda: len(dead_letters.records) >= len(poison), 30, "the poison events' dead letters")
        time.sleep(2)  # nothing else may come

        retries = metric(port, "weir_dependency_retries_total", pipeline=spec.name, dependency="redis")
        assert retries and retries > 0, "the injected failure did not hit a batch"
        assert not poison & {int(i[1:]) for i in predictions.seen}
        letters = [decode_dead_letter(orjson.dumps(r)) for r in dead_letters.records]
        assert sorted(orjson.loads(d["value"])["event_id"] for d in letters) == sorted(
            f"e{i}" for i in poison
        )
        assert {d["reason"] for d in letters} == {"model_error"}
        assert all("ArithmeticError: poison input x=666.0" in d["detail"] for d in letters)
        assert metric(port, "weir_dead_letters_total", pipeline=spec.name, reason="model_error") == len(
            poison
        )
        assert worker.alive(), worker.tail()
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+evalsha")
        feeder.halt.set()
        predictions.stop()
        dead_letters.stop()
        code = worker.stop()
    assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{worker.tail()}"


def _set_topic_config(settings: Any, topic: str, name: str, value: str) -> None:
    entry = ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource("topic", topic, incremental_configs=[entry])
    admin = AdminClient(settings.confluent_config())  # kept alive until the futures are done
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(timeout=15)


def test_an_unrecoverable_agent_error_exits_the_process_and_acks_nothing(
    settings: Any, spec: PipelineSpec, tmp_path: Path
) -> None:
    worker = _start(spec, tmp_path / "first", settings, free_port())
    predictions = Watcher(settings, spec.topics.predictions)
    try:
        # Kafka now refuses every prediction for good: retrying cannot help, and staying up
        # without scoring would hide it. The worker must exit non-zero, soon.
        _set_topic_config(settings, spec.topics.predictions, "max.message.bytes", "64")
        producer = Producer(settings.confluent_config())
        for i in range(50):
            producer.produce(spec.topics.events, _event(i), f"c{i % 20}".encode())
        assert producer.flush(30) == 0
        sent_at = time.monotonic()
        try:
            worker.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker is still up 30 s after its agent failed for good:\n{worker.tail()}")
        exited = time.monotonic() - sent_at
        assert worker.proc.returncode == 70, worker.tail()
        assert "failed: OutputRejected" in worker.tail(200)
        print(f"\nworker exited with 70 {exited:.1f}s after the events were sent")
        assert not predictions.seen

        # Fixed topic, restarted worker: the failed batches were never acked, so they come again.
        _set_topic_config(settings, spec.topics.predictions, "max.message.bytes", "1048588")
        worker = _start(spec, tmp_path / "second", settings, free_port())
        _all_predicted(predictions, [f"e{i}" for i in range(50)], 60, worker)
    finally:
        predictions.stop()
        worker.stop()


def _partitions_of(settings: Any, spec: PipelineSpec, instance_suffix: str) -> set[int]:
    """Events partitions held by the static member whose ``group.instance.id`` ends so."""
    admin = AdminClient(settings.confluent_config())
    group = spec.consumer_group
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    held: set[int] = set()
    for m in desc.members:
        if (m.group_instance_id or "").endswith(instance_suffix) and m.assignment:
            held |= {tp.partition for tp in m.assignment.topic_partitions if tp.topic == spec.topics.events}
    return held


def test_kill9_of_one_of_two_scorers_recovers_fast_and_loses_nothing(
    settings: Any, spec: PipelineSpec, tmp_path: Path
) -> None:
    """Two scorers on one host are two static members (slots 0 and 1, no fencing); the
    restarted one takes its slot and its partitions back without a session timeout."""
    a = _start(spec, tmp_path / "a", settings, free_port())
    b = Worker(spec, tmp_path / "b", role="scorer", metrics_port=free_port())
    predictions = Watcher(settings, spec.topics.predictions)
    feeder = Feeder(settings, spec.topics.events, rate=100)
    try:
        wait_for(lambda: assigned_members(settings, spec.consumer_group) == 2, 60, "two scorers in the group")
        mine = wait_for(lambda: _partitions_of(settings, spec, ".scorer.0"), 30, "slot 0's partitions")
        assert _partitions_of(settings, spec, ".scorer.1"), "the second scorer has slot 1"
        feeder.start()
        wait_for(lambda: len(predictions.seen) >= 300, 60, "300 predictions")
        a.kill()
        killed_wall, killed = time.time(), time.monotonic()
        a = Worker(spec, tmp_path / "a2", role="scorer", metrics_port=free_port())

        def recovered() -> bool:
            return any(
                rec["scored_at"] >= killed_wall and part in mine
                for part, rec in list(predictions.partitioned.values())
            )

        wait_for(recovered, 60, f"a prediction on partitions {sorted(mine)} after the kill")
        recovery = time.monotonic() - killed
        print(f"\nkill -9 to the first new prediction on its partitions (restart included): {recovery:.1f}s")
        ids = feeder.stop()
        _all_predicted(predictions, ids, 60, a)
        assert _partitions_of(settings, spec, ".scorer.0") == mine
        assert b.alive(), b.tail()
        assert recovery < 20, f"recovery took {recovery:.1f}s; static membership should make it seconds"
    finally:
        feeder.halt.set()
        predictions.stop()
        a.stop()
        b.stop()


def test_rerunning_a_partly_applied_feature_batch_serves_what_one_run_serves(
    settings: Any, redis_client: Any, unique: str
) -> None:
    """What the worker relies on when it retries the feature step of a batch after a failure
    whose outcome it does not know (a timeout: Redis may have applied none, some or all of
    the pipeline), and when it bisects a batch around a poison event: on the real Redis,
    running the batch again serves every event the features of one single run, and stores
    each event once."""
    import asyncio

    from features.online import RedisFeatureStore
    from weir.contracts import parse_event

    def spec_named(name: str) -> PipelineSpec:
        return parse_spec(
            {
                "name": name,
                "task": "binary",
                "fields": {"x": "numeric"},
                "features": [
                    {"agg": "raw", "field": "x"},
                    {"agg": "count", "window": "1h"},
                    {"agg": "sum", "field": "x", "window": "1h"},
                    {"agg": "since_prev", "window": "1d"},
                ],
                "lateness": "30s",
                "model": {"name": "m", "steps": ["river.linear_model.LogisticRegression"]},
            }
        )

    once, again = spec_named(f"once-{unique}"), spec_named(f"again-{unique}")
    t0 = time.time() - 600
    raw = [
        orjson.dumps(
            {"event_id": f"e{i}", "entity_id": f"c{i % 3}", "ts": t0 + i - 40 * (i == 7), "data": {"x": i}}
        )
        for i in range(12)
    ]  # e7 is later than the lateness: late in every run

    async def run() -> None:
        client = settings.redis_async()
        try:
            ref_store, store = RedisFeatureStore(once), RedisFeatureStore(again)
            events = [parse_event(r, once, time.time()) for r in raw]
            reference = await ref_store.acompute_batch(client, events)
            # A failed attempt that Redis applied in part (a prefix: a pipeline runs in order).
            await store.acompute_batch(client, events[:5])
            retried = await store.acompute_batch(client, events)
            # Bisection around a poison event re-runs halves of the batch, left first.
            halves = await store.acompute_batch(client, events[:6]) + await store.acompute_batch(
                client, events[6:]
            )
        finally:
            await client.aclose()
        assert [r.features for r in retried] == [r.features for r in reference]
        assert [r.features for r in halves] == [r.features for r in reference]
        assert [r.status for r in reference].count("late") == 1 and reference[7].status == "late"
        assert [r.status for r in retried] == ["duplicate"] * 5 + [r.status for r in reference[5:]]
        assert all(r.status in ("duplicate", "late") for r in halves)

    try:
        asyncio.run(run())
        for entity in ("c0", "c1", "c2"):  # each event stored once
            assert redis_client.zcard(f"{again.redis_prefix}:win:{entity}") == redis_client.zcard(
                f"{once.redis_prefix}:win:{entity}"
            )
    finally:
        for spec in (once, again):
            keys = list(redis_client.scan_iter(match=f"{spec.redis_prefix}:*", count=1000))
            if keys:
                redis_client.delete(*keys)
