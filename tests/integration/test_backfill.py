"""``weir backfill``: examples rebuilt from the raw events topic with the offline engine
carry the features the online store serves for the same deliveries (real Kafka and Redis)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from confluent_kafka import Producer

from features.base import FeatureResult
from features.offline import isclose
from features.online import RedisFeatureStore
from models.registry import ModelRegistry
from models.retrain import fit_challenger, load_backfill
from tests.integration.test_features_parity import ONE_STORED_FIELD, _spec, _stream
from weir.commands.backfill import run_backfill, write_jsonl
from weir.contracts import encode_event, encode_label
from weir.settings import Settings

pytestmark = pytest.mark.integration


def test_backfill_matches_online_serving(
    settings: Settings, make_topics: Any, redis_client: redis.Redis, unique: str, tmp_path: Path
) -> None:
    spec = make_topics.for_spec(_spec(unique, features=ONE_STORED_FIELD), partitions=2)
    events = _stream(900, 25, seed=13)  # late, redelivered and out-of-order deliveries
    rng = random.Random(2)
    labelled = {e.event_id: rng.random() < 0.5 for e in events if rng.random() < 0.8}
    producer = Producer(settings.producer_config())
    for e in events:
        producer.produce(spec.topics.events, encode_event(e, spec.entity_field), e.entity_id.encode())
    for eid, y in labelled.items():
        producer.produce(spec.topics.labels, encode_label(eid, y, 1_700_100_000.0), eid.encode())
    assert producer.flush(30) == 0

    try:
        # What online serving gives for the same deliveries (an entity's order is its partition's).
        store = RedisFeatureStore(spec)
        online: list[FeatureResult] = []
        for b in range(0, len(events), 300):
            online.extend(store.compute_batch(redis_client, events[b : b + 300]))

        ts = sorted(e.ts for e in events)
        t_from, t_to = ts[len(ts) // 3], ts[2 * len(ts) // 3]
        records, summary = run_backfill(spec, settings, t_from, t_to, timeout=60)

        # The command: the file, and --fit saves a version (no alias moved) with its lineage.
        out = tmp_path / "cli.jsonl"
        tree = {"steps": ["river.tree.HoeffdingTreeClassifier"]}  # takes categoricals as they are
        tree_spec = tmp_path / "tree.yaml"
        tree_spec.write_text(yaml.safe_dump({**spec.model_dump(mode="json", by_alias=True), "model": tree}))
        cmd = [sys.executable, "-m", "weir.cli", "backfill", str(tree_spec), "--from", str(t_from)]
        cmd += ["--to", str(t_to), "--out", str(out), "--fit"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "saved v1" in done.stdout, done.stdout
        registry = ModelRegistry(redis_client, spec)
        saved = registry.get("v1")
        assert saved.trigger == "backfill" and registry.alias("champion") is None
        assert saved.meta["history"]["records"] == len(records) > 0
    finally:
        for key in redis_client.scan_iter(match=f"{spec.redis_prefix}:*", count=1000):
            redis_client.unlink(key)

    assert summary["events_read"] == len(events) and summary["events_invalid"] == 0, summary
    assert summary["labels_read"] == len(labelled), summary
    want: dict[str, dict[str, Any]] = {}
    for e, res in zip(events, online, strict=True):
        if res.status == "ok" and t_from <= e.ts < t_to and e.event_id in labelled:
            want.setdefault(e.event_id, res.features or {})
    got = {r["event_id"]: r for r in records}
    assert len(want) > 150
    assert set(got) == set(want)
    bad = [
        (eid, n, want[eid][n], r["features"][n])
        for eid, r in got.items()
        for n in spec.feature_names
        if not isclose(want[eid][n], r["features"][n])
    ]
    assert not bad, bad[:5]
    assert all(r["label"] is labelled[r["event_id"]] and r["model_version"] == "backfill" for r in records)

    # The file the retrainer reads: a training-log frame a challenger fits on.
    path = tmp_path / "backfill.jsonl"
    sha = write_jsonl(path, records)
    assert path.read_bytes() == out.read_bytes()  # the command wrote the same examples
    frame = load_backfill(path, spec)
    assert len(frame) == len(records) and list(frame.attrs["features"]) == spec.feature_names
    # A tree: it takes the categorical features as they are (the spec's linear model would not).
    tree = type(spec.model).model_validate({"steps": ["river.tree.HoeffdingTreeClassifier"]})
    result = fit_challenger(spec.model_copy(update={"model": tree}), frame)
    assert result.rows == len(records) and len(sha) == 64
