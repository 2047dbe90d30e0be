"""deploy/local/cluster.py's configuration, without starting anything: three KRaft nodes
that form one quorum with replicated defaults, six Redis nodes in cluster mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.local_scripts import deploy_script


@pytest.fixture(scope="module")
def cluster() -> Any:
    return deploy_script("cluster")


def _props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_three_kafka_nodes_form_one_quorum_with_replicated_defaults(cluster: Any, tmp_path: Path) -> None:
    nodes = cluster.kafka_nodes()
    assert [n.port for n in nodes] == [19092, 19093, 19094]
    assert len({n.controller_port for n in nodes}) == 3
    assert len({n.marker for n in nodes}) == 3 and len({n.pidfile for n in nodes}) == 3
    props = []
    for node in nodes:
        # The same node, its files in tmp_path instead of .weir/cluster.
        twin = type(node)(
            node.port,
            node.controller_port,
            state=tmp_path / node.name,
            logs=tmp_path / "logs",
            name=node.name,
            node_id=node.node_id,
            voters=node.voters,
            replication=node.replication,
        )
        twin.write_config()
        props.append(_props(twin.props.read_text()))
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    voters = {p["controller.quorum.voters"] for p in props}
    assert voters == {"1@127.0.0.1:19192,2@127.0.0.1:19193,3@127.0.0.1:19194"}
    for p in props:
        assert p["process.roles"] == "broker,controller"
        assert p["default.replication.factor"] == "3" and p["offsets.topic.replication.factor"] == "3"
        assert p["min.insync.replicas"] == "2" and p["transaction.state.log.min.isr"] == "2"
        assert p["auto.create.topics.enable"] == "false"
        assert p["listeners"].startswith(
            f"PLAINTEXT://127.0.0.1:{p['advertised.listeners'].rsplit(':', 1)[1]}"
        )


def test_the_single_broker_stack_is_unchanged(cluster: Any, tmp_path: Path) -> None:
    kafka = cluster.Kafka(state=tmp_path / "k", logs=tmp_path)
    kafka.write_config()
    p = _props(kafka.props.read_text())
    assert (p["node.id"], p["controller.quorum.voters"]) == ("1", "1@127.0.0.1:9093")
    assert p["default.replication.factor"] == "1" and p["min.insync.replicas"] == "1"


def test_redis_nodes_run_in_cluster_mode_durably_on_loopback(cluster: Any, tmp_path: Path) -> None:
    nodes = cluster.redis_nodes()
    assert [n.port for n in nodes] == list(range(7000, 7006))
    assert all(n.ports == (n.port, n.port + 10000) for n in nodes), "the cluster bus port is checked too"
    conf = cluster.redis_cluster_config(7000, tmp_path, tmp_path / "r.log", tmp_path / "r.pid")
    lines = set(conf.splitlines())
    assert {"cluster-enabled yes", "bind 127.0.0.1", "appendonly yes", "maxmemory-policy noeviction"} <= lines
    assert "cluster-config-file nodes.conf" in lines
