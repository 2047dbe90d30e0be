"""Weir on the 3-broker cluster: 3 scorers + 1 learner + the monitor, 6 partitions, RF 3,
min ISR 2; kill -9 of one broker mid-stream: no event lost, labels learned == labels sent.

Configured by settings only (``WEIR_KAFKA_BOOTSTRAP``, ``WEIR_TOPIC_REPLICATION_FACTOR``,
``WEIR_TOPIC_MIN_INSYNC_REPLICAS``) over a spec that says nothing about replication. Redis
is a private single ``redis-server`` (the Redis Cluster's own failover is
test_redis_failover.py). The broker killed leads partition 0 of the events topic; it is restarted
(``cluster.py up kafka``) before the test ends.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from models.registry import ModelRegistry
from streams import admin
from streams.produce import produce
from tests.cluster.conftest import BOOTSTRAP, Cluster, kill_broker, read_all, restart_kafka
from tests.integration.conftest import wait_for
from tests.integration.private_redis import PrivateRedis
from tests.integration.processes import REPO, Monitor, Worker, free_port
from weir.settings import load_settings
from weir.spec import load_spec

N = 3000
RATE = 250.0


def assigned_members(settings: Any, group: str) -> int:
    client = admin.admin_client(settings)
    try:
        desc = client.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:
        return 0
    return sum(1 for m in desc.members if m.assignment and m.assignment.topic_partitions)


@pytest.mark.timeout(900)
def test_kill_a_broker_under_three_scorers_a_learner_and_the_monitor(
    cluster: Cluster, unique: str, tmp_path: Path
) -> None:
    redis_server = PrivateRedis(tmp_path / "redis")
    env: dict[str, str | None] = {
        "WEIR_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "WEIR_REDIS_URL": redis_server.url,
        "WEIR_TOPIC_REPLICATION_FACTOR": "3",
        "WEIR_TOPIC_MIN_INSYNC_REPLICAS": "2",
        "WEIR_MODEL_KEY": os.environ.get("WEIR_MODEL_KEY") or f"weir-cluster-test-{unique}",
    }
    settings = load_settings(**{k.removeprefix("WEIR_").lower(): v for k, v in env.items()})
    base = load_spec(REPO / "examples/demo.yaml")
    spec = base.model_copy(
        update={
            "name": f"cl{unique}",
            "topics": base.topics.model_copy(update={f: "" for f in base.topics.names()} | {"partitions": 6}),
            "model": base.model.model_copy(update={"name": f"cl{unique}"}),
            "learner": base.learner.model_copy(
                update={"snapshot_every_labels": 200, "snapshot_every_seconds": 1.0}
            ),
        }
    )
    spec = type(spec).model_validate(spec.model_dump(by_alias=True))  # topic names re-derived
    admin.ensure_topics(settings, spec)
    procs: list[Any] = []
    killed: int | None = None
    try:
        learner = Worker(spec, tmp_path / "learner", role="learner", env=env)
        procs.append(learner)
        scorers = [
            Worker(spec, tmp_path / f"s{i}", role="scorer", metrics_port=free_port(), env=env)
            for i in range(3)
        ]
        procs += scorers
        monitor = Monitor(learner.spec_path, tmp_path / "monitor", env=env)
        procs.append(monitor)
        registry = ModelRegistry(redis_server.client(), spec)
        wait_for(lambda: registry.alias("champion"), 180, "the learner to bootstrap the champion")
        wait_for(
            lambda: assigned_members(settings, spec.consumer_group) == 3, 240, "three scorers with partitions"
        )
        time.sleep(2)

        summary: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            summary.update(
                produce(
                    spec,
                    settings,
                    "river:synth.Agrawal?seed=7",
                    limit=N,
                    rate=RATE,
                    label_delay=1.0,
                    entities=500,
                    progress=False,
                    run_id="bl",
                )
            )
            done.set()

        producer = threading.Thread(target=run, daemon=True)
        producer.start()
        time.sleep(N / RATE / 3)  # a third of the stream in
        md = admin.admin_client(settings).list_topics(spec.topics.events, timeout=10)
        killed = md.topics[spec.topics.events].partitions[0].leader
        kill_broker(killed)
        survivors = admin.admin_client(settings)
        wait_for(
            lambda: killed not in survivors.list_topics(timeout=10).brokers,
            60,
            f"broker {killed} to leave the cluster",
        )
        assert not done.is_set(), "the stream ended before the broker was gone: nothing was tested"

        assert done.wait(300), "weir produce did not finish with a broker down"
        producer.join(5)
        assert summary["events"] == N and summary["labels"] == N

        preds = read_all(settings, spec.topics.predictions, N, timeout=240)
        ids = [orjson.loads(v)["event_id"] for v in preds]
        assert len(set(ids)) == N, f"{N - len(set(ids))} of {N} events have no prediction"
        assert len(ids) == N, f"{len(ids) - N} predictions written twice"

        client = redis_server.client()

        def learned() -> int:
            raw = client.get(f"{spec.redis_prefix}:status")
            return int(orjson.loads(raw)["labels_learned"]) if raw else -1

        wait_for(lambda: learned() == N, 240, f"labels learned == {N} labels sent (at {learned()})")
        time.sleep(3)
        assert learned() == N, "no label learned twice"
        for p in procs:
            assert p.alive(), f"a Weir process died with a broker down:\n{p.tail()}"
    finally:
        for p in procs:
            p.stop()
        if killed is not None:
            restart_kafka()
        try:
            admin.delete_topics(
                settings, [*spec.topics.names().values(), f"{spec.consumer_group}-__assignor-__leader"]
            )
        finally:
            redis_server.stop()
