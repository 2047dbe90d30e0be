"""The local Redis Cluster: three masters covering all 16384 slots, one replica each."""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from tests.cluster.conftest import Cluster


def test_three_masters_each_with_one_replica(cluster: Cluster) -> None:
    host, port = cluster.redis_nodes[0]
    client = redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=5)
    try:
        info = client.execute_command("CLUSTER", "INFO")
        nodes = client.execute_command("CLUSTER", "NODES")
    finally:
        client.close()
    state = dict(line.split(":", 1) for line in str(info).splitlines() if ":" in line)
    rows = [line.split() for line in str(nodes).splitlines() if line.strip()]
    masters = {r[0]: r for r in rows if "master" in r[2].split(",")}
    replicas = [r for r in rows if "slave" in r[2].split(",")]
    assert state["cluster_state"].strip() == "ok"
    assert state["cluster_slots_assigned"].strip() == "16384"
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(r[3] for r in replicas) == sorted(masters), "each master has exactly one replica"
    ports = {int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows}
    assert ports == {p for _, p in cluster.redis_nodes}


def test_keys_spread_over_the_masters_and_a_hash_tag_shares_a_slot(cluster: Cluster, unique: str) -> None:
    host, port = cluster.redis_nodes[0]
    rc = RedisCluster(host=host, port=port, decode_responses=True, socket_timeout=5)
    try:
        keys = [f"weir:{unique}:k{i}" for i in range(30)]
        for i, key in enumerate(keys):
            rc.set(key, str(i))
        owners = {rc.get_node_from_key(k).port for k in keys}
        assert len(owners) == 3, f"30 keys all landed on masters {owners}"
        # A hash tag puts keys on one slot: the multi-key commands Weir needs then work.
        tagged = [f"weir:{{{unique}}}:a", f"weir:{{{unique}}}:b"]
        rc.mset({tagged[0]: "1", tagged[1]: "2"})
        assert rc.mget(tagged) == ["1", "2"]
        rc.delete(*keys, *tagged)
    finally:
        rc.close()
