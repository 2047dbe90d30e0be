"""Fixtures for tests against the local cluster: 3 KRaft brokers and a Redis Cluster 3+3.

``make test-cluster`` runs this folder (``make test`` does not collect it). The session
fixture ``cluster`` runs ``deploy/local/cluster.py up`` (reusing nodes already running) and,
at the end of the session, stops only the nodes it started (``WEIR_KEEP_CLUSTER=1`` keeps
them). A node that does not come up fails the session: cluster tests never skip.

Fixtures:
    cluster         session  Cluster: bootstrap, redis_nodes [(host, port)]
    cluster_settings session weir Settings pointing at the three brokers
    unique          function short unique id, e.g. ``t3f9a0c1d``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from weir.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
CLUSTER_PY = REPO / "deploy" / "local" / "cluster.py"
# Three cold JVMs forming a quorum on 2 busy cores, plus the Redis Cluster's create.
CLUSTER_UP_TIMEOUT = 400.0

BOOTSTRAP = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
REDIS_NODES = [("127.0.0.1", p) for p in range(7000, 7006)]


@dataclass(frozen=True)
class Cluster:
    bootstrap: str
    redis_nodes: list[tuple[str, int]]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, str(CLUSTER_PY), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`cluster.py {' '.join(args)}` took over {timeout:g}s; see .weir/cluster/logs/")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    res = _run("up", "--json", timeout=CLUSTER_UP_TIMEOUT)
    if res.returncode != 0:
        pytest.fail(f"`deploy/local/cluster.py up` failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    started = json.loads(res.stdout.strip().splitlines()[-1])["started"]
    yield Cluster(bootstrap=BOOTSTRAP, redis_nodes=REDIS_NODES)
    if started and not os.environ.get("WEIR_KEEP_CLUSTER"):
        # Stopping one part stops all its nodes; the parts a session started are whole parts.
        parts = sorted({name.split("-", 1)[0] for name in started})
        for part in parts:
            down = _run("down", part, timeout=120)
            if down.returncode != 0:
                print(f"cluster.py down {part} failed:\n{down.stdout}{down.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def cluster_settings(cluster: Cluster) -> Settings:
    return load_settings(kafka_bootstrap=cluster.bootstrap)


@pytest.fixture
def unique() -> str:
    return f"t{uuid.uuid4().hex[:8]}"
