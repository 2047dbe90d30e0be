"""The scoring path end to end on the real Kafka and Redis: a `weir worker` subprocess.

* N events in gives exactly N distinct predictions out, each carrying features equal to
  the offline (pandas) computation of the same definitions on the same arrival order, and
  feature ages (``freshness``) equal to :func:`features.freshness.offline_freshness`, also
  observed in the worker's ``weir_feature_age_seconds``; events later than the spec's
  lateness are dead-lettered with reason ``late``.
* A barrage of malformed messages interleaved with good ones: every good one predicted,
  every bad one in the dead-letter topic with its reason and original bytes, the worker
  alive and still scoring afterwards.
"""

from __future__ import annotations

import hashlib
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from features.freshness import freshness_names, offline_freshness, windows
from features.offline import compute_offline, isclose
from tests.integration.processes import REPO, Worker, free_port, metric
from weir.contracts import decode_dead_letter
from weir.spec import PipelineSpec, load_spec


@pytest.fixture
def demo_spec(make_topics: Any) -> PipelineSpec:
    spec = load_spec(REPO / "examples/demo.yaml")
    return make_topics.for_spec(spec, partitions=3)


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def worker(demo_spec: PipelineSpec, tmp_path: Path, metrics_port: int) -> Iterator[Worker]:
    w = Worker(demo_spec, tmp_path, metrics_port=metrics_port)
    yield w
    code = w.stop()
    assert code in (0, -signal.SIGTERM), f"worker exited with {code}:\n{w.tail()}"


def _produce(settings: Any, topic: str, msgs: list[tuple[bytes | None, bytes | None]]) -> None:
    p = Producer({**settings.confluent_config(), "linger.ms": 5})
    for key, value in msgs:
        p.produce(topic, value, key)
        p.poll(0)
    assert p.flush(30) == 0


def _events(spec: PipelineSpec, n: int, entities: int, seed: int) -> list[dict[str, Any]]:
    """Events with out-of-order timestamps: most within lateness, a few far behind."""
    rng = random.Random(seed)
    start = time.time() - 4 * 3600
    out = []
    for i in range(n):
        ts = start + i * 2.0
        r = rng.random()
        if r < 0.15:
            ts -= rng.uniform(0, spec.lateness * 0.9)  # out of order, within lateness
        elif r < 0.17:
            ts -= spec.lateness * 40 + rng.uniform(0, 600)  # beyond lateness for most entities
        data = {f: round(rng.uniform(0, 100), 3) for f in spec.fields}
        out.append({"event_id": f"e{i}", "entity_id": f"c{rng.randrange(entities)}", "ts": ts, "data": data})
    return out


def test_n_events_give_n_predictions_with_offline_features(
    settings: Any, demo_spec: PipelineSpec, worker: Worker, consume_all: Any, metrics_port: int
) -> None:
    spec = demo_spec
    events = _events(spec, 3000, entities=60, seed=11)
    _produce(settings, spec.topics.events, [(e["entity_id"].encode(), orjson.dumps(e)) for e in events])

    frame = pd.DataFrame(
        [{"event_id": e["event_id"], "entity_id": e["entity_id"], "ts": e["ts"], **e["data"]} for e in events]
    )
    # Arrival order within an entity is Kafka's order (key = entity -> one partition),
    # which is the produce order; across entities order does not matter.
    offline = frame[["event_id"]].join(compute_offline(spec, frame))
    fresh = freshness_names(spec)
    assert fresh, "the demo spec has windowed features"
    offline = offline.join(offline_freshness(spec, frame, offline["status"].tolist()).add_prefix("age:"))
    ok = offline[offline["status"] == "ok"]
    late = offline[offline["status"] == "late"]
    assert len(late) > 10, "the test stream must contain late events"

    preds = consume_all(spec.topics.predictions, len(ok), timeout=120)
    by_id: dict[str, dict[str, Any]] = {}
    for m in preds:
        rec = orjson.loads(m.value())
        by_id.setdefault(rec["event_id"], rec)
    assert set(by_id) == set(ok["event_id"]), worker.tail()
    assert len(preds) == len(ok), "no event predicted twice"

    mismatches = []
    for _, row in ok.iterrows():
        rec = by_id[row["event_id"]]
        assert rec["model"] == spec.model.name and rec["model_version"].startswith("v")
        for name in spec.feature_names:
            online, expected = rec["features"][name], row[name]
            expected = None if isinstance(expected, float) and expected != expected else expected
            if not isclose(online, expected, 1e-9):
                mismatches.append((row["event_id"], name, online, expected))
        # Record version 2: each windowed feature's age, and the scoring model's age.
        assert rec["record_version"] == 2 and rec["model_age"] == 0.0  # role all: the live model
        assert list(rec["freshness"]) == fresh
        for name in fresh:
            got, want = rec["freshness"][name], row[f"age:{name}"]
            if not (got == want or (got is None and want != want)):
                mismatches.append((row["event_id"], f"age of {name}", got, want))
    assert not mismatches, mismatches[:10]

    # The worker's histogram observed every prediction's ages (none in the window counts as
    # the window); observed after the batch is produced, so wait for it.
    window = windows(spec)
    for name in fresh:
        ages = ok[f"age:{name}"]
        want_sum = float(ages.fillna(window[name]).sum())
        deadline = time.monotonic() + 30
        while True:
            count = metric(metrics_port, "weir_feature_age_seconds_count", pipeline=spec.name, feature=name)
            if count == len(ok) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert count == len(ok), (name, count, len(ok))
        total = metric(metrics_port, "weir_feature_age_seconds_sum", pipeline=spec.name, feature=name)
        assert total is not None, name
        assert abs(total - want_sum) <= 1e-6 * max(1.0, want_sum), (name, total, want_sum)

    dead = [
        decode_dead_letter(m.value()) for m in consume_all(spec.topics.dead_letters, len(late), timeout=60)
    ]
    assert sorted(d["reason"] for d in dead) == ["late"] * len(late)
    assert {orjson.loads(d["value"])["event_id"] for d in dead} == set(late["event_id"])
    assert worker.alive()


