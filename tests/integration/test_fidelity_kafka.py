"""Fidelity end to end, as a burst: a replayed backlog scores what River scores.

Every event and every label of a stream is produced to fresh topics (one partition each)
*before* ``weir worker SPEC --role all`` starts: a replay, or a catch-up after an outage,
both topics holding a backlog. Event ``i`` has ``ts = start + i`` and its label
``ts = start + i + k`` (it arrives ``k`` events later). The worker reads the events and
the labels topics concurrently, and takes them in event-time order (``scoring.max_idle``,
docs/spec.md): a label whose ts is at or before an event's ts is learned before that event
is scored, as Kafka Streams' ``max.task.idle.ms`` orders two topics. So event ``i`` is
scored by a model that learned exactly the labels ``0 .. i-k``: River's ``delay=k``.

The accuracy the worker reports (``{prefix}:status``, what ``weir status`` prints) must be
within half a point of ``river.evaluate.progressive_val_score(rows, model, Accuracy(),
delay=k)`` on the same rows with the same model, for a bundled real data set and a
synthetic one. Without the ordering the worker scores most of the backlog before it
learns from it (issue #16: 0.836 against River's 0.893 on Phishing). Completion is read
from the learner's status (labels learned); every event is predicted exactly once, and
every label joins the record served for its event on arrival (``hit``: none came early).
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
from river import datasets, evaluate, metrics, stream
from river.datasets import synth

from models.factory import build_model
from models.learner import status_key
from streams.admin import delete_keys
from weir.settings import Settings
from weir.spec import PipelineSpec

from .processes import Worker
from .test_fidelity import LOGREG, TREE
from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration

Rows = list[tuple[dict[Any, Any], Any]]

#: Seconds the worker may take to start and work through the backlog.
WAIT = 120.0


def _phishing() -> Rows:
    return list(datasets.Phishing())


def _agrawal() -> Rows:
    return list(itertools.islice(synth.Agrawal(classification_function=0, seed=42), 1250))


@dataclass(frozen=True)
class Case:
    name: str
    data: Callable[[], Rows]
    steps: list[Any]
    delay: int  # k: each label arrives k events after its event (k seconds of event time)


CASES = [
    Case("phishing-logreg", _phishing, LOGREG, delay=30),
    Case("agrawal-tree", _agrawal, TREE, delay=30),
]


def burst_spec(unique: str, rows: Rows, steps: list[Any], **scoring: Any) -> PipelineSpec:
    """Every raw field of the rows is a feature: the model sees exactly River's ``x``."""
    names = list(rows[0][0])
    return make_spec(
        unique,
        fields={n: "numeric" for n in names},
        features=[{"agg": "raw", "field": n} for n in names],
        model={"name": "m", "steps": steps},
        scoring={"batch_size": 500, "batch_within": 0.01, **scoring},
        learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 1.0},
    )


def produce_burst(settings: Settings, spec: PipelineSpec, rows: Rows, delay: int) -> None:
    """All events, then all labels (label ts = event ts + delay), before any worker runs.

    Integer timestamps, so ``ts(event i) + delay == ts(event i + delay)`` exactly: a tie,
    which River and the worker both break label first. An idempotent producer: the order of
    the rows is the expected answer, and a plain producer's retry (a broker slow to answer
    on a loaded machine) may write a batch after the next one.
    """
    start = int(time.time()) - 3 * 3600  # event i at start + i: monotonic, never late
    producer = Producer({**settings.producer_config(), "linger.ms": 20})
    for i, (x, _) in enumerate(rows):
        entity = f"u{i % 17}"
        ev = {"event_id": f"e{i}", "entity_id": entity, "ts": start + i, "data": x}
        producer.produce(spec.topics.events, orjson.dumps(ev), entity.encode())
    for i, (_, y) in enumerate(rows):
        label = {"event_id": f"e{i}", "label": y.item() if hasattr(y, "item") else y, "ts": start + i + delay}
        producer.produce(spec.topics.labels, orjson.dumps(label), f"e{i}".encode())
    assert producer.flush(60) == 0, "could not deliver the burst"


def assert_in_order(consume_all: Any, topic: str, n: int) -> None:
    """The burst on ``topic`` is ``e0 .. e{n-1}`` in order, once each: the input the expected
    accuracy is computed on."""
    ids = [orjson.loads(m.value())["event_id"] for m in consume_all(topic, n, timeout=30)]
    expected = [f"e{i}" for i in range(n)]
    if ids != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(ids, expected, strict=False)) if a != b), min(len(ids), n)
        )
        pytest.fail(f"{topic} does not hold the burst in order (from offset {at}: {ids[at : at + 5]})")


