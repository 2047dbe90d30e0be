"""Fidelity end to end: the prequential accuracy a `weir worker` reports equals River's.

One ``weir worker SPEC --role all`` subprocess reads events and labels from Kafka (fresh
topics, one partition each), computes the features in Redis, scores, records what it
served, joins the labels and learns. The accuracy it reports (``{prefix}:status``, what
``weir status`` prints) must be within 1 percentage point of
``river.evaluate.progressive_val_score(rows, model, Accuracy(), delay=k)`` on the same
rows with the same model, for a bundled real data set and a synthetic one.

**A label delay in events, over two asynchronous topics.** River's ``delay=k`` means event
``i`` is predicted by a model that has learned exactly the labels ``0 .. i-k``. The worker
reads the events and the labels topics concurrently, so producing at a steady rate would
leave the delay at the mercy of scheduling. This test runs in lockstep instead: it feeds
the events in chunks of ``c``, and before each chunk releases the labels that must be in
the model and waits until they are learned (their learned markers in Redis); after each
chunk it waits until every event of the chunk was served (its served record in Redis, which
is what the label join reads). So what the worker computes does not depend on timing at
all: every event of chunk ``[s, s+c)`` is scored by the model that learned the labels
``0 .. s + (c-1)//2 - k``, which is River's delay ``k`` for the chunk's middle event and
``k ± c/2`` for the others. ``_lockstep_accuracy`` computes the same schedule offline with
River; Weir must equal it exactly (any lost, repeated, reordered or early-joined label, or
a feature not served exactly, would show), and that differs from River's
``progressive_val_score`` only by the chunking (well under a point for these streams).
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from river import datasets, evaluate, metrics
from river.datasets import synth

from models.factory import build_model
from models.join import Keys
from models.learner import status_key
from streams.admin import delete_keys
from weir.settings import Settings
from weir.spec import PipelineSpec

from .processes import Worker
from .test_fidelity import LOGREG, TREE
from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration

Rows = list[tuple[dict[Any, Any], Any]]

#: Seconds to wait for the worker's first round trip (process start, consumer group join).
FIRST_WAIT = 90.0
#: Seconds to wait for any later round trip.
WAIT = 30.0


def _phishing() -> Rows:
    return list(datasets.Phishing())


def _agrawal() -> Rows:
    return list(itertools.islice(synth.Agrawal(classification_function=0, seed=42), 2000))


@dataclass(frozen=True)
class Case:
    name: str
    data: Callable[[], Rows]
    steps: list[Any]
    delay: int  # k: labels revealed k events later
    chunk: int  # c: events per lockstep chunk


CASES = [
    Case("phishing-logreg", _phishing, LOGREG, delay=30, chunk=10),
    Case("agrawal-tree", _agrawal, TREE, delay=30, chunk=16),
]


def _learned_before(start: int, delay: int, chunk: int) -> int:
    """How many labels (``0 .. n-1``) are in the model that scores the chunk at ``start``."""
    return max(0, min(start, start + (chunk - 1) // 2 - delay + 1))


def _lockstep_accuracy(rows: Rows, model: Any, delay: int, chunk: int) -> tuple[float, int]:
    """River on the lockstep schedule: (accuracy, predictions scored). Test then train."""
    acc = metrics.Accuracy()
    preds: list[Any] = []
    learned = 0

    def learn_until(n: int) -> None:
        nonlocal learned
        while learned < n:
            x, y = rows[learned]
            if preds[learned] is not None:
                acc.update(y, preds[learned])
            model.learn_one(x, y)
            learned += 1

    for s in range(0, len(rows), chunk):
        learn_until(_learned_before(s, delay, chunk))
        for x, _ in rows[s : s + chunk]:
            proba = model.predict_proba_one(x)
            preds.append(max(proba, key=proba.get) if proba else None)
    learn_until(len(rows))
    return acc.get(), sum(p is not None for p in preds)


def _spec(unique: str, rows: Rows, steps: list[Any]) -> PipelineSpec:
    """Every raw field of the rows is a feature: the model sees exactly River's ``x``."""
    names = list(rows[0][0])
    return make_spec(
        unique,
        fields={n: "numeric" for n in names},
        features=[{"agg": "raw", "field": n} for n in names],
        model={"name": "m", "steps": steps},
        scoring={"batch_size": 500, "batch_within": 0.01},
        learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 1.0},
    )


