#!/usr/bin/env python3
"""Windowed aggregates of hot entities: the tiled feature script beside the previous one.

Issue #12 point 4. The spec: ``amount`` raw, its mean, std and max over 1 h, the event
count over 1 h and ``since_prev`` over 1 d (lateness 30 s). Two streams at ``--rate``
events/s of event time (default 2,500), 10 % of events up to 20 s out of order:

* ``uniform``: ``--entities`` (default 1,000) equally busy: 2.5 events/s each, ~9,000
  events per entity in its 1 h window;
* ``skewed``: ``--hot`` (default 10) entities take ``--hot-share`` (default 20 %) of the
  stream (50 events/s each, ~180,000 in the window), the rest share the remainder.

Each stream starts in steady state: one hour (plus the lateness) of its events is written
straight into the keys the script keeps (window ZSET, meta hash with the tiles), as the
script itself would have left them (``prefill``, checked against the script on a small
stream first). Then, per stream:

* ``tiles`` (the current engine): batches of ``--batch`` events paced at ``--rate`` for
  ``--seconds``; per call latency (p50, p99, max) and the rate kept;
* ``events`` (the previous engine, ``build_script(spec, tiles=False)``: every event of the
  window walked per event), on the events that follow, ``--baseline-batches`` batches as
  fast as it goes (it cannot keep the rate).

Before that, both engines run one small messy stream on separate prefixes and must agree
to 1e-9 (``parity`` in the JSON). Everything runs on a private ``redis-server`` on a free
port (the shared one is not loaded with ~1 GB of window members), stopped at the end.

Prints and saves ``bench/results/hot_entities.json``. Usage:
    python bench/hot_entities.py [--entities 1000] [--rate 2500] [--seconds 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features import lua  # noqa: E402
from features.base import FeatureResult  # noqa: E402
from features.lua import _tile_layout, build_script, tile_slots  # noqa: E402
from features.offline import isclose  # noqa: E402
from features.online import RedisFeatureStore  # noqa: E402
from weir.spec import PipelineSpec, parse_spec  # noqa: E402
from weir.types import Event  # noqa: E402

WINDOW = 3600.0
LATENESS = 30.0


def make_spec(name: str) -> PipelineSpec:
    return parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {"amount": "numeric"},
            "features": [
                {"agg": "raw", "field": "amount"},
                {"agg": "mean", "field": "amount", "window": "1h"},
                {"agg": "std", "field": "amount", "window": "1h"},
                {"agg": "max", "field": "amount", "window": "1h"},
                {"agg": "count", "window": "1h"},
                {"agg": "since_prev", "window": "1d"},
            ],
            "lateness": LATENESS,
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(tmp: str) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=120)
    for _ in range(100):
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"private redis-server on port {port} did not start")


def tile_of(t: float, width: float) -> int:
    """The script's tile_of (features/lua.py), same float operations."""
    i = math.floor(t / width)
    if i * width > t:
        i -= 1
    elif (i + 1) * width <= t:
        i += 1
    return i


def entity_rates(kind: str, args: argparse.Namespace) -> np.ndarray:
    n = args.entities
    if kind == "uniform":
        return np.full(n, args.rate / n)
    hot = args.hot
    rates = np.full(n, args.rate * (1 - args.hot_share) / (n - hot))
    rates[:hot] = args.rate * args.hot_share / hot
    return rates


def prefill(client: redis.Redis, spec: PipelineSpec, rates: np.ndarray, t_start: float, seed: int) -> int:
    """Writes one window (+ lateness) of events per entity as the script leaves them."""
    ((w, fields),) = _tile_layout(spec)
    assert w == WINDOW and [f for f, _ in fields] == ["amount"]
    width, slots = w / lua.TILES, tile_slots(spec, w)
    rng = np.random.default_rng(seed)
    span = WINDOW + LATENESS
    keys = RedisFeatureStore(spec)  # the engine's key names (bucket prefixes included)
    total = 0
    pipe = client.pipeline(transaction=False)
    for e, r in enumerate(rates):
        n = rng.poisson(r * span)
        ts = np.sort(t_start - rng.uniform(0, span, n))
        amounts = rng.integers(1, 150_000, n).astype(float)
        items = [
            (f"{k + 1:012d}|{a!r}", t)
            for k, (t, a) in enumerate(zip(ts.tolist(), amounts.tolist(), strict=True))
        ]
        for chunk in range(0, n, 5000):
            pipe.zadd(keys.window_key(f"u{e}"), dict(items[chunk : chunk + 5000]))
        tiles: dict[int, list[float]] = {}
        for t, x in zip(ts.tolist(), amounts.tolist(), strict=True):
            i = tile_of(t, width)
            s = tiles.setdefault(i, [0.0, 0.0, 0.0, math.inf, -math.inf])
            if s[0] == 0:
                s[1], s[2] = x, 0.0
            else:
                mo = s[1] / s[0]
                s[1] += x
                s[2] += (x - mo) * (x - s[1] / (s[0] + 1))
            s[0] += 1
            s[3], s[4] = min(s[3], x), max(s[4], x)
        meta: dict[
            bytes | bytearray | memoryview | str | int | float,
            bytes | bytearray | memoryview | str | int | float,
        ] = {"wm": repr(float(ts[-1])), "seq": str(n), "p1": repr(float(ts[-1]))}  # p1: newest amount
        top = max(tiles)
        packed = b"".join(struct.pack("<dddddd", i, *s) for i, s in sorted(tiles.items()) if i > top - slots)
        meta["t1"] = packed
        pipe.hset(keys.meta_key(f"u{e}"), mapping=meta)
        total += n
        if e % 20 == 19:
            pipe.execute()
    pipe.execute()
    return total


