#!/usr/bin/env python3
"""End-to-end benchmark: Weir's scoring path against a plain Kafka consume-and-produce loop.

Both run in the same session on the same Kafka, so the baseline is the floor this
machine allows. For each, we measure:

* the maximum sustained rate: drain a pre-loaded backlog of N events and time the
  first to the last output message;
* latency percentiles (send of the event -> output message's Kafka timestamp) when
  events arrive live at 60% of that maximum rate, and at 100% of it.

Weir runs ``weir worker examples/loan-lr.yaml --role all`` (scaler + logistic regression,
10 features from Redis) as a subprocess. Results are printed and saved to
``bench/results/e2e.json``. Needs the local stack: ``make up`` (``make bench`` does it).

Usage: python bench/e2e.py [--events 60000] [--live-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streams.admin import delete_topics, ensure_topics  # noqa: E402
from streams.produce import build_messages, open_source  # noqa: E402
from weir.settings import load_settings  # noqa: E402
from weir.spec import parse_spec  # noqa: E402

#: Distinct entities in the generated streams. The online features cost O(events of the
#: entity in its longest window) per event, so the entity count decides the steady state:
#: with 1,000 entities at 2,500 events/s every entity would gain 9,000 events per 1 h window.
ENTITIES = 50_000


def pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def make_spec(name: str) -> Any:
    d = yaml.safe_load((REPO / "examples/loan-lr.yaml").read_text())
    d["name"] = name
    d["topics"] = {"partitions": 6}
    return parse_spec(d)


def preload(settings: Any, spec: Any, topic: str, n: int, run_id: str) -> list[bytes]:
    rows = open_source("river:synth.Agrawal?seed=3")
    msgs = []
    p = Producer({**settings.confluent_config(), "linger.ms": 20, "compression.type": "lz4"})
    import itertools

    for ev, _, _ in build_messages(spec, itertools.islice(rows, n), run_id=run_id, entities=ENTITIES):
        p.produce(topic, ev.value, ev.key)
        msgs.append(ev.value)
        p.poll(0)
    p.flush(60)
    return msgs


class OutputReader(threading.Thread):
    """Reads an output topic from its end, recording each message's Kafka timestamp by key/id."""

    def __init__(self, settings: Any, topic: str, id_of: Any) -> None:
        super().__init__(daemon=True)
        self.c = Consumer({**settings.confluent_config(), "group.id": f"bench-{uuid.uuid4().hex[:8]}"})
        md = self.c.list_topics(topic, timeout=10).topics[topic]
        parts = []
        for part in md.partitions:
            _, high = self.c.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
            parts.append(TopicPartition(topic, part, high))
        self.c.assign(parts)
        self.id_of = id_of
        self.times: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for m in self.c.consume(1000, 0.2):
                if m.error():
                    continue
                self.times.setdefault(self.id_of(m), m.timestamp()[1] / 1000.0)
        self.c.close()

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.times) >= n:
                return True
            time.sleep(0.1)
        return False


def live_load(
    settings: Any, topic: str, spec: Any, rate: float, seconds: float, run_id: str
) -> dict[str, float]:
    """Send events at ``rate``/s for ``seconds``; returns send time by event id."""
    import itertools

    p = Producer({**settings.confluent_config(), "linger.ms": 1})
    n = int(rate * seconds)
    sent: dict[str, float] = {}
    rows = itertools.islice(open_source("river:synth.Agrawal?seed=4"), n)
    t0 = time.time()
    for i, (ev, _, _) in enumerate(build_messages(spec, rows, run_id=run_id, entities=ENTITIES)):
        target = t0 + i / rate
        d = target - time.time()
        if d > 0:
            time.sleep(d)
        sent[f"{run_id}-{i}"] = time.time()
        p.produce(topic, ev.value, ev.key)
        p.poll(0)
    p.flush(30)
    return sent


