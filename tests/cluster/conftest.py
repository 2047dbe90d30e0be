"""Fixtures for tests against the local cluster: 3 KRaft brokers and a Redis Cluster 3+3.

``make test-cluster`` runs this folder (``make test`` does not collect it). The session
fixture ``cluster`` runs ``deploy/local/cluster.py up`` (reusing nodes already running) and,
at the end of the session, stops only the nodes it started (``WEIR_KEEP_CLUSTER=1`` keeps
them). A node that does not come up fails the session: cluster tests never skip.

Helpers: :func:`kill_broker`, :func:`restart_kafka` (after a kill), :func:`read_all`.

Fixtures:
    cluster         session  Cluster: bootstrap, redis_nodes [(host, port)]
    cluster_settings session weir Settings pointing at the three brokers
    unique          function short unique id, e.g. ``t3f9a0c1d``
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from tests.local_scripts import run_deploy_script
from weir.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
PIDS = REPO / ".weir" / "cluster" / "pids"
# Three cold JVMs forming a quorum on 2 busy cores, plus the Redis Cluster's create.
CLUSTER_UP_TIMEOUT = 400.0

BOOTSTRAP = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
REDIS_NODES = [("127.0.0.1", p) for p in range(7000, 7006)]


@dataclass(frozen=True)
class Cluster:
    bootstrap: str
    redis_nodes: list[tuple[str, int]]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    res = run_deploy_script("cluster", "up", "--json", timeout=CLUSTER_UP_TIMEOUT)
    if res.returncode != 0:
        pytest.fail(f"`deploy/local/cluster.py up` failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    started = json.loads(res.stdout.strip().splitlines()[-1])["started"]
    yield Cluster(bootstrap=BOOTSTRAP, redis_nodes=REDIS_NODES)
    if started and not os.environ.get("WEIR_KEEP_CLUSTER"):
        # Stopping one part stops all its nodes; the parts a session started are whole parts.
        parts = sorted({name.split("-", 1)[0] for name in started})
        for part in parts:
            down = run_deploy_script("cluster", "down", part, timeout=120)
            if down.returncode != 0:
                print(f"cluster.py down {part} failed:\n{down.stdout}{down.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def cluster_settings(cluster: Cluster) -> Settings:
    return load_settings(kafka_bootstrap=cluster.bootstrap)


@pytest.fixture
def unique() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def kill_broker(broker_id: int) -> None:
    """SIGKILL the cluster's broker ``broker_id`` (its pid from cluster.py's pid file)."""
    os.kill(int((PIDS / f"kafka-{broker_id}.pid").read_text()), signal.SIGKILL)


def restart_kafka() -> None:
    """``cluster.py up kafka``: start the brokers a test killed, and wait for the quorum."""
    res = run_deploy_script("cluster", "up", "kafka", timeout=CLUSTER_UP_TIMEOUT)
    assert res.returncode == 0, f"cluster.py up kafka failed after the kill:\n{res.stdout}{res.stderr}"


def read_all(settings: Settings, topic: str, n: int, timeout: float) -> list[bytes]:
    """The values of ``topic`` from the start, read by a new group until ``n`` came or
    ``timeout`` passed, then 3 s more: anything beyond ``n`` would be a duplicate."""
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"weir-test-read-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += [m.value() or b"" for m in consumer.consume(1000, 1.0) if m.error() is None]
        end = time.monotonic() + 3
        while time.monotonic() < end:
            out += [m.value() or b"" for m in consumer.consume(1000, 0.5) if m.error() is None]
    finally:
        consumer.close()
    return out
