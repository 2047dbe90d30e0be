#!/usr/bin/env python3
"""The local cluster stack: three Kafka brokers (one KRaft quorum) and a six-node Redis Cluster.

Usage (with the project's virtualenv python; ``make up-cluster`` / ``make down-cluster``)::

    python deploy/local/cluster.py up       # start what is not running, form the clusters, wait
    python deploy/local/cluster.py status   # one line per server, plus the clusters' state
    python deploy/local/cluster.py down     # stop every node, verify no process is left
    python deploy/local/cluster.py down --wipe   # ... and delete the data (a fresh cluster next up)

What runs, all plain local processes on 127.0.0.1 (no Docker), beside the single-node stack
of ``stack.py`` (ports 9092/6379/9090), which it does not touch:

- Kafka 3.9.2 ``kafka-1..3``: combined broker+controller nodes forming one KRaft quorum of
  three voters; clients on 19092, 19093, 19094, controllers on 19192, 19193, 19194. Default
  replication factor 3 and ``min.insync.replicas`` 2 (also for the internal topics). Each JVM
  has a 512 MB heap. The jars are the ones ``stack.py`` fetches from Maven Central.
- Redis ``redis-7000..7005``: ``redis-server`` with ``cluster-enabled yes`` and the same
  durable configuration as the single Redis (``stack.redis_config``), made one cluster of
  three masters and three replicas by ``redis-cli --cluster create ... --cluster-replicas 1``.

State (configs, data, pid files, logs) lives in ``<repo>/.weir/cluster/``. Weir points at it
with ``WEIR_KAFKA_BOOTSTRAP=127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094`` (see
docs/scaling.md for the Redis side).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stack  # noqa: E402  (deploy/local/stack.py, run as a script beside this one)
from stack import (  # noqa: E402
    HOST,
    REPO,
    Kafka,
    Server,
    StackFailure,
    alive,
    find_program,
    need,
    port_in_use,
    port_taken_message,
    say,
    tail,
    wait_until,
)

STATE = REPO / ".weir" / "cluster"
LOGS = STATE / "logs"
PIDS = STATE / "pids"

KAFKA_PORTS = (19092, 19093, 19094)
KAFKA_CONTROLLER_PORTS = (19192, 19193, 19194)
REDIS_PORTS = tuple(range(7000, 7006))
REPLICATION = 3
MIN_INSYNC = 2

BOOTSTRAP = ",".join(f"{HOST}:{p}" for p in KAFKA_PORTS)
REDIS_NODES = ",".join(f"{HOST}:{p}" for p in REDIS_PORTS)

# Three JVMs on 2 cores start far slower than one; the quorum also needs all three up.
KAFKA_READY_TIMEOUT = 240.0
REDIS_READY_TIMEOUT = 15.0
REDIS_CLUSTER_TIMEOUT = 60.0
# Stopped together, the last broker of a KRaft quorum can hang in its Raft shutdown once the
# other voters are gone (seen here: 45 s, then SIGKILL). Its log is recovered on the next
# start; 20 s is ample for a broker that can shut down.
STOP_TIMEOUT = {"kafka": 20.0, "redis": 10.0}


def kafka_nodes() -> list[Kafka]:
    voters = ",".join(f"{i}@{HOST}:{p}" for i, p in enumerate(KAFKA_CONTROLLER_PORTS, start=1))
    nodes = []
    for i, (port, cport) in enumerate(zip(KAFKA_PORTS, KAFKA_CONTROLLER_PORTS, strict=True), start=1):
        name = f"kafka-{i}"
        node = Kafka(
            port,
            cport,
            state=STATE / name,
            logs=LOGS / name,
            name=name,
            node_id=i,
            voters=voters,
            replication=REPLICATION,
        )
        node.pidfile = PIDS / f"{name}.pid"
        nodes.append(node)
    return nodes


def redis_cluster_config(port: int, data_dir: Path, log: Path, pidfile: Path) -> str:
    """``stack.redis_config`` (durable, 127.0.0.1 only) plus the cluster-mode lines."""
    return stack.redis_config(port, data_dir, log, pidfile) + (
        "\n# Cluster mode (deploy/local/cluster.py): the node table lives beside the data.\n"
        "cluster-enabled yes\n"
        "cluster-config-file nodes.conf\n"
        # A dead master's replica is promoted after this many ms without an answer.
        "cluster-node-timeout 5000\n"
    )


class RedisNode(stack.Redis):
    """One ``redis-server`` of the Redis Cluster: the stack's Redis on another port, with the
    cluster-mode lines in its configuration."""

    def __init__(self, port: int) -> None:
        super().__init__(
            port,
            name=f"redis-{port}",
            dir=STATE / f"redis-{port}",
            log=LOGS / f"redis-{port}.log",
            address=f"redis://{HOST}:{port} (cluster)",
            ports=(port, port + 10000),  # the cluster bus port
        )
        self.pidfile = PIDS / f"{self.name}.pid"

    def config(self) -> str:
        return redis_cluster_config(self.port, self.dir, self.log, self.pidfile)

    def on_reuse(self) -> None:
        """Nothing: the stack's appendonly warning names ``stack.py``'s commands."""

    def cluster_info(self, timeout: float = 2.0) -> dict[str, str]:
        """``CLUSTER INFO`` as a dict ({} if the node does not answer)."""
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_timeout=timeout, decode_responses=True)
        try:
            raw = client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return {}
        finally:
            client.close()
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        return dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)


def redis_nodes() -> list[RedisNode]:
    return [RedisNode(p) for p in REDIS_PORTS]


def servers() -> list[Server]:
    return [*kafka_nodes(), *redis_nodes()]


def kind(server: Server) -> str:
    return server.name.split("-", 1)[0]


# -- forming the clusters ----------------------------------------------------------------------


def share_cluster_id(nodes: list[Kafka]) -> None:
    """Every node of one KRaft cluster formats its storage with the same cluster id."""
    path = STATE / "kafka-cluster-id"
    nodes[0].dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(nodes[0].cluster_id() + "\n")
    cid = path.read_text().strip()
    for node in nodes:
        node.dir.mkdir(parents=True, exist_ok=True)
        (node.dir / "cluster-id").write_text(cid + "\n")


def start_kafka(nodes: list[Kafka]) -> list[str]:
    """Start every node that is not running, then wait for all: a quorum of three voters
    elects no leader (and no broker reaches RUNNING) until at least two are up."""
    started: dict[str, int] = {}
    waiting: list[tuple[Kafka, int]] = []
    for node in nodes:
        pids = node.pids()
        if pids:
            node.pidfile.write_text(f"{pids[0]}\n")
            waiting.append((node, pids[0]))
            continue
        for port in node.ports:
            if port_in_use(port):
                raise StackFailure(port_taken_message(port, node.name))
    todo = [n for n in nodes if not n.pids()]
    if todo:
        todo[0].prerequisites()
        share_cluster_id(nodes)
    for node in todo:
        node.logs.mkdir(parents=True, exist_ok=True)
        pid = node.launch().pid
        node.pidfile.write_text(f"{pid}\n")
        started[node.name] = pid
        waiting.append((node, pid))
    t0 = time.monotonic()
    for node, pid in waiting:

        def ready(n: Kafka = node, p: int = pid) -> bool:
            if not alive(p):
                raise n.fail_start(f"exited while starting (pid {p})")
            return brokers_seen(n.port) == len(nodes)

        left = max(10.0, KAFKA_READY_TIMEOUT - (time.monotonic() - t0))
        if not wait_until(ready, left, interval=1.0):
            raise node.fail_start(
                f"does not list {len(nodes)} brokers after {KAFKA_READY_TIMEOUT:.0f}s "
                f"(sees {brokers_seen(node.port)})",
                pid,
            )
        verb = "started" if node.name in started else "reused"
        say(f"{node.name}: {verb}, ready after {time.monotonic() - t0:.1f}s (pid {pid}, {node.address})")
    return list(started)


def brokers_seen(port: int, timeout: float = 2.0) -> int:
    """How many brokers the node on ``port`` lists in its metadata (0 if it does not answer)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": f"{HOST}:{port}", "log_level": 0})
    try:
        return len(admin.list_topics(timeout=timeout).brokers)
    except Exception:
        return 0