def _high_watermark(settings: Settings, topic: str) -> int:
    c = Consumer({**settings.confluent_config(), "group.id": f"watermark-{topic}"})
    try:
        return int(c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        c.close()


class Lockstep:
    """Feeds a worker events and labels, waiting for each step to be done in Redis."""

    def __init__(self, settings: Settings, spec: PipelineSpec, client: Any, worker: Worker) -> None:
        self.spec = spec
        self.client = client
        self.worker = worker
        self.keys = Keys(spec)
        self.producer = Producer({**settings.confluent_config(), "linger.ms": 0})
        self.start_ts = time.time() - 3 * 3600  # event i at start_ts + i: monotonic, never late
        self.first = True

    def _send(self, topic: str, msgs: list[tuple[bytes, bytes]]) -> None:
        for key, value in msgs:
            self.producer.produce(topic, value, key)
        assert self.producer.flush(30) == 0, f"could not deliver to {topic}"

    def _wait_all(self, keys: list[str], what: str) -> None:
        timeout = FIRST_WAIT if self.first else WAIT
        deadline = time.monotonic() + timeout
        while self.client.exists(*keys) < len(keys):
            if not self.worker.alive():
                pytest.fail(f"the worker died waiting for {what}:\n{self.worker.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}:\n{self.worker.tail()}")
            time.sleep(0.005)
        self.first = False

    def events(self, rows: Rows, lo: int, hi: int) -> None:
        msgs = []
        for i in range(lo, hi):
            entity = f"u{i % 17}"
            ev = {"event_id": f"e{i}", "entity_id": entity, "ts": self.start_ts + i, "data": rows[i][0]}
            msgs.append((entity.encode(), orjson.dumps(ev)))
        self._send(self.spec.topics.events, msgs)
        self._wait_all([self.keys.served(f"e{i}") for i in range(lo, hi)], f"events {lo}..{hi - 1} served")

    def labels(self, rows: Rows, lo: int, hi: int, delay: int) -> None:
        msgs = []
        for i in range(lo, hi):
            y = rows[i][1]
            label = {"event_id": f"e{i}", "label": y.item() if hasattr(y, "item") else y}
            label["ts"] = self.start_ts + i + delay
            msgs.append((f"e{i}".encode(), orjson.dumps(label)))
        self._send(self.spec.topics.labels, msgs)
        self._wait_all([self.keys.learned(f"e{i}") for i in range(lo, hi)], f"labels {lo}..{hi - 1} learned")


@pytest.fixture
def cleanup_redis(redis_client: Any) -> Iterator[list[str]]:
    prefixes: list[str] = []
    yield prefixes
    for prefix in prefixes:
        delete_keys(redis_client, prefix)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_worker_accuracy_matches_progressive_val_score(
    settings: Settings,
    redis_client: Any,
    unique: str,
    make_topics: Any,
    consume_all: Any,
    cleanup_redis: list[str],
    tmp_path: Path,
    case: Case,
) -> None:
    t0 = time.monotonic()
    rows = case.data()
    n, k, c = len(rows), case.delay, case.chunk
    spec = make_topics.for_spec(_spec(unique, rows, case.steps), partitions=1)
    cleanup_redis.append(spec.redis_prefix)

    worker = Worker(spec, tmp_path)
    try:
        feed = Lockstep(settings, spec, redis_client, worker)
        released = 0
        for s in range(0, n, c):
            target = _learned_before(s, k, c)
            if target > released:
                feed.labels(rows, released, target, k)
                released = target
            feed.events(rows, s, min(s + c, n))
        feed.labels(rows, released, n, k)
        fed = time.monotonic() - t0

        def final_status() -> dict[str, Any] | None:
            raw = redis_client.get(status_key(spec))
            st = orjson.loads(raw) if raw else None
            return st if st and st["labels_learned"] == n else None

        deadline = time.monotonic() + WAIT
        while (status := final_status()) is None:
            assert worker.alive() and time.monotonic() < deadline, f"no final status:\n{worker.tail()}"
            time.sleep(0.1)

        # every event predicted exactly once (n distinct ids, and no more messages than n),
        # nothing dead-lettered
        preds = [orjson.loads(m.value()) for m in consume_all(spec.topics.predictions, n, timeout=WAIT)]
        assert sorted(p["event_id"] for p in preds) == sorted(f"e{i}" for i in range(n))
        assert _high_watermark(settings, spec.topics.predictions) == n
        assert _high_watermark(settings, spec.topics.dead_letters) == 0, worker.tail()
    finally:
        code = worker.stop()
    assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{worker.tail()}"

    # what the worker reports (`weir status`)
    assert status["labels_learned"] == n == status["labels_seen"]
    assert status["joins"] == {"hit": n}
    overall = status["metrics"]["*"]
    assert overall["n"] + status["unscored"] == n
    weir = overall["all"]["accuracy"]

    # River: the same rows, the same model spec, the same delay
    river = evaluate.progressive_val_score(rows, build_model(spec.model), metrics.Accuracy(), delay=k).get()
    lockstep, scored = _lockstep_accuracy(rows, build_model(spec.model), k, c)
    print(
        f"\n{case.name}: {n} rows, delay {k} events, chunks of {c}: "
        f"weir {weir:.4f}  river progressive_val_score {river:.4f}  (lockstep schedule {lockstep:.4f}); "
        f"fed in {fed:.1f}s, {time.monotonic() - t0:.1f}s in all"
    )
    assert overall["n"] == scored
    assert weir == pytest.approx(lockstep, abs=1e-9), "the worker did not compute the lockstep schedule"
    assert abs(weir - river) <= 0.01, (weir, river)
