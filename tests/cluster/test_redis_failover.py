"""Weir on the Redis Cluster: kill -9 of the master that owns the pipeline's slot mid-stream.

Configured by settings only (``WEIR_REDIS_CLUSTER=true``, ``WEIR_REDIS_URL`` one node,
``WEIR_KAFKA_BOOTSTRAP`` the 3 brokers). One worker (role ``all``: scorer and learner)
scores a stream with labels flowing from ``weir produce``; a third of the way in, the master
holding ``weir:{<name>}``'s slot is killed. Its replica is promoted (``cluster-node-timeout``
5 s, deploy/local/cluster.py) and the worker goes on through its Redis retries.

Measured and asserted: the failover happened (another node owns the slot), every event was
predicted (none lost, none twice), the worker never died, labels learned vs labels sent, and
the features served vs those the offline engine rebuilds from the events topic (weir
backfill's code): a lost window entry shows there.
Redis replication is asynchronous: a write the master acknowledged in its last moments may
not have reached the replica (a served record, a window entry, a mark). What was lost is
counted from the learner's join outcomes and printed; docs/scaling.md gives the figures.
The killed node is restarted before the test ends; it comes back as a replica.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from features.offline import isclose
from models.registry import ModelRegistry
from streams import admin
from streams.produce import produce
from tests.cluster.conftest import (
    BOOTSTRAP,
    FAILOVER_TIMEOUT,
    REDIS_URL,
    Cluster,
    kill_redis,
    read_all,
    redis_master_of,
    redis_topology,
    restart_redis,
)
from tests.integration.conftest import wait_for
from tests.integration.processes import REPO, Worker
from weir.commands.backfill import run_backfill
from weir.settings import load_settings
from weir.spec import load_spec

N = 1500
RATE = 150.0


@pytest.mark.timeout(600)
def test_kill_the_master_of_the_pipeline_slot_mid_stream(
    cluster: Cluster, unique: str, tmp_path: Path
) -> None:
    env: dict[str, str | None] = {
        "WEIR_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "WEIR_REDIS_URL": REDIS_URL,
        "WEIR_REDIS_CLUSTER": "true",
        "WEIR_MODEL_KEY": os.environ.get("WEIR_MODEL_KEY") or f"weir-cluster-test-{unique}",
    }
    settings = load_settings(**{k.removeprefix("WEIR_").lower(): v for k, v in env.items()})
    base = load_spec(REPO / "examples/demo.yaml")
    spec = base.model_copy(
        update={
            "name": f"rf{unique}",
            "topics": base.topics.model_copy(update={f: "" for f in base.topics.names()} | {"partitions": 3}),
            "model": base.model.model_copy(update={"name": f"rf{unique}"}),
            "learner": base.learner.model_copy(
                update={"snapshot_every_labels": 200, "snapshot_every_seconds": 1.0}
            ),
        }
    )
    spec = type(spec).model_validate(spec.model_dump(by_alias=True))  # topic names re-derived
    admin.ensure_topics(settings, spec)
    client = settings.redis()
    status_key = f"{spec.redis_prefix}:status"
    victim: int | None = None
    worker: Worker | None = None
    try:
        worker = Worker(spec, tmp_path / "worker", role="all", env=env)
        registry = ModelRegistry(client, spec)
        wait_for(lambda: registry.alias("champion"), 180, "the worker to bootstrap the champion")

        def status() -> dict[str, Any]:
            try:
                raw = client.get(status_key)
            except Exception:  # the slot's master is down: no answer yet
                return {}
            return dict(orjson.loads(raw)) if raw else {}

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
                    entities=300,
                    progress=False,
                    run_id="rf",
                )
            )
            done.set()

        producer = threading.Thread(target=run, daemon=True)
        producer.start()
        time.sleep(N / RATE / 3)  # a third of the stream in
        victim = redis_master_of(client, status_key)
        before = status().get("labels_learned", 0)
        t_kill = time.monotonic()
        kill_redis(victim)
        assert not done.is_set(), "the stream ended before the kill: nothing was tested"

        def promoted() -> bool:
            state, pairs = redis_topology()
            return state == "ok" and victim not in pairs.values()

        wait_for(promoted, FAILOVER_TIMEOUT, f"a replica of {victim} to take over its slots")
        failover_s = time.monotonic() - t_kill
        assert done.wait(120), "weir produce did not finish"
        producer.join(5)
        assert summary["events"] == N and summary["labels"] == N

        preds = read_all(settings, spec.topics.predictions, N, timeout=120)
        ids = [orjson.loads(v)["event_id"] for v in preds]
        assert len(set(ids)) == N, f"{N - len(set(ids))} of {N} events have no prediction"
        assert len(ids) == N, f"{len(ids) - N} predictions written twice"

        # Window state: the features served against those the offline engine computes from
        # the events topic (weir backfill's code): a window entry the master acknowledged
        # and did not replicate would show as a later event of its entity served without it.
        records, _ = run_backfill(spec, settings, 0.0, time.time() + 3600, timeout=60)
        served = {r["event_id"]: r["features"] for r in map(orjson.loads, preds)}
        assert len(records) == N, f"backfill rebuilt {len(records)} of {N} examples"
        differ = sorted(
            r["event_id"]
            for r in records
            if any(not isclose(r["features"][n], served[r["event_id"]][n]) for n in spec.feature_names)
        )

        # Labels: learned == sent, or the shortfall is what the failover lost (counted).
        last: list[Any] = [None, time.monotonic()]

        def settled() -> bool:
            s = status()
            learned = s.get("labels_learned", -1)
            if learned == N:
                return True
            if learned != last[0]:
                last[:] = [learned, time.monotonic()]
            return time.monotonic() - last[1] > 15  # no progress for 15 s

        wait_for(settled, 180, f"labels learned to reach {N} or settle")
        final = status()
        learned, joins = int(final["labels_learned"]), dict(final.get("joins", {}))
        resumed = final.get("labels_learned", 0) > before
        print(
            f"\nREDIS FAILOVER: killed master {victim} (owner of {spec.redis_prefix}), replica promoted "
            f"after {failover_s:.1f}s; events {N}, predicted {len(set(ids))}, "
            f"duplicates {len(ids) - len(set(ids))}; "
            f"labels sent {N}, learned {learned} (before the kill {before}); joins {joins}; "
            f"served features that differ from the offline engine's: {len(differ)} {differ[:5]}"
        )
        assert resumed, f"no label learned after the failover: {final}"
        assert worker.alive(), f"the worker died in the failover:\n{worker.tail()}"
        assert len(differ) <= N // 100, f"{len(differ)} events served with other features: {differ[:5]}"
        # A served record the master acknowledged but had not yet replicated is gone: its
        # label finds no record and is held (outcome "early") until the horizon. That is the
        # one loss asynchronous replication allows here; it must be counted, and small.
        lost = N - learned
        assert lost == 0 or (lost <= joins.get("early", 0) and lost <= N // 100), (
            f"{lost} of {N} labels not learned after the failover, joins {joins}: more than the "
            "records lost to asynchronous replication (held as early, at most 1%); see docs/scaling.md"
        )
    finally:
        if worker is not None:
            worker.stop()
        if victim is not None:
            restart_redis()
        try:
            admin.delete_keys(client, spec.redis_prefix)
            client.close()
        finally:
            admin.delete_topics(
                settings, [*spec.topics.names().values(), f"{spec.consumer_group}-__assignor-__leader"]
            )
