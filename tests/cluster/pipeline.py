"""Weir's full topology on the local cluster, shared by the failure tests.

:func:`pipeline_on_cluster` runs 3 scorers (``--role scorer``), 1 learner and the monitor
over 6 partitions, configured by settings only: ``WEIR_KAFKA_BOOTSTRAP`` the 3 brokers,
``WEIR_TOPIC_REPLICATION_FACTOR=3``, ``WEIR_TOPIC_MIN_INSYNC_REPLICAS=2``,
``WEIR_REDIS_CLUSTER=true`` with ``WEIR_REDIS_URL`` one node of the Redis Cluster, over
examples/demo.yaml (which says nothing about replication or cluster). It yields once the
learner has bootstrapped the champion and each scorer holds partitions; at the end it stops
the processes (together) and deletes the pipeline's topics and keys.

Used by test_pipeline_broker_loss.py (kill -9 of a broker) and test_redis_failover.py
(kill -9 of the Redis master owning the pipeline's slot).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from models.registry import ModelRegistry
from streams import admin
from streams.produce import produce
from tests.cluster.conftest import BOOTSTRAP, REDIS_URL, read_all
from tests.integration.conftest import wait_for
from tests.integration.processes import REPO, Monitor, WeirProcess, Worker, free_port
from weir.settings import Settings, load_settings
from weir.spec import PipelineSpec, load_spec

SCORERS = 3
PARTITIONS = 6


def assigned_members(settings: Settings, group: str) -> int:
    """Members of ``group`` holding partitions; 0 while the group is not described yet."""
    client = admin.admin_client(settings)
    try:
        desc = client.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:
        return 0
    return sum(1 for m in desc.members if m.assignment and m.assignment.topic_partitions)


def stop_all(procs: list[WeirProcess]) -> None:
    """Stop the processes at once (SIGTERM, each waited for in its own thread)."""
    if procs:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda p: p.stop(), procs))


@dataclass
class Stream:
    """``weir produce`` in a thread: ``done`` once it returned, its summary in ``summary``."""

    thread: threading.Thread
    done: threading.Event
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClusterPipeline:
    spec: PipelineSpec
    settings: Settings
    #: the Redis Cluster client (``Settings.redis()``) the test reads the pipeline's keys with
    client: Any
    learner: Worker
    scorers: list[Worker]
    monitor: Monitor
    #: seconds from the first process started to the pipeline ready to score
    ready_s: float = 0.0

    @property
    def procs(self) -> list[WeirProcess]:
        return [self.learner, *self.scorers, self.monitor]

    def produce(self, n: int, rate: float, run_id: str, entities: int = 500) -> Stream:
        """Start ``n`` Agrawal events at ``rate``/s, each labelled 1 s later."""
        stream = Stream(threading.Thread(daemon=True), threading.Event())

        def run() -> None:
            stream.summary.update(
                produce(
                    self.spec,
                    self.settings,
                    "river:synth.Agrawal?seed=7",
                    limit=n,
                    rate=rate,
                    label_delay=1.0,
                    entities=entities,
                    progress=False,
                    run_id=run_id,
                )
            )
            stream.done.set()

        stream.thread = threading.Thread(target=run, daemon=True)
        stream.thread.start()
        return stream

    def _get(self, key: str) -> Any:
        try:
            raw = self.client.get(f"{self.spec.redis_prefix}:{key}")
        except Exception:  # the slot's master is down (a Redis failover): no answer yet
            return None
        return orjson.loads(raw) if raw else None

    def learned(self) -> int:
        """``labels_learned`` of the learner's status record (what ``weir status`` shows); -1
        while unreadable."""
        status = self._get("status")
        return int(status["labels_learned"]) if status else -1

    def joins(self) -> dict[str, int]:
        """The learner's join outcomes (hit, early, resolved, unknown...) from its status."""
        status = self._get("status")
        return dict(status.get("joins", {})) if status else {}

    def monitor_seen(self) -> tuple[int, int]:
        """``(predictions, examples)`` the monitor has read, from its last checkpoint."""
        meta = self._get("registry:checkpointmeta:monitor")
        return (int(meta["predictions_seen"]), int(meta["examples_seen"])) if meta else (-1, -1)

    def predictions(self, n: int, timeout: float = 240) -> tuple[list[dict[str, Any]], int, int]:
        """``(records, distinct event ids, duplicates)`` of the predictions topic (``n`` expected)."""
        records = [orjson.loads(v) for v in read_all(self.settings, self.spec.topics.predictions, n, timeout)]
        distinct = len({r["event_id"] for r in records})
        return records, distinct, len(records) - distinct

    def any_dead(self) -> bool:
        """True once a process exited: a wait on it can stop (:meth:`assert_alive` says which)."""
        return not all(p.alive() for p in self.procs)

    def assert_alive(self, after: str) -> None:
        for p in self.procs:
            assert p.alive(), f"a Weir process died {after}: {' '.join(p.args[:3])}\n{p.tail()}"