def river_predictions(rows: Rows, model: Any, delay: int) -> list[Any]:
    """River's prediction for each row, as ``progressive_val_score(..., delay=delay)`` makes
    them (the same ``simulate_qa`` order: a label revealed before the question at its time)."""
    preds: list[Any] = [None] * len(rows)
    for i, x, y in stream.simulate_qa(rows, moment=None, delay=delay):
        if y is None:
            preds[i] = model.predict_one(x)
        else:
            model.learn_one(x, y)
    return preds


def divergence(weir: dict[str, Any], river: list[Any]) -> str:
    """Which events the worker predicted differently from River, as runs of indices: a run
    says where the order slipped (the scorer ahead of the labels, or the learner ahead)."""
    diff = [i for i, p in enumerate(river) if weir.get(f"e{i}") != p]
    runs: list[list[int]] = []
    for i in diff:
        if runs and i - runs[-1][1] <= 30:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return f"{len(diff)} of {len(river)} predictions differ from River's, around events {runs[:10]}"


def wait_learned(client: Any, spec: PipelineSpec, worker: Worker, n: int, timeout: float) -> dict[str, Any]:
    """The learner's status once it has learned ``n`` labels (what ``weir status`` prints)."""
    deadline = time.monotonic() + timeout
    while True:
        raw = client.get(status_key(spec))
        status: dict[str, Any] | None = orjson.loads(raw) if raw else None
        if status is not None and status["labels_learned"] >= n:
            return status
        if not worker.alive():
            pytest.fail(f"the worker died:\n{worker.tail()}")
        if time.monotonic() > deadline:
            got = status["labels_learned"] if status else "no status"
            pytest.fail(f"{got} of {n} labels learned after {timeout:g}s:\n{worker.tail()}")
        time.sleep(0.1)


def _high_watermark(settings: Settings, topic: str) -> int:
    c = Consumer({**settings.confluent_config(), "group.id": f"watermark-{topic}"})
    try:
        return int(c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        c.close()


@pytest.fixture
def cleanup_redis(redis_client: Any) -> Iterator[list[str]]:
    prefixes: list[str] = []
    yield prefixes
    for prefix in prefixes:
        delete_keys(redis_client, prefix)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_burst_accuracy_matches_progressive_val_score(
    settings: Settings,
    redis_client: Any,
    unique: str,
    make_topics: Any,
    consume_all: Any,
    cleanup_redis: list[str],
    tmp_path: Path,
    case: Case,
) -> None:
    rows = case.data()
    n, k = len(rows), case.delay
    spec = make_topics.for_spec(burst_spec(unique, rows, case.steps), partitions=1)
    cleanup_redis.append(spec.redis_prefix)
    produce_burst(settings, spec, rows, k)

    t0 = time.monotonic()
    worker = Worker(spec, tmp_path)
    try:
        status = wait_learned(redis_client, spec, worker, n, WAIT)
        took = time.monotonic() - t0
        # every event predicted exactly once, nothing dead-lettered
        preds = [orjson.loads(m.value()) for m in consume_all(spec.topics.predictions, n, timeout=30)]
        assert sorted(p["event_id"] for p in preds) == sorted(f"e{i}" for i in range(n))
        assert_in_order(consume_all, spec.topics.events, n)
        assert_in_order(consume_all, spec.topics.labels, n)
        assert _high_watermark(settings, spec.topics.predictions) == n
        assert _high_watermark(settings, spec.topics.dead_letters) == 0, worker.tail()
    finally:
        code = worker.stop()
    assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{worker.tail()}"

    assert status["labels_learned"] == n == status["labels_seen"]
    overall = status["metrics"]["*"]
    assert overall["n"] + status["unscored"] == n
    weir = overall["all"]["accuracy"]
    river = evaluate.progressive_val_score(rows, build_model(spec.model), metrics.Accuracy(), delay=k).get()
    print(
        f"\n{case.name}: {n} rows, delay {k} events, as a burst: weir {weir:.4f}  "
        f"river progressive_val_score {river:.4f}; joins {status['joins']}; "
        f"worker start to all learned {took:.1f}s"
    )
    # Every label found its event served: none was taken before its event was scored.
    assert status["joins"] == {"hit": n}, status["joins"]
    # What a failure says: the waits given up (scorer or learner) and where the order slipped.
    waits = [line for line in worker.tail(2000).splitlines() if "(scoring.max_idle)" in line]
    expected = river_predictions(rows, build_model(spec.model), k)
    scored = [(p, y) for p, (_, y) in zip(expected, rows, strict=True) if p is not None]
    assert sum(p == y for p, y in scored) / len(scored) == pytest.approx(river, abs=1e-12)
    slipped = divergence({p["event_id"]: p["prediction"] for p in preds}, expected)
    assert abs(weir - river) <= 0.005, (weir, river, slipped, waits)
