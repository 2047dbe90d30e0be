"""Faults injected into the learner from outside, through real processes and servers.

``weir worker SPEC --role all`` and ``--role learner`` run as subprocesses on the shared
Kafka and on a PRIVATE ``redis-server`` this module starts on a free port (the shared
Redis is never paused). Labels flow from a producer thread while the fault happens:

* kill -9 of role ``all`` mid-stream, then a restart: labels learned == labels sent,
  exactly (the restart reads from its snapshot's offsets; the learned markers' lineage
  makes it learn again what the lost model state had learned, and nothing else);
* SIGSTOP of Redis for ~20 s under role ``learner`` and role ``all``: the process stays
  alive, ``weir_dependency_up{dependency="redis"}`` goes to 0 and back to 1, and labels
  learned == labels sent, exactly.

Printed: the time from the fault's end to the last label learned.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from models.factory import build_model, predict
from models.join import Keys, LabelJoiner, ServedStore
from models.learner import LabelMessage, LearnerCore, status_key
from models.registry import ModelRegistry
from streams.learner import LearnerLoop
from weir.resilience import Backoff, DependencyHealth
from weir.settings import Settings
from weir.spec import PipelineSpec
from weir.types import Prediction

from .private_redis import PrivateRedis
from .processes import Worker, free_port, metric
from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration

#: Seconds for a worker to start (process start, faust, first assignment) and catch up.
START_WAIT = 90.0
#: Seconds Redis stays paused.
PAUSE = 20.0


@pytest.fixture
def private_redis(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrivateRedis]:
    """A private Redis; the worker subprocesses this test starts use it and the shared Kafka."""
    server = PrivateRedis(tmp_path / "redis")
    monkeypatch.setenv("WEIR_REDIS_URL", server.url)
    monkeypatch.setenv("WEIR_KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    try:
        yield server
    finally:
        server.stop()


def _spec(unique: str, make_topics: Any) -> PipelineSpec:
    # Snapshots rarer than a consumer group's commits (faust: every second): a learner
    # that resumed at the group's offsets rather than its snapshot's would lose the labels
    # learned between the snapshot and the last commit (the old role all did: 0 lost only
    # when snapshots happened to be more frequent than commits).
    spec = make_spec(
        unique,
        scoring={"batch_size": 200, "batch_within": 0.05},
        learner={"snapshot_every_labels": 5000, "snapshot_every_seconds": 3.0},
    )
    return make_topics.for_spec(spec, partitions=2)  # type: ignore[no-any-return]


def _label(i: int, now: float) -> tuple[bytes, bytes]:
    return f"e{i}".encode(), orjson.dumps({"event_id": f"e{i}", "label": i % 10 > 4, "ts": now})


class LabelFeed(threading.Thread):
    """Produces labels ``lo..hi-1`` at about ``rate`` per second, in the background."""

    def __init__(self, settings: Settings, spec: PipelineSpec, lo: int, hi: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({**settings.confluent_config(), "linger.ms": 5})
        self.topic, self.lo, self.hi, self.rate = spec.topics.labels, lo, hi, rate
        self.error: str | None = None

    def run(self) -> None:
        t0, now = time.monotonic(), time.time()
        for i in range(self.lo, self.hi):
            key, value = _label(i, now)
            self.producer.produce(self.topic, value, key)
            self.producer.poll(0)
            ahead = (i - self.lo + 1) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        if self.producer.flush(30) != 0:
            self.error = "labels undelivered"


def _send_labels(settings: Settings, spec: PipelineSpec, lo: int, hi: int) -> None:
    feed = LabelFeed(settings, spec, lo, hi, rate=1e9)
    feed.run()
    assert feed.error is None


def _send_events(settings: Settings, spec: PipelineSpec, n: int) -> None:
    p = Producer({**settings.confluent_config(), "linger.ms": 5})
    now = time.time()
    for i in range(n):
        ev = {
            "event_id": f"e{i}",
            "entity_id": f"u{i % 13}",
            "ts": now - 60 + i * 0.001,
            "data": {"a": i % 10},
        }
        p.produce(spec.topics.events, orjson.dumps(ev), f"u{i % 13}".encode())
    assert p.flush(30) == 0


def _serve(client: Any, spec: PipelineSpec, n: int) -> None:
    """Served records as a scorer writes them (for role learner, which scores nothing)."""
    model, now = build_model(spec.model), time.time()
    preds = []
    for i in range(n):
        y, proba = predict(model, {"a": float(i % 10)}, spec.task)
        preds.append(
            Prediction(
                f"e{i}", f"u{i % 13}", now - 30, spec.model.name, "v1", y, proba, {"a": float(i % 10)}, now
            )
        )
    pipe = client.pipeline(transaction=False)
    ServedStore(spec).add_to_pipeline(pipe, preds)
    pipe.execute()


def _wait(check: Any, timeout: float, what: str, worker: Worker | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if worker is not None and not worker.alive():
            pytest.fail(f"the worker died waiting for {what}:\n{worker.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{worker.tail()}" if worker is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{tail}")
        time.sleep(interval)


def _learned(client: Any, spec: PipelineSpec) -> int:
    """Labels learned, as ``weir status`` shows them (-1 while Redis does not answer)."""
    try:
        raw = client.get(status_key(spec))
    except redis.RedisError:
        return -1
    return int(orjson.loads(raw)["labels_learned"]) if raw else 0


def _all_served(client: Any, spec: PipelineSpec, n: int) -> bool:
    keys = Keys(spec)
    return all(
        client.exists(*[keys.served(f"e{i}") for i in range(lo, min(lo + 500, n))]) == min(500, n - lo)
        for lo in range(0, n, 500)
    )


def _redis_up(port: int, spec: PipelineSpec) -> float | None:
    """``weir_dependency_up{dependency="redis"}`` of the process's /metrics."""
    return metric(port, "weir_dependency_up", pipeline=spec.name, dependency="redis")


