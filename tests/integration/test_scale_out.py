"""Many scorers, one learner, on the real Kafka and Redis.

Three `weir worker --role scorer` processes share a 6-partition events topic in one
consumer group; one `weir worker --role learner` joins the delayed labels, learns and
publishes snapshots. Every event is predicted exactly once (by event_id), every scorer
ends on the learner's latest snapshot, and a learner killed with SIGKILL mid-stream and
restarted ends with learned labels == distinct labels (none twice, none lost).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from models.registry import ModelRegistry
from streams.produce import produce
from tests.integration.conftest import wait_for
from tests.integration.processes import REPO, Worker, assigned_members, free_port
from weir.spec import load_spec


def _metric(port: int, name: str) -> list[str]:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return []
    return [line for line in body.splitlines() if line.startswith(name + "{")]


def test_three_scorers_one_learner_with_learner_crash(
    settings: Any, make_topics: Any, consume_all: Any, redis_client: Any, tmp_path: Path
) -> None:
    base = load_spec(REPO / "examples/demo.yaml")
    base = base.model_copy(
        update={
            "learner": base.learner.model_copy(
                update={"snapshot_every_labels": 200, "snapshot_every_seconds": 1.0}
            )
        }
    )
    spec = make_topics.for_spec(base, partitions=6)
    learner = Worker(spec, tmp_path, role="learner")
    ports = [free_port() for _ in range(3)]
    scorers = [Worker(spec, tmp_path / f"s{i}", role="scorer", metrics_port=ports[i]) for i in range(3)]
    registry = ModelRegistry(redis_client, spec)
    try:
        wait_for(lambda: registry.alias("champion"), 60, "the learner to bootstrap the champion")
        wait_for(
            lambda: assigned_members(settings, spec.consumer_group) == 3,
            90,
            "three scorers sharing the events topic",
        )
        time.sleep(2)
        n = 3000
        done = threading.Event()
        summary: dict[str, Any] = {}

        def run() -> None:
            summary.update(
                produce(
                    spec,
                    settings,
                    "river:synth.Agrawal?seed=5",
                    limit=n,
                    rate=400,
                    label_delay=1.0,
                    entities=500,
                    progress=False,
                    run_id="so",
                )
            )
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()

        def learned_600() -> bool:
            snap = registry.latest_snapshot()
            return (
                snap is not None
                and snap.count(".") == 1
                and int(registry.snapshot_meta(snap)["labels_learned"]) >= 600
            )

        # Kill the learner mid-stream, then restart it.
        wait_for(
            learned_600,
            60,
            "the learner to snapshot 600 labels",
        )
        learner.kill()
        time.sleep(1.5)
        learner = Worker(spec, tmp_path / "restarted", role="learner")
        assert done.wait(60), "producer did not finish"
        t.join(5)
        assert summary["events"] == n and summary["labels"] == n

        preds = consume_all(spec.topics.predictions, n, timeout=90)
        ids = [orjson.loads(m.value())["event_id"] for m in preds]
        assert len(ids) == n and len(set(ids)) == n, "every event predicted exactly once"

        def learned() -> int:
            raw = redis_client.get(f"{spec.redis_prefix}:status")
            return int(orjson.loads(raw)["labels_learned"]) if raw else -1

        wait_for(lambda: learned() == n, 90, f"learned labels == {n} distinct labels (got {learned()})")
        time.sleep(3)
        assert learned() == n, "no label learned twice"

        latest = wait_for(registry.latest_snapshot, 10, "a snapshot")

        def converged() -> bool:
            versions = [_metric(p, "weir_model_version_info") for p in ports]
            return all(
                any(f'model_version="{latest}"' in ln and ln.endswith(" 1.0") for ln in v) for v in versions
            )

        try:
            wait_for(converged, 30, f"all three scorers on snapshot {latest}")
        except BaseException:
            print({p: _metric(p, "weir_model_version_info") for p in ports}, registry.latest_snapshot())
            raise
        for s in scorers:
            assert s.alive(), s.tail()
    finally:
        for s in scorers:
            s.stop()
        learner.stop()
