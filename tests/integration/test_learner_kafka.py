"""The learner process on the real Kafka and Redis: labels in, training log and dead letters
out, snapshots; SIGKILL mid-stream and restart: every label learned exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Producer

from models.factory import build_model, predict
from models.join import ServedStore
from models.registry import ModelRegistry, registry_key
from streams.admin import admin_client, delete_topics
from streams.learner import BATCH, LearnerLoop, run_learner, start_core
from streams.live import OrderedLearnerLoop
from streams.sync import EventTimeSync, Frontier
from weir.contracts import decode_dead_letter
from weir.spec import PipelineSpec
from weir.types import Prediction

from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration


def _serve_all(client: Any, spec: PipelineSpec, n: int, now: float) -> None:
    model = build_model(spec.model)
    preds = []
    for i in range(n):
        pred, proba = predict(model, {"a": float(i % 10)}, spec.task)
        preds.append(
            Prediction(
                f"e{i}",
                f"u{i % 7}",
                now - 30,
                spec.model.name,
                "v1.0",
                pred,
                proba,
                {"a": float(i % 10)},
                now - 29,
            )
        )
    pipe = client.pipeline(transaction=False)
    ServedStore(spec).add_to_pipeline(pipe, preds)
    pipe.execute()


def _produce_labels(settings: Any, spec: PipelineSpec, ids: range, now: float) -> None:
    p = Producer(settings.confluent_config())
    for i in ids:
        body = orjson.dumps({"event_id": f"e{i}", "label": int(i % 10 > 4), "ts": now})
        p.produce(spec.topics.labels, body, key=f"e{i}".encode())
    assert p.flush(10) == 0


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_learner_process_and_sigkill_recovery(
    settings: Any, redis_client: Any, unique: str, make_topics: Any, consume_all: Any, tmp_path: Path
) -> None:
    spec = make_topics.for_spec(
        make_spec(unique, learner={"snapshot_every_labels": 50, "snapshot_every_seconds": 3600}),
        partitions=2,
    )
    registry = ModelRegistry(redis_client, spec, key=registry_key(settings))
    now = time.time()
    _serve_all(redis_client, spec, 200, now)
    _produce_labels(settings, spec, range(120), now)
    p = Producer(settings.confluent_config())
    p.produce(spec.topics.labels, b'{"event_id": "bad", "label": "maybe"}')
    p.flush(10)

    # 1. a learner process; SIGKILL it once it has learned (and logged) all 120 labels
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(by_alias=True, mode="json")))
    code = (
        "import sys; from weir.spec import load_spec; from weir.settings import load_settings;"
        "from streams.learner import run_learner;"
        "sys.exit(run_learner(load_spec(sys.argv[1]), load_settings(), metrics_port=0))"
    )
    env = {
        **os.environ,
        "WEIR_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "WEIR_REDIS_URL": settings.redis_url,
    }
    proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env=env)
    try:
        logged = consume_all(spec.topics.training_log, 120, timeout=60)
        assert {orjson.loads(m.value())["event_id"] for m in logged} == {f"e{i}" for i in range(120)}
        # one partition, keyed by the model: the monitor reads the losses in learning order
        assert {m.partition() for m in logged} == {logged[0].partition()}
        assert {m.key() for m in logged} == {spec.model.name.encode()}
        dls = consume_all(spec.topics.dead_letters, 1, timeout=30)
        assert decode_dead_letter(dls[0].value())["reason"] == "label_type"
        sid = _wait(registry.latest_snapshot, 30, "a snapshot")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    _, meta = registry.load_snapshot(registry.latest_snapshot() or sid)
    at_kill = meta["labels_learned"]
    assert 50 <= at_kill <= 120

    # 2. restart in-process, the rest of the labels arrive; stop cleanly
    _produce_labels(settings, spec, range(120, 200), now)
    stop, ready = threading.Event(), threading.Event()
    result: list[int] = []
    t = threading.Thread(
        target=lambda: result.append(run_learner(spec, settings, stop, metrics_port=0, ready=ready))
    )
    t.start()
    try:
        assert ready.wait(30)
        # every label after the snapshot is learned again (they were lost with the process)
        consume_all(spec.topics.training_log, 120 + (120 - at_kill) + 80, timeout=60)
    finally:
        stop.set()
        t.join(30)
    assert result == [0]
    _, final = registry.load_snapshot(registry.latest_snapshot() or "")
    assert final["labels_learned"] == 200  # exactly once: none lost, none twice
    assert sum(final["offsets"].values()) == 201  # 200 labels + 1 dead letter, both partitions
    status = orjson.loads(redis_client.get(f"{spec.redis_prefix}:status"))
    assert status["labels_learned"] == 200


def test_poll_takes_the_labels_there_without_waiting_for_a_full_batch(
    settings: Any, redis_client: Any, unique: str, make_topics: Any
) -> None:
    """With fewer labels than a batch in the topic, a poll returns them as soon as they are
    fetched, not when its timeout ends (librdkafka's consume(n, timeout) waits for n): a
    learning step waiting out its timeout made role all's scorer wait that long too."""
    spec = make_topics.for_spec(make_spec(unique), partitions=2)
    now = time.time()
    _produce_labels(settings, spec, range(7), now)
    core = start_core(spec, settings)
    loop = LearnerLoop(spec, settings, core)
    try:
        loop.open()
        got: list[Any] = []
        t0 = time.monotonic()
        while len(got) < 7 and time.monotonic() - t0 < 60:
            got += loop.poll(60.0)  # the 7 labels come in one or two fetches
        waited = time.monotonic() - t0
        assert sorted(m.value for m in got) == sorted(
            orjson.dumps({"event_id": f"e{i}", "label": int(i % 10 > 4), "ts": now}) for i in range(7)
        )
        assert len(got) < BATCH
        # Before, each poll waited its whole 60 s timeout for BATCH messages.
        assert waited < 30, f"poll waited {waited:.1f}s for 7 labels already in the topic"
        assert loop.poll(0.0) == []  # nothing more: returns at once
    finally:
        loop.consumer.close()
        loop.emitter.producer.flush(1)
        core.client.close()


def test_embedded_learner_between_fetches_of_a_backlog_is_behind_not_idle(
    settings: Any, redis_client: Any, unique: str, make_topics: Any
) -> None:
    """Role all's learner, its buffer learned while more labels wait on the broker, tells
    the scorer it is behind (busy: waited for BUSY_IDLE x max_idle), not idle (1 x). A CI
    run of the burst fidelity test failed this way: the learner flushing its training log
    between two fetches for over a second, the scorer took it for idle, stopped waiting and
    scored the rest of the backlog before learning from it (0.823 against River's 0.882)."""
    spec = make_topics.for_spec(make_spec(unique), partitions=1)
    n = BATCH + 100
    _produce_labels(settings, spec, range(n), time.time() - 3600)
    sync = EventTimeSync(max_idle=1.0)
    sync.publish_events(None, caught_up=True)  # every event scored: the labels may all go
    core = start_core(spec, settings)
    loop = OrderedLearnerLoop(spec, settings, core, sync=sync)
    frontiers: list[Frontier] = []
    try:
        loop.open()
        learned = 0
        deadline = time.monotonic() + 60
        while learned < n and time.monotonic() < deadline:
            batch = loop.poll(1.0)
            if batch:
                learned += len(batch)
                loop.learned(batch)  # its buffer is empty now: the step's records go next
                frontiers.append(sync.labels)
        assert learned == n
        assert loop.poll(0.5) == [] and loop.poll(0.5) == []  # at the high watermark
    finally:
        loop.consumer.close()
        loop.emitter.producer.flush(1)
        core.client.close()
    assert len(frontiers) >= 2, "the backlog came in one batch: nothing to check between fetches"
    for f in frontiers[:-1]:  # more labels on the broker: behind, and the scorer waits for it
        assert (f.head, f.caught_up, f.behind, f.busy()) == (None, False, True, True), f
    final = sync.labels
    assert (final.head, final.caught_up, final.behind, final.busy()) == (None, True, False, False)


def test_a_learner_started_first_on_a_new_pipeline_creates_its_topics(
    settings: Any, redis_client: Any, unique: str
) -> None:
    """Split roles start the learner first (the scorers wait for its first snapshot). On a
    new pipeline it creates the pipeline's topics, as `weir worker SPEC` does; it stopped
    with "labels topic ... does not exist" before (found from outside, 2026-12-02)."""
    spec = make_spec(unique)
    names = list(spec.topics.names().values())
    assert not set(names) & set(admin_client(settings).list_topics(timeout=10).topics)
    stop, ready = threading.Event(), threading.Event()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(run_learner(spec, settings, stop, 0, ready=ready)))
    t.start()
    try:
        assert ready.wait(60), "the learner did not start"
        topics = admin_client(settings).list_topics(timeout=10).topics
        assert set(names) <= set(topics)
        assert len(topics[spec.topics.labels].partitions) == spec.topics.partitions
        _produce_labels(settings, spec, range(5), time.time())
        status_key = f"{spec.redis_prefix}:status"

        def seen() -> bool:
            raw = redis_client.get(status_key)
            return raw is not None and orjson.loads(raw)["labels_seen"] == 5

        _wait(seen, 60, "the learner to read the 5 labels")
    finally:
        stop.set()
        t.join(30)
        delete_topics(settings, names)
    assert result == [0]