BAD: list[tuple[str, bytes | None]] = [
    ("not_json", b"this is not json"),
    ("not_json", b"\xff\xfe\x00binary"),
    ("not_finite", b'{"event_id":"b","entity_id":"c","ts":NaN,"data":{}}'),
    ("not_object", b"[1, 2, 3]"),
    ("empty", None),
    ("missing_field", b'{"entity_id":"c","ts":1790000000,"data":{}}'),
    ("bad_timestamp", b'{"event_id":"b","entity_id":"c","ts":"yesterday","data":{}}'),
    ("absurd_timestamp", b'{"event_id":"b","entity_id":"c","ts":12,"data":{}}'),
    ("absurd_timestamp", b'{"event_id":"b","entity_id":"c","ts":1790000000000,"data":{}}'),
    ("too_large", b'{"pad":"' + b"x" * 70_000 + b'"}'),
]


def test_malformed_barrage_goes_to_dead_letters_and_worker_keeps_going(
    settings: Any, demo_spec: PipelineSpec, worker: Worker, consume_all: Any
) -> None:
    spec = demo_spec
    now = time.time()
    good = []
    msgs: list[tuple[bytes | None, bytes | None]] = []
    expected_reasons = []
    data = {f: 1.0 for f in spec.fields}
    for i in range(400):
        ev: dict[str, Any] = {
            "event_id": f"g{i}",
            "entity_id": f"c{i % 7}",
            "ts": now - 600 + i,
            "data": data,
        }
        good.append(ev["event_id"])
        msgs.append((ev["entity_id"].encode(), orjson.dumps(ev)))
        if i % 4 == 0:
            reason, raw = BAD[(i // 4) % len(BAD)]
            msgs.append((b"bad", raw))
            expected_reasons.append(reason)
        if i % 50 == 0:  # wrong field types too
            bad_type = {**data, "salary": "lots"}
            msgs.append((b"bad", orjson.dumps({**ev, "event_id": f"t{i}", "data": bad_type})))
            expected_reasons.append("bad_type")
    _produce(settings, spec.topics.events, msgs)

    dead = [
        decode_dead_letter(m.value())
        for m in consume_all(spec.topics.dead_letters, len(expected_reasons), 90)
    ]
    assert sorted(d["reason"] for d in dead) == sorted(expected_reasons), worker.tail()
    for d in dead:
        assert d["topic"] == spec.topics.events and d["offset"] is not None and d["detail"]
    # Each dead letter finds its original: copied whole, or (past the copy cap) by its
    # sha256 and size, with a prefix of it.
    originals = {hashlib.sha256(raw).hexdigest(): raw for _, raw in BAD if raw is not None}
    for d in dead:
        if d["reason"] == "bad_type" or d["value"] is None:
            continue
        raw = originals.get(d["value_sha256"])
        assert raw is not None, f"dead letter of an unknown original: {d['reason']} {d['detail']}"
        assert d["value_size"] == len(raw)
        assert d["value"] == raw if not d["truncated"] else raw.startswith(d["value"])
    assert any(d["truncated"] for d in dead), "the 70 kB original is past the copy cap"

    preds = consume_all(spec.topics.predictions, len(good), timeout=90)
    assert sorted({orjson.loads(m.value())["event_id"] for m in preds}) == sorted(good)
    assert worker.alive(), worker.tail()

    # Still scoring after the barrage.
    ev = {"event_id": "after", "entity_id": "c1", "ts": time.time(), "data": data}
    _produce(settings, spec.topics.events, [(b"c1", orjson.dumps(ev))])
    preds = consume_all(spec.topics.predictions, len(good) + 1, timeout=60)
    assert "after" in {orjson.loads(m.value())["event_id"] for m in preds}
