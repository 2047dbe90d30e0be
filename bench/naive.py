#!/usr/bin/env python3
"""The baselines of bench/e2e.py: a naive per-event loop, and the consume->produce floor.

Naive loop (what someone writes in an afternoon, issue #12): one confluent-kafka consumer
on the spec's events and labels topics; per event one Redis HINCRBY (a per-entity count),
River ``predict_proba_one`` on the event's raw fields plus that count, and a produce of the
prediction; per label, ``learn_one`` on the features kept for its event (a dict of pending
features by event_id; a label that comes before its event waits in a second dict). Offsets
are auto-committed, nothing is idempotent, nothing is batched.

Floor (``--floor``): the same consumer and producer doing no work: each event is produced
unchanged to the predictions topic, labels are read and dropped.

Both write their counters to ``--stats`` (JSON, every :data:`STATS_EVERY` seconds and at exit) and stop
on SIGTERM. Run by bench/e2e.py; by hand:

    python bench/naive.py .weir/bench/SPEC.yaml --stats /tmp/naive.json [--floor]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, Producer

from weir.settings import load_settings
from weir.spec import load_spec

#: Seconds between writes of the counters: as often as bench/e2e.py reads Weir's (a write
#: is ~20 us), so the time each system learned its last label is read alike.
STATS_EVERY = 0.1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="pipeline YAML (its topics, fields and model are used)")
    ap.add_argument("--floor", action="store_true", help="consume and produce only, no work")
    ap.add_argument("--stats", default=None, help="JSON file for the counters")
    ap.add_argument("--group", default=None, help="consumer group (default naive-<pipeline>)")
    args = ap.parse_args()

    spec = load_spec(args.spec)
    settings = load_settings()
    t = spec.topics
    stop = {"now": False}

    def on_term(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    conf = settings.confluent_config()
    group = args.group or f"{'floor' if args.floor else 'naive'}-{spec.name}"
    # The broker answers a fetch once data is there or after fetch.wait.max.ms: Weir's
    # (WEIR_KAFKA_FETCH_MAX_WAIT_MS, 20 ms) rather than librdkafka's 500 ms, with which the
    # floor, doing nothing, read p50 481 ms at 1,300 events/s.
    c = Consumer(
        {
            **conf,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "fetch.wait.max.ms": settings.kafka_fetch_max_wait_ms,
        }
    )
    p = Producer({**conf, "linger.ms": 5, "compression.type": "lz4"})
    c.subscribe([t.events, t.labels])

    stats = {"events": 0, "labels": 0, "learned": 0, "early": 0, "mode": "floor" if args.floor else "naive"}
    stats_path = Path(args.stats) if args.stats else None

    def dump() -> None:
        if stats_path is not None:
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps({**stats, "at": time.time()}))
            tmp.replace(stats_path)

    def produce(value: bytes, key: bytes | None) -> None:
        while True:
            try:
                p.produce(t.predictions, value, key)
                return
            except BufferError:
                p.poll(0.05)

    step = floor_step(t, stats, produce) if args.floor else naive_step(spec, settings, stats, produce)

    last_dump = 0.0
    while not stop["now"]:
        # Up to 500 at a time, but never waiting to fill a batch: a message is handled
        # within 5 ms of its arrival (a 0.1 s timeout added up to 100 ms of latency).
        for m in c.consume(500, 0.005):
            if m.error():
                continue
            step(m)
        p.poll(0)
        now = time.monotonic()
        if now - last_dump >= STATS_EVERY:
            dump()
            last_dump = now
    p.flush(10)
    c.close()
    dump()
    return 0


def floor_step(t: Any, stats: dict[str, Any], produce: Any) -> Any:
    events = t.events

    def step(m: Any) -> None:
        if m.topic() == events:
            produce(m.value(), m.key())
            stats["events"] += 1
        else:
            stats["labels"] += 1

    return step


def naive_step(spec: Any, settings: Any, stats: dict[str, Any], produce: Any) -> Any:
    from models.factory import build_model, coerce_label, learn, predict

    r = settings.redis()
    model = build_model(spec.model)
    task = spec.task
    fields = [n for n, f in spec.fields.items() if f.type in ("numeric", "boolean")]
    prefix = f"{spec.redis_prefix}:naive"
    events = spec.topics.events
    pending: dict[str, dict[str, Any]] = {}  # event_id -> features, until its label comes
    early: dict[str, Any] = {}  # event_id -> label that came before its event

    def step(m: Any) -> None:
        if m.topic() == events:
            ev = orjson.loads(m.value())
            data = ev["data"]
            x: dict[str, Any] = {k: float(data[k]) for k in fields if data.get(k) is not None}
            x["count"] = float(r.hincrby(f"{prefix}:{ev['entity_id']}", "count", 1))
            y, proba = predict(model, x, task)
            eid = ev["event_id"]
            produce(
                orjson.dumps({"event_id": eid, "ts": ev["ts"], "prediction": y, "proba": proba}),
                m.key(),
            )
            stats["events"] += 1
            lab = early.pop(eid, None)
            if lab is None:
                pending[eid] = x
            else:
                learn(model, x, coerce_label(lab, spec), task)
                stats["learned"] += 1
        else:
            lab = orjson.loads(m.value())
            stats["labels"] += 1
            kept = pending.pop(lab["event_id"], None)
            if kept is None:
                early[lab["event_id"]] = lab["label"]
                stats["early"] += 1
            else:
                learn(model, kept, coerce_label(lab["label"], spec), task)
                stats["learned"] += 1

    return step


if __name__ == "__main__":
    sys.exit(main())