def redis_cluster_state(nodes: list[RedisNode]) -> str:
    """``ok`` when every node says so and knows all the others; else a short description."""
    infos = {n.name: n.cluster_info() for n in nodes}
    bad = [
        f"{name}: {info.get('cluster_state', 'no answer')}, knows {info.get('cluster_known_nodes', '?')}"
        for name, info in infos.items()
        if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(len(nodes))
    ]
    return "ok" if not bad else "; ".join(bad)


def form_redis_cluster(nodes: list[RedisNode]) -> bool:
    """Join the six nodes into one cluster (3 masters, 1 replica each) unless they are.
    True if this call formed it."""
    if redis_cluster_state(nodes) == "ok":
        return False
    infos = [n.cluster_info() for n in nodes]
    if any(
        i.get("cluster_known_nodes", "1") != "1" or i.get("cluster_slots_assigned", "0") != "0" for i in infos
    ):
        # Half-formed (a node was wiped, or a create was interrupted): give it time to heal
        # (a restarted node rejoins from its nodes.conf), then refuse rather than guess.
        if wait_until(lambda: redis_cluster_state(nodes) == "ok", REDIS_CLUSTER_TIMEOUT, interval=1.0):
            return False
        raise StackFailure(
            f"redis cluster: partly formed and not healing ({redis_cluster_state(nodes)}); "
            "`cluster.py down --wipe` then `cluster.py up` makes a fresh one"
        )
    need("redis-cli")
    argv = [
        find_program("redis-cli") or "redis-cli",
        "--cluster",
        "create",
        *(f"{HOST}:{n.port}" for n in nodes),
        "--cluster-replicas",
        "1",
        "--cluster-yes",
    ]
    log = LOGS / "redis-cluster-create.log"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    log.write_text(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        raise StackFailure(f"redis cluster: `{' '.join(argv)}` failed (exit {res.returncode}):\n{tail(log)}")
    if not wait_until(lambda: redis_cluster_state(nodes) == "ok", REDIS_CLUSTER_TIMEOUT, interval=0.5):
        raise StackFailure(
            f"redis cluster: not ok {REDIS_CLUSTER_TIMEOUT:.0f}s after create "
            f"({redis_cluster_state(nodes)}); "
            f"see {log}"
        )
    return True


# -- commands ----------------------------------------------------------------------------------


def chosen(what: str) -> tuple[list[Kafka], list[RedisNode]]:
    if what not in ("all", "kafka", "redis"):
        raise StackFailure(f"unknown part {what!r}; choose all, kafka or redis")
    return (
        kafka_nodes() if what in ("all", "kafka") else [],
        redis_nodes() if what in ("all", "redis") else [],
    )


def cmd_up(args: argparse.Namespace) -> int:
    kafkas, redises = chosen(args.part)
    for d in (LOGS, PIDS):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    started: list[str] = []
    with stack.locked(STATE / "cluster.lock"):
        for node in redises:
            if node.up():
                started.append(node.name)
        if redises and form_redis_cluster(redises):
            say(f"redis cluster: formed, 3 masters + 3 replicas on {REDIS_NODES}")
        elif redises:
            say("redis cluster: already formed, state ok")
        if kafkas:
            started += start_kafka(kafkas)
    say(f"cluster up in {time.monotonic() - t0:.1f}s; logs in {LOGS}")
    say(f"  WEIR_KAFKA_BOOTSTRAP={BOOTSTRAP}")
    say(f"  redis cluster nodes: {REDIS_NODES}")
    if args.json:
        names = [s.name for s in (*kafkas, *redises)]
        say(json.dumps({"started": started, "reused": [n for n in names if n not in started]}))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    kafkas, redises = chosen(args.part)
    picked: list[Server] = [*kafkas, *redises]
    if not STATE.exists():
        say("cluster: nothing to stop")
        return 0
    with stack.locked(STATE / "cluster.lock"):
        left = stack.stop_all(picked, lambda server: STOP_TIMEOUT[kind(server)])
        if left:
            say("cluster: still running after down: " + ", ".join(left))
            return 1
        if args.wipe:
            for data in [k.dir for k in kafkas] + [r.dir for r in redises]:
                shutil.rmtree(data, ignore_errors=True)
            if kafkas:
                (STATE / "kafka-cluster-id").unlink(missing_ok=True)
            say(f"cluster: data of {', '.join(s.name for s in picked)} deleted")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    kafkas, redises = chosen(args.part)
    picked: list[Server] = [*kafkas, *redises]
    running = [s for s in picked if s.pids()]
    if not running and args.optional:
        say("cluster     not running (`make up-cluster` starts it)")
        return 0
    down = 0
    for server in picked:
        pids = server.pids()
        ok = server.healthy()
        down += not ok
        pid = str(pids[0]) if pids else "-"
        state = "healthy" if ok else "down"
        say(f"{server.name:<11} {state:<8} pid {pid:<8} {server.address:<45} {server.log}")
    if kafkas:
        seen = max((brokers_seen(k.port) for k in kafkas), default=0)
        ok = seen == len(kafkas)
        down += not ok
        say(f"{'kafka':<11} {'ok' if ok else 'degraded':<8} {seen}/{len(kafkas)} brokers in the metadata")
    if redises:
        state = redis_cluster_state(redises)
        down += state != "ok"
        say(f"{'redis':<11} {'ok' if state == 'ok' else 'degraded':<8} cluster: {state}")
    return 1 if down else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cluster.py", description="Weir's local Kafka cluster (3 KRaft brokers) and Redis Cluster (3+3)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "up": (cmd_up, "start what is not running, form the clusters, wait until healthy"),
        "down": (cmd_down, "stop every node, SIGKILL after a timeout"),
        "status": (cmd_status, "health of each node and of both clusters; exit 1 if any is down"),
    }
    for name, (func, text) in commands.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("part", nargs="?", default="all", help="all (default), kafka or redis")
        cmd.set_defaults(func=func)
        if name == "up":
            cmd.add_argument("--json", action="store_true", help="end with a JSON line: started/reused")
        if name == "down":
            cmd.add_argument("--wipe", action="store_true", help="also delete the nodes' data")
        if name == "status":
            cmd.add_argument("--optional", action="store_true", help="exit 0 when no node runs at all")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StackFailure as exc:
        print(f"cluster.py {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cluster.py {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