def _assert_exactly(client: Any, spec: PipelineSpec, n: int, worker: Worker) -> None:
    """labels learned == n, it stays so, and the latest snapshot agrees."""
    time.sleep(2.5)  # a late double learning would show here
    assert _learned(client, spec) == n, worker.tail()
    registry = ModelRegistry(client, spec)
    sid = _wait(registry.latest_snapshot, 10, "a snapshot")
    _wait(
        lambda: registry.snapshot_meta(registry.latest_snapshot() or sid)["labels_learned"] == n,
        10,
        f"a snapshot with {n} labels learned",
        worker,
    )


def test_kill_9_of_role_all_mid_stream_learns_every_label_once(
    settings: Settings, private_redis: PrivateRedis, unique: str, make_topics: Any, tmp_path: Path
) -> None:
    n = 2400
    spec = _spec(unique, make_topics)
    client = private_redis.client()
    worker = Worker(spec, tmp_path / "run1", role="all")
    restarted: Worker | None = None
    try:
        _send_events(settings, spec, n)
        _wait(lambda: _all_served(client, spec, n), START_WAIT, f"{n} events served", worker)
        feed = LabelFeed(settings, spec, 0, n, rate=400)
        feed.start()
        _wait(lambda: _learned(client, spec) >= n // 4, 60, "a quarter of the labels learned", worker)
        worker.kill()  # kill -9 mid-stream: labels keep coming
        at_kill = _learned(client, spec)
        assert at_kill < n, "the labels were all learned before the kill; slow the feed down"
        registry = ModelRegistry(client, spec)
        sid = registry.latest_snapshot()
        in_snapshot = registry.snapshot_meta(sid)["labels_learned"] if sid else 0
        t_kill = time.monotonic()
        restarted = Worker(spec, tmp_path / "run2", role="all")
        feed.join(60)
        assert feed.error is None
        _wait(lambda: _learned(client, spec) >= n, START_WAIT, f"all {n} labels learned", restarted)
        took = time.monotonic() - t_kill
        print(f"\nkill -9 after {at_kill}/{n} labels; all learned {took:.1f}s after the kill")
        # The restart read exactly from its snapshot's offsets: every label after them
        # joined once (learned again if the lost run had learned it), none before re-read.
        status = orjson.loads(client.get(status_key(spec)) or b"{}")
        assert status["joins"] == {"hit": n - in_snapshot}, (in_snapshot, status["joins"])
        _assert_exactly(client, spec, n, restarted)
    finally:
        if worker.alive():
            worker.kill()
        if restarted is not None:
            restarted.stop()


@pytest.mark.parametrize("role", ["learner", "all"])
def test_redis_paused_learner_waits_and_learns_every_label_once(
    settings: Settings, private_redis: PrivateRedis, unique: str, make_topics: Any, tmp_path: Path, role: str
) -> None:
    n = 1200
    spec = _spec(unique, make_topics)
    client = private_redis.client()
    port = free_port()
    if role == "learner":
        _serve(client, spec, n)
    worker = Worker(spec, tmp_path, role=role, metrics_port=port)
    try:
        if role == "all":
            _send_events(settings, spec, n)
            _wait(lambda: _all_served(client, spec, n), START_WAIT, f"{n} events served", worker)
        _send_labels(settings, spec, 0, n // 2)
        _wait(lambda: _learned(client, spec) == n // 2, START_WAIT, "the first half learned", worker)
        assert _redis_up(port, spec) == 1.0

        private_redis.pause()
        try:
            feed = LabelFeed(settings, spec, n // 2, n, rate=100)  # labels keep coming
            feed.start()
            _wait(lambda: _redis_up(port, spec) == 0.0, PAUSE, "weir_dependency_up{redis} == 0", worker)
            time.sleep(max(0.0, PAUSE - 6))
            assert worker.alive(), worker.tail()
        finally:
            private_redis.resume()
        t_back = time.monotonic()
        feed.join(60)
        assert feed.error is None
        _wait(lambda: _learned(client, spec) >= n, 60, f"all {n} labels learned", worker)
        back = time.monotonic() - t_back
        _wait(lambda: _redis_up(port, spec) == 1.0, 10, "weir_dependency_up{redis} == 1", worker)
        print(f"\nrole {role}: Redis paused {PAUSE:g}s; all {n} labels learned {back:.1f}s after it resumed")
        _assert_exactly(client, spec, n, worker)
        assert worker.alive()
    finally:
        code = worker.stop()
    assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{worker.tail()}"


def test_a_step_paused_after_learning_retries_the_markers_and_learns_nothing_twice(
    settings: Settings, private_redis: PrivateRedis, unique: str
) -> None:
    """The worst moment for an outage: the batch is learned, its learned markers are not
    written yet (they go with the next call to Redis, here the redelivered batch's join).
    The loop retries that call (not the batch) until Redis is back; it writes the markers
    before it reads, so the labels, delivered again, are duplicates."""
    n = 60
    spec = make_spec(unique)
    client = redis.Redis.from_url(private_redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    _serve(client, spec, n)
    core = LearnerCore(spec, build_model(spec.model), None, client, version_id="v1")
    registry = CollectorRegistry()
    health = DependencyHealth(registry, spec.name)
    loop = LearnerLoop(spec, settings, core, health=health, backoff=Backoff(0.05, 0.5))
    now = time.time()
    msgs = [LabelMessage(_label(i, now)[1], 0, i) for i in range(n)]
    loop._drive(core.process_step(msgs, now))
    assert core.labels_learned == n and core.offsets == {0: n}
    assert core.joiner.unwritten == n and LabelJoiner(spec, client).learned(["e0"]) == [False]
    step = core.process_step(msgs, now)  # redelivered
    result: Any = None
    paused = False
    while True:
        try:
            op = step.send(result)
        except StopIteration as done:
            again = done.value
            break
        if op is not None and op.what == "label join":
            private_redis.pause()
            threading.Timer(4.0, private_redis.resume).start()
            paused = True
        result = None if op is None else loop._retry(op)
    assert paused
    retries = registry.get_sample_value(
        "weir_dependency_retries_total", {"pipeline": spec.name, "dependency": "redis"}
    )
    assert retries and retries >= 1
    up = registry.get_sample_value("weir_dependency_up", {"pipeline": spec.name, "dependency": "redis"})
    assert up == 1
    assert core.joiner.unwritten == 0
    assert LabelJoiner(spec, client).learned([f"e{i}" for i in range(n)]) == [True] * n
    # nothing learned twice
    assert {r.outcome for r in again.results} == {"duplicate"} and core.labels_learned == n
    loop.emitter.producer.flush(1)
    client.close()
