#!/usr/bin/env python3
"""Scale-out benchmark: scoring events/s with 1, 2 and 3 scorers on the local Kafka cluster.

For each scorer count k: a fresh pipeline (examples/demo.yaml, 6 partitions, replication
factor 3, min.insync.replicas 2) on the three KRaft brokers of ``make up-cluster``; one
``weir worker --role learner`` (it publishes the first champion) and k ``--role scorer``
processes in one consumer group; a warm-up until every scorer holds partitions and every
warm-up event is answered; then the scorers are paused (SIGSTOP), a backlog of
``--events`` events (no labels: this measures scoring) is written, the scorers are resumed,
and the rate is outputs / (last - first prediction Kafka timestamp). The scorers' CPU
(utime + stime) over the drain gives µs per event.

Redis: a private ``redis-server`` started by this script on a free port, stopped at the end
(one pipeline's keys are on one Redis Cluster master anyway, docs/scaling.md).

Usage: python bench/scale.py [--scorers 1,2,3] [--events 20000]   (needs `make up-cluster`)

Figures from a shared 2-core machine are not capacity figures: k scorers on 2 cores
compete with each other, the three brokers and Redis, so the curve flattens early. Saves
``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    WORK,
    LabelDelay,
    OutputReader,
    Proc,
    cleanup,
    cpu_seconds,
    free_port,
    live_send,
    machine,
    make_topics,
    pipeline,
    preload,
    records,
    spawn,
    wait_until,
)

from weir.settings import load_settings

BOOTSTRAP = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
WARMUP_EVENTS = 300


def start_redis() -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="weir-scale-redis-"))
    argv = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    import redis

    def up() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    if not wait_until(up, 15):
        proc.kill()
        raise SystemExit(f"private redis-server on {port} did not answer")
    return proc, port, folder


def assigned_members(settings: Any, group: str) -> int:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.confluent_config())
    try:
        desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:
        return 0
    return sum(1 for m in desc.members if m.assignment and m.assignment.topic_partitions)


def worker(path: Path, role: str, name: str, data: Path) -> Proc:
    argv = [sys.executable, "-m", "weir.cli", "worker", str(path), "--role", role]
    argv += ["--metrics-port", str(free_port())]
    if role != "learner":
        argv += ["--", "--without-web", "-l", "warn"]
    data.mkdir(parents=True, exist_ok=True)
    return spawn(name, argv, env={"WEIR_DATA_DIR": str(data)})


def run_one(k: int, base: dict[str, Any], settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    tag = f"scale{k}x{uuid.uuid4().hex[:6]}"
    spec, path = pipeline(base, tag)
    make_topics(settings, spec)
    data = WORK / tag
    procs = [worker(path, "learner", f"{tag}-learner", data / "learner")]
    scorers = [worker(path, "scorer", f"{tag}-scorer{i}", data / f"s{i}") for i in range(k)]
    procs += scorers
    out: dict[str, Any] = {"scorers": k}
    try:
        t0 = time.time()
        if not wait_until(
            lambda: assigned_members(settings, spec.consumer_group) == k or not all(p.alive() for p in procs),
            300,
            1.0,
        ):
            raise RuntimeError(f"{k} scorers did not all get partitions in 300 s; logs in {WORK}")
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited; log {dead[0].log}:\n{dead[0].tail()}")
        warm = records(spec, WARMUP_EVENTS, run_id="warm", seed=1, entities=args.entities, labels=False)
        reader = OutputReader(settings, spec.topics.predictions)
        reader.start()
        live_send(settings, spec, warm, 100.0, LabelDelay(events=50))
        if not reader.wait_for({r.event_id for r in warm}, 240):
            raise RuntimeError(f"warm-up of {k} scorers not answered in 240 s; logs in {WORK}")
        reader.close()
        out["startup_seconds"] = round(time.time() - t0, 1)
        out["assigned_members"] = assigned_members(settings, spec.consumer_group)

        recs = records(spec, args.events, run_id="bk", seed=3, entities=args.entities, labels=False)
        reader = OutputReader(settings, spec.topics.predictions)
        reader.start()
        for p in scorers:
            p.signal(signal.SIGSTOP)
        preload(settings, spec, recs, 0)
        cpu0 = sum(cpu_seconds(p.pid) for p in scorers)
        t_resume = time.time()
        for p in scorers:
            p.signal(signal.SIGCONT)
        ids = {r.event_id for r in recs}
        complete = reader.wait_for(ids, args.timeout)
        cpu1 = sum(cpu_seconds(p.pid) for p in scorers)
        window = time.time() - t_resume
        reader.close()
        times = sorted(reader.times[i] for i in ids if i in reader.times)
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        out["backlog"] = {
            "events": len(recs),
            "received": len(times),
            "complete": complete,
            "first_to_last_seconds": round(span, 3),
            "events_per_second": round((len(times) - 1) / span, 1) if span and span > 0 else None,
            "resume_to_last_output_seconds": round(window, 2),
        }
        out["scorer_cpu_us_per_event"] = round(1e6 * (cpu1 - cpu0) / len(recs), 1)
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        for p in procs:
            p.stop()
        cleanup(settings, spec)
        shutil.rmtree(data, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorers", default="1,2,3", help="scorer counts to run (default 1,2,3)")
    ap.add_argument("--events", type=int, default=20_000, help="backlog events per run (default 20,000)")
    ap.add_argument("--entities", type=int, default=50_000, help="distinct entities (default 50,000)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a backlog to drain")
    ap.add_argument("--out", default=str(REPO / "bench/results/scale.json"))
    args = ap.parse_args()

    redis_proc, redis_port, redis_dir = start_redis()
    os.environ.update(
        {
            "WEIR_KAFKA_BOOTSTRAP": BOOTSTRAP,
            "WEIR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "WEIR_TOPIC_REPLICATION_FACTOR": "3",
            "WEIR_TOPIC_MIN_INSYNC_REPLICAS": "2",
        }
    )
    os.environ.setdefault("WEIR_MODEL_KEY", f"weir-bench-{uuid.uuid4().hex}")
    settings = load_settings()
    base = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
    base.setdefault("topics", {})["partitions"] = 6
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "setup": "3 KRaft brokers (RF 3, min ISR 2), private single Redis, examples/demo.yaml, "
        "6 partitions, 1 learner, no labels",
        "runs": [],
    }
    try:
        for k in [int(x) for x in args.scorers.split(",")]:
            print(f"scale: {k} scorer(s) ...", flush=True)
            r = run_one(k, base, settings, args)
            results["runs"].append(r)
            print(
                f"  {k} scorer(s): {r['backlog']['events_per_second']} events/s "
                f"(complete {r['backlog']['complete']}), scorer CPU {r['scorer_cpu_us_per_event']} µs/event, "
                f"load {r['loadavg_after']}",
                flush=True,
            )
    finally:
        redis_proc.send_signal(signal.SIGTERM)
        redis_proc.wait(15)
        shutil.rmtree(redis_dir, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