@contextmanager
def pipeline_on_cluster(
    name: str, unique: str, tmp_path: Path, buckets: int = 1
) -> Iterator[ClusterPipeline]:
    """The full topology on the cluster for a pipeline ``<name><unique>``, ready to score.

    ``buckets`` is the spec's ``redis.buckets``: 1 puts the pipeline on one master (stage
    1), more spread its entities' and events' keys over every master (stage 2)."""
    env: dict[str, str | None] = {
        "WEIR_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "WEIR_TOPIC_REPLICATION_FACTOR": "3",
        "WEIR_TOPIC_MIN_INSYNC_REPLICAS": "2",
        "WEIR_REDIS_URL": REDIS_URL,
        "WEIR_REDIS_CLUSTER": "true",
        "WEIR_MODEL_KEY": os.environ.get("WEIR_MODEL_KEY") or f"weir-cluster-test-{unique}",
    }
    settings = load_settings(**{k.removeprefix("WEIR_").lower(): v for k, v in env.items()})
    base = load_spec(REPO / "examples/demo.yaml")
    spec = base.model_copy(
        update={
            "name": f"{name}{unique}",
            "topics": base.topics.model_copy(
                update={f: "" for f in base.topics.names()} | {"partitions": PARTITIONS}
            ),
            "model": base.model.model_copy(update={"name": f"{name}{unique}"}),
            "learner": base.learner.model_copy(
                update={"snapshot_every_labels": 200, "snapshot_every_seconds": 1.0}
            ),
            "redis": base.redis.model_copy(update={"buckets": buckets}),
        }
    )
    spec = type(spec).model_validate(spec.model_dump(by_alias=True))  # topic names re-derived
    admin.ensure_topics(settings, spec)
    client = settings.redis()
    procs: list[WeirProcess] = []
    t0 = time.monotonic()
    try:
        learner = Worker(spec, tmp_path / "learner", role="learner", env=env)
        procs.append(learner)
        scorers = [
            Worker(spec, tmp_path / f"s{i}", role="scorer", metrics_port=free_port(), env=env)
            for i in range(SCORERS)
        ]
        procs += scorers
        monitor = Monitor(learner.spec_path, tmp_path / "monitor", env=env)
        procs.append(monitor)
        pipeline = ClusterPipeline(spec, settings, client, learner, scorers, monitor)
        registry = ModelRegistry(client, spec)
        wait_for(lambda: registry.alias("champion"), 180, "the learner to bootstrap the champion")
        wait_for(
            lambda: assigned_members(settings, spec.consumer_group) == SCORERS,
            240,
            f"{SCORERS} scorers with partitions",
        )
        pipeline.ready_s = time.monotonic() - t0
        yield pipeline
    finally:
        t_end = time.monotonic()
        stop_all(procs)
        try:
            admin.delete_keys(client, spec.redis_prefix)
            client.close()
        finally:
            admin.delete_topics(
                settings, [*spec.topics.names().values(), f"{spec.consumer_group}-__assignor-__leader"]
            )
            print(f"pipeline {spec.name}: stopped and deleted in {time.monotonic() - t_end:.1f}s")