def stream(rates: np.ndarray, t_start: float, n: int, rate: float, seed: int) -> list[Event]:
    rng = random.Random(seed)
    p = (rates / rates.sum()).tolist()
    ents = rng.choices(range(len(rates)), weights=p, k=n)
    out = []
    for k in range(n):
        ts = t_start + (k + 1) / rate - (rng.uniform(0, 20) if rng.random() < 0.1 else 0.0)
        out.append(Event(f"x{seed}-{k}", f"u{ents[k]}", ts, {"amount": float(rng.randint(1, 150_000))}))
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def run(
    store: RedisFeatureStore, client: redis.Redis, events: list[Event], batch: int, rate: float | None
) -> dict[str, Any]:
    lat: list[float] = []
    t0 = time.perf_counter()
    for k, b in enumerate(range(0, len(events), batch)):
        if rate is not None:
            due = t0 + k * batch / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
        t = time.perf_counter()
        res = store.compute_batch(client, events[b : b + batch])
        lat.append((time.perf_counter() - t) * 1000)
        assert all(r.status in ("ok", "late") for r in res)
    wall = time.perf_counter() - t0
    return {
        "events": len(events),
        "batches": len(lat),
        "batch_ms_p50": round(pct(lat, 50), 2),
        "batch_ms_p99": round(pct(lat, 99), 2),
        "batch_ms_max": round(max(lat), 2),
        "us_per_event_mean": round(sum(lat) * 1000 / len(events), 1),
        "events_per_second_kept": round(len(events) / wall),
        "events_per_second_engine": round(len(events) / (sum(lat) / 1000)),
    }


def legacy(spec: PipelineSpec) -> RedisFeatureStore:
    store = RedisFeatureStore(spec)
    store.script = build_script(spec, tiles=False)
    store.sha = hashlib.sha1(store.script.encode()).hexdigest()
    return store


def parity(client: redis.Redis) -> dict[str, Any]:
    """Both engines on one messy stream (separate prefixes): same statuses, values to 1e-9."""
    rng = random.Random(3)
    events, t = [], 1_700_000_000.0
    for k in range(5_000):
        t += rng.expovariate(2.0)
        ts = t - (rng.uniform(0, 45) if rng.random() < 0.1 else 0.0)  # some late (lateness 30 s)
        eid = f"p{k}" if rng.random() > 0.02 or k == 0 else f"p{k - 1}"
        events.append(
            Event(eid, f"u{min(int(rng.paretovariate(1.2)), 30)}", ts, {"amount": rng.gauss(1e4, 50)})
        )
    out: dict[str, list[FeatureResult]] = {}
    for name, store in (
        ("tiles", RedisFeatureStore(make_spec("hotpar-t"))),
        ("events", legacy(make_spec("hotpar-e"))),
    ):
        res: list[FeatureResult] = []
        for b in range(0, len(events), 500):
            res.extend(store.compute_batch(client, events[b : b + 500]))
        out[name] = res
    worst, mismatches = 0.0, 0
    for ra, rb in zip(out["tiles"], out["events"], strict=True):
        if ra.status != rb.status:
            mismatches += 1
            continue
        for key, va in (ra.features or {}).items():
            vb = (rb.features or {})[key]
            if not isclose(va, vb):
                mismatches += 1
            elif isinstance(va, float) and isinstance(vb, float):
                worst = max(worst, abs(va - vb) / max(1.0, abs(vb)))
    statuses = {s: sum(r.status == s for r in out["tiles"]) for s in ("ok", "late", "duplicate")}
    return {"events": len(events), "statuses": statuses, "mismatches": mismatches, "worst_rel_diff": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=2500.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--hot", type=int, default=10)
    ap.add_argument("--hot-share", type=float, default=0.2)
    ap.add_argument("--baseline-batches", type=int, default=5)
    ap.add_argument("--streams", default="uniform,skewed")
    ap.add_argument("--out", default=str(REPO / "bench/results/hot_entities.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, client = start_redis(tmp)
        try:
            result: dict[str, Any] = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()[0]},
                "args": vars(args),
                "parity": parity(client),
            }
            print(json.dumps(result, indent=2), flush=True)
            for kind in args.streams.split(","):
                client.flushall()
                spec = make_spec(f"hot-{kind}")
                rates = entity_rates(kind, args)
                t_start = 1_800_000_000.0
                t = time.perf_counter()
                members = prefill(client, spec, rates, t_start, seed=7)
                filled = time.perf_counter() - t
                mem = client.info("memory")["used_memory"]
                n = int(args.rate * args.seconds)
                events = stream(rates, t_start, n + args.baseline_batches * args.batch, args.rate, seed=8)
                store = RedisFeatureStore(spec)
                tiles = run(store, client, events[:n], args.batch, args.rate)
                base = run(legacy(spec), client, events[n:], args.batch, None)
                k = np.sort(rates * WINDOW)
                sizes = [client.memory_usage(store.meta_key(f"u{e}"), samples=0) for e in range(5)]
                result[kind] = {
                    "window_events_per_entity": {
                        "median": round(float(np.median(k))),
                        "max": round(float(k[-1])),
                    },
                    "prefill": {
                        "members": members,
                        "seconds": round(filled, 1),
                        "redis_used_memory_mb": round(mem / 2**20),
                    },
                    "meta_hash_bytes_with_tiles": sizes,
                    "tiles": tiles,
                    "events_baseline": base,
                    "speedup_us_per_event": round(base["us_per_event_mean"] / tiles["us_per_event_mean"], 1),
                }
                print(json.dumps({kind: result[kind]}, indent=2), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
