#!/usr/bin/env python3
"""A live worker's CPU and latency against the Kafka fetch wait (``WEIR_KAFKA_FETCH_MAX_WAIT_MS``).

While a stream is live a worker scores a batch per Kafka fetch, and a fetch returns after
``WEIR_KAFKA_FETCH_MAX_WAIT_MS`` unless ``WEIR_KAFKA_FETCH_MIN_BYTES`` (64 KB) came first,
which at a few thousand events a second it does not: the worker then scores about 1,000 /
wait batches a second whatever the rate, and each batch costs its fixed share (faust's
hand-off from its consumer thread, the Redis round trips, the flush). This measures that
trade-off as a user runs it: ``weir worker SPEC --role all`` fed by ``weir produce`` at a
fixed rate with each label 2 s late, for each wait and rate, in alternating rounds. Per run,
over ``--seconds`` of the steady state: the worker's CPU (cores, from /proc), events and
batches a second (its /metrics), and p50/p99 event-to-prediction from its histogram.

Saves ``bench/results/fetch_wait.json``; docs/performance.md ("Live CPU per event and the
fetch wait") quotes it. Takes about a minute per run (default 3 rates x 3 waits x 2 rounds).

Usage: python bench/fetch_wait.py [--rates 500,1000,1900] [--waits 20,35,50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    Proc,
    cleanup,
    cpu_seconds,
    machine,
    pipeline,
    scrape,
    scrape_by,
    shown,
    spawn,
    wait_until,
    weir_worker,
)
from weir.settings import load_settings  # noqa: E402

LATENCY = "weir_event_to_prediction_seconds_bucket"


def bucket_quantile(before: Mapping[str, float], after: Mapping[str, float], q: float) -> float | None:
    """The ``q`` quantile, in ms, of the observations a cumulative histogram gained between
    two scrapes (``le`` -> count): the upper bound of the first bucket holding it.

    Examples:
        >>> a = {"0.01": 5, "0.05": 8, "0.1": 9, "+Inf": 10}
        >>> b = {"0.01": 15, "0.05": 88, "0.1": 108, "+Inf": 110}
        >>> bucket_quantile(a, b, 0.5), bucket_quantile(a, b, 0.99), bucket_quantile(a, a, 0.5)
        (50.0, 100.0, None)
    """
    gained = sorted((float(le), after[le] - before.get(le, 0.0)) for le in after)
    if not gained or gained[-1][1] <= 0:
        return None
    total = gained[-1][1]
    for le, count in gained:
        if count >= q * total:
            return le * 1000
    return None


def sample(worker: Proc) -> tuple[float, float, float, dict[str, float]]:
    """The worker's CPU seconds, events, batches and latency histogram now."""
    url = worker.metrics_url
    events, batches = scrape(url, "weir_events_total"), scrape(url, "weir_batch_size_events_count")
    if events is None or batches is None or not worker.alive():
        raise SystemExit(f"the worker stopped answering /metrics:\n{worker.tail()}")
    return cpu_seconds(worker.pid), events, batches, scrape_by(url, LATENCY, "le")


def one_run(base: dict[str, Any], rate: int, wait_ms: int, warm: float, seconds: float) -> dict[str, Any]:
    settings = load_settings()
    spec, path = pipeline(base, f"fw-{uuid.uuid4().hex[:8]}")
    env = {"WEIR_KAFKA_FETCH_MAX_WAIT_MS": str(wait_ms)}
    worker = weir_worker(path, "all", f"{spec.name}-worker", env=env)
    producer = None
    try:
        if not wait_until(lambda: scrape(worker.metrics_url, "weir_events_total") is not None, 60):
            raise SystemExit(f"the worker did not serve /metrics within 60 s:\n{worker.tail()}")
        time.sleep(8)  # joined its group; then its CPU at rest
        c0 = cpu_seconds(worker.pid)
        time.sleep(5)
        idle = (cpu_seconds(worker.pid) - c0) / 5
        producer = spawn(
            f"{spec.name}-produce",
            [
                *(sys.executable, "-m", "weir.cli", "produce", str(path), "river:synth.Agrawal?seed=3"),
                *("--rate", str(rate), "--limit", str(int(rate * (warm + seconds + 30)))),
                *("--label-delay", "2", "--entities", "50000", "--no-progress"),
            ],
        )
        time.sleep(warm)
        c0, e0, b0, h0 = sample(worker)
        time.sleep(seconds)
        c1, e1, b1, h1 = sample(worker)
        events, batches = (e1 - e0) / seconds, (b1 - b0) / seconds
        cores = (c1 - c0) / seconds
        return {
            "rate": rate,
            "wait_ms": wait_ms,
            "idle_cores": round(idle, 3),
            "cores": round(cores, 3),
            "events_per_second": round(events, 1),
            "batches_per_second": round(batches, 1),
            "cpu_us_per_event": round(cores / events * 1e6, 1) if events else None,
            "events_per_batch": round(events / batches, 1) if batches else None,
            "p50_ms": bucket_quantile(h0, h1, 0.5),
            "p99_ms": bucket_quantile(h0, h1, 0.99),
        }
    finally:
        if producer is not None:
            producer.stop()
        worker.stop()
        cleanup(settings, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="500,1000,1900", help="events/s, comma-separated")
    ap.add_argument("--waits", default="20,35,50", help="fetch waits in ms, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm", type=float, default=15.0, help="seconds of the stream before measuring")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds measured per run")
    ap.add_argument("--spec", type=Path, default=REPO / "examples/loan-lr.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/fetch_wait.json")
    args = ap.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    waits = [int(x) for x in args.waits.split(",")]
    base = yaml.safe_load(args.spec.read_text())

    runs: list[dict[str, Any]] = []
    total = args.rounds * len(rates) * len(waits)
    for r in range(args.rounds):
        for rate in rates:
            for wait in waits:
                res = one_run(base, rate, wait, args.warm, args.seconds)
                runs.append(res)
                print(
                    f"[{len(runs)}/{total}] round {r + 1} {rate}/s wait {wait} ms: {res['cores']:.3f} cores"
                    f" ({res['cpu_us_per_event']} µs/event, idle {res['idle_cores']:.3f}),"
                    f" {res['batches_per_second']} batches/s of {res['events_per_batch']},"
                    f" p50/p99 {res['p50_ms']}/{res['p99_ms']} ms",
                    flush=True,
                )
    head = ("rate", "wait ms", "cores", "µs/event", "batches/s", "p50 ms", "p99 ms")
    print("\n" + " ".join(f"{h:>9}" for h in head) + "  (medians)")
    summary = []
    for rate in rates:
        for wait in waits:
            mine = [x for x in runs if x["rate"] == rate and x["wait_ms"] == wait]

            def med(key: str, rows: list[dict[str, Any]] = mine) -> float | None:
                vals = [x[key] for x in rows if x[key] is not None]
                return round(statistics.median(vals), 3) if vals else None

            row = {"rate": rate, "wait_ms": wait} | {
                k: med(k) for k in ("cores", "cpu_us_per_event", "batches_per_second", "p50_ms", "p99_ms")
            }
            summary.append(row)
            print(" ".join(f"{v!s:>9}" for v in row.values()))
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec": shown(args.spec),
        "role": "all",
        "label_delay_s": 2,
        "machine": machine(),
        "medians": summary,
        "runs": runs,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {shown(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