def histogram(url: str | None, name: str = "weir_event_to_prediction_seconds") -> dict[float, float]:
    """Cumulative bucket counts of a histogram scraped from a /metrics URL."""
    if not url:
        return {}
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[float, float] = {}
    for line in body.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Upper bucket bounds holding p50/p95/p99 of the observations between two scrapes."""
    if not after:
        return {}
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1]
    res: dict[str, Any] = {"observations": int(total)}
    for q in (0.5, 0.95, 0.99):
        bound = next((le for le, c in zip(les, counts, strict=True) if c >= q * total), les[-1])
        res[f"p{int(q * 100)}_le_ms"] = None if bound == float("inf") else round(bound * 1000, 1)
    return res


def latency_summary(sent: dict[str, float], got: dict[str, float]) -> dict[str, Any]:
    lats = [got[k] - t for k, t in sent.items() if k in got]
    times = sorted(sent.values())
    return {
        "achieved_send_rate": round(len(times) / (times[-1] - times[0]), 1) if len(times) > 1 else None,
        "sent": len(sent),
        "received": len(lats),
        "p50_ms": round(pct(lats, 0.5) * 1000, 2) if lats else None,
        "p95_ms": round(pct(lats, 0.95) * 1000, 2) if lats else None,
        "p99_ms": round(pct(lats, 0.99) * 1000, 2) if lats else None,
    }


# -- baseline: consume and produce, no work ------------------------------------------


class Baseline(threading.Thread):
    def __init__(self, settings: Any, src: str, dst: str) -> None:
        super().__init__(daemon=True)
        self.settings, self.src, self.dst = settings, src, dst
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        conf = self.settings.confluent_config()
        c = Consumer({**conf, "group.id": f"baseline-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "latest"})
        p = Producer({**conf, "linger.ms": 5, "compression.type": "lz4"})
        c.subscribe([self.src], on_assign=lambda *_: self.ready.set())
        while not self.stop.is_set():
            msgs = c.consume(500, 0.05)
            for m in msgs:
                if m.error():
                    continue
                p.produce(self.dst, m.value(), m.key())
            p.poll(0)
            if msgs:
                p.flush(10)  # like Weir: outputs delivered before the batch counts as done
        p.flush(10)
        c.close()


def measure(
    name: str,
    settings: Any,
    spec: Any,
    src: str,
    dst: str,
    start: Any,
    stop: Any,
    id_of: Any,
    n: int,
    live_seconds: float,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": name}
    start()
    # 1) max sustained rate: drain a backlog
    reader = OutputReader(settings, dst, id_of)
    reader.start()
    run_id = f"{name}-bk-{uuid.uuid4().hex[:6]}"
    t_load = time.time()
    preload(settings, spec, src, n, run_id)
    ok = reader.wait_for(n, timeout=600)
    reader.stop.set()
    reader.join(5)
    times = sorted(reader.times.values())
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    out["backlog"] = {
        "events": n,
        "received": len(times),
        "complete": ok,
        "seconds": round(span, 3),
        "events_per_second": round(len(times) / span, 1),
        "load_seconds": round(time.time() - t_load, 1),
    }
    max_rate = len(times) / span
    # 2) latency at 60% and 100% of the max rate
    for frac in (0.6, 1.0):
        rate = max_rate * frac
        reader = OutputReader(settings, dst, id_of)
        reader.start()
        rid = f"{name}-live{int(frac * 100)}-{uuid.uuid4().hex[:6]}"
        before = histogram(metrics_url)
        sent = live_load(settings, src, spec, rate, live_seconds, rid)
        reader.wait_for(len(sent), timeout=60)
        reader.stop.set()
        reader.join(5)
        phase = {"rate": round(rate, 1), **latency_summary(sent, reader.times)}
        if metrics_url:
            phase["worker_histogram"] = bucket_quantiles(before, histogram(metrics_url))
        out[f"live_{int(frac * 100)}pct"] = phase
    stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--live-seconds", type=float, default=20.0)
    ap.add_argument("--out", default=str(REPO / "bench/results/e2e.json"))
    ap.add_argument("--entities", type=int, default=50_000, help="distinct entities (default 50,000)")
    args = ap.parse_args()
    global ENTITIES
    ENTITIES = args.entities
    settings = load_settings()
    tag = uuid.uuid4().hex[:6]
    spec = make_spec(f"bench{tag}")
    ensure_topics(settings, spec)
    base_src, base_dst = f"bench.{tag}.base-in", f"bench.{tag}.base-out"
    ensure_topics(settings, [base_src, base_dst], partitions=6)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "spec": "examples/loan-lr.yaml (scaler + logistic regression, 10 features)",
        "entities": ENTITIES,
    }

    # Baseline
    base = Baseline(settings, base_src, base_dst)

    def base_start() -> None:
        base.start()
        base.ready.wait(30)
        time.sleep(1)

    def base_stop() -> None:
        base.stop.set()
        base.join(15)

    def key_id(m: Any) -> str:
        return orjson.loads(m.value())["event_id"]

    print("baseline: plain confluent-kafka consume -> produce ...", flush=True)
    results["baseline"] = measure(
        "baseline",
        settings,
        spec,
        base_src,
        base_dst,
        base_start,
        base_stop,
        key_id,
        args.events,
        args.live_seconds,
    )
    print(json.dumps(results["baseline"], indent=1), flush=True)

    # Weir
    spec_path = REPO / ".weir" / f"bench-{tag}.yaml"
    spec_path.parent.mkdir(exist_ok=True)
    d = yaml.safe_load((REPO / "examples/loan-lr.yaml").read_text())
    d["name"] = spec.name
    d["topics"] = {"partitions": 6}
    spec_path.write_text(yaml.safe_dump(d))
    log = open(REPO / ".weir" / f"bench-{tag}-worker.log", "wb")  # noqa: SIM115 - lives with the worker
    holder: dict[str, Any] = {}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]

    def weir_start() -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weir.cli",
                "worker",
                str(spec_path),
                "--role",
                "all",
                "--metrics-port",
                str(metrics_port),
                "--",
                "--without-web",
                "-l",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        holder["proc"] = proc
        # warm-up: wait until the worker answers a first event
        r = OutputReader(settings, spec.topics.predictions, key_id)
        r.start()
        live_load(settings, spec.topics.events, spec, 50, 1, f"warm-{tag}")
        if not r.wait_for(50, 90):
            raise SystemExit(f"the Weir worker did not answer; see {log.name}")
        r.stop.set()

    def weir_stop() -> None:
        proc = holder["proc"]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

    print("weir: worker --role all on examples/loan-lr.yaml ...", flush=True)
    results["weir"] = measure(
        "weir",
        settings,
        spec,
        spec.topics.events,
        spec.topics.predictions,
        weir_start,
        weir_stop,
        key_id,
        args.events,
        args.live_seconds,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    print(json.dumps(results["weir"], indent=1), flush=True)
    b, w = (
        results["baseline"]["backlog"]["events_per_second"],
        results["weir"]["backlog"]["events_per_second"],
    )
    results["weir_vs_baseline_throughput"] = round(w / b, 3)
    results["targets"] = {
        "events_per_second>=3000": w >= 3000,
        "p99_at_60pct<100ms": (results["weir"]["live_60pct"]["p99_ms"] or 1e9) < 100,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nsaved {args.out}")
    print(
        f"throughput  baseline {b:,.0f} ev/s   weir {w:,.0f} ev/s   "
        f"({results['weir_vs_baseline_throughput']:.0%})"
    )
    for k in ("live_60pct", "live_100pct"):
        bb, ww = results["baseline"][k], results["weir"][k]
        print(
            f"{k:12s} baseline p50/p95/p99 {bb['p50_ms']}/{bb['p95_ms']}/{bb['p99_ms']} ms   "
            f"weir {ww['p50_ms']}/{ww['p95_ms']}/{ww['p99_ms']} ms at {ww['rate']} ev/s"
        )
    print("targets:", results["targets"])
    delete_topics(settings, [base_src, base_dst, *spec.topics.names().values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
