"""Fixtures for tests against the local cluster: 3 KRaft brokers and a Redis Cluster 3+3.

``make test-cluster`` runs this folder (``make test`` does not collect it). The session
fixture ``cluster`` runs ``deploy/local/cluster.py up`` (reusing nodes already running) and,
at the end of the session, stops only the nodes it started (``WEIR_KEEP_CLUSTER=1`` keeps
them). A node that does not come up fails the session: cluster tests never skip.

Helpers: :func:`kill_broker`, :func:`restart_kafka` (after a kill), :func:`read_all`;
:func:`redis_master_of`, :func:`kill_redis`, :func:`restart_redis` (after a kill: the node
comes back as a replica, the cluster healthy again).

Fixtures:
    cluster         session  Cluster: bootstrap, redis_nodes [(host, port)]
    cluster_settings session weir Settings pointing at the three brokers
    redis_cluster_settings session  weir Settings with ``WEIR_REDIS_CLUSTER=true`` (node 7000)
    redis_client    function Settings.redis() of those: a ``RedisCluster``, so the tests of
                    tests/integration imported here run on the Redis Cluster
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
from typing import Any

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
REDIS_URL = "redis://127.0.0.1:7000"
#: Read once and removed: a WEIR_* variable that is not a setting makes load_settings()
#: (here and in every Weir process a test starts) refuse to run.
KEEP_CLUSTER = bool(os.environ.pop("WEIR_KEEP_CLUSTER", ""))
#: A dead master's replica is promoted after cluster-node-timeout (5 s, cluster.py) and an
#: election; generous on the loaded machine.
FAILOVER_TIMEOUT = 60.0


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
    if started and not KEEP_CLUSTER:
        # Stopping one part stops all its nodes; the parts a session started are whole parts.
        parts = sorted({name.split("-", 1)[0] for name in started})
        for part in parts:
            down = run_deploy_script("cluster", "down", part, timeout=120)
            if down.returncode != 0:
                print(f"cluster.py down {part} failed:\n{down.stdout}{down.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def cluster_settings(cluster: Cluster) -> Settings:
    return load_settings(kafka_bootstrap=cluster.bootstrap)


@pytest.fixture(scope="session")
def redis_cluster_settings(cluster: Cluster) -> Settings:
    return load_settings(redis_url=REDIS_URL, redis_cluster=True)


@pytest.fixture
def redis_client(redis_cluster_settings: Settings) -> Iterator[Any]:
    client = redis_cluster_settings.redis()
    yield client
    client.close()


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


def redis_master_of(client: Any, key: str) -> int:
    """The port of the master that owns ``key``'s slot now."""
    return int(client.get_node_from_key(key).port)


def kill_redis(port: int) -> None:
    """SIGKILL the Redis Cluster node on ``port`` (its pid from cluster.py's pid file)."""
    os.kill(int((PIDS / f"redis-{port}.pid").read_text()), signal.SIGKILL)


def redis_topology(timeout: float = 2.0) -> tuple[str, dict[int, int]]:
    """``(cluster_state, {replica port: its master's port})`` as node 7000..7005 see it (the
    first that answers)."""
    import redis

    for host, port in REDIS_NODES:
        client = redis.Redis(host=host, port=port, socket_timeout=timeout, decode_responses=True)
        try:
            info = str(client.execute_command("CLUSTER", "INFO"))
            nodes = str(client.execute_command("CLUSTER", "NODES"))
        except redis.RedisError:
            continue
        finally:
            client.close()
        state = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        rows = [line.split() for line in nodes.splitlines() if line.strip()]
        live = [r for r in rows if "fail" not in r[2] and "disconnected" not in r[7:8]]
        port_of = {r[0]: int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows}
        pairs = {port_of[r[0]]: port_of.get(r[3], 0) for r in live if "slave" in r[2].split(",")}
        return state.get("cluster_state", "?").strip(), pairs
    return "no answer", {}


def restart_redis() -> None:
    """``cluster.py up redis``: restart the nodes a test killed (a killed master comes back as
    its successor's replica), then wait until the cluster is ok with 3 masters, 1 replica each."""
    res = run_deploy_script("cluster", "up", "redis", timeout=CLUSTER_UP_TIMEOUT)
    assert res.returncode == 0, f"cluster.py up redis failed after the kill:\n{res.stdout}{res.stderr}"
    deadline = time.monotonic() + FAILOVER_TIMEOUT
    while True:
        state, pairs = redis_topology()
        if state == "ok" and len(pairs) == 3 and len(set(pairs.values())) == 3:
            return
        assert time.monotonic() < deadline, f"Redis Cluster not healed: {state}, replicas {pairs}"
        time.sleep(0.5)
