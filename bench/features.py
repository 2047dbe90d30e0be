#!/usr/bin/env python3
"""Feature engines' throughput on examples/loan-lr.yaml, beside a plain Redis floor, in one run.

* baseline: one pipelined ``SET`` per event, one round trip per batch (the floor for
  "one Redis round trip per batch" on this machine);
* online: :class:`features.online.RedisFeatureStore` (Lua per event, pipelined per batch);
* offline: :func:`features.offline.compute_offline` on the same stream (pandas);
* scorer path, feature ages on and off (``--scorer-events``, 0 to skip): what the score
  agent does with a batch minus Kafka (:meth:`streams.scoring.Scorer.process`,
  ``encode_prediction``, ``record_served``, ``observe``), once with the feature script and
  scorer as they are and once with the script built ``freshness=False`` (no ages in the
  replies, so nothing in the records or the histogram), on two key prefixes; the rounds
  alternate which goes first, so both see the same machine load.

* feature script A/B (``--script-ab REV``, e.g. ``HEAD~1``): the script of ``features/lua.py``
  at git revision REV against the working tree's, on a private ``redis-server``, at 1,000
  and 50,000 entities (a warm-up first, so entities repeat), in paired rounds alternating
  which goes first: the Redis CPU per event (median, spread, paired difference), the
  ``redis.call``s per event by command (``INFO commandstats``), and whether both answered
  every event the same. With ``--script-ab`` only this runs (saved to
  ``bench/results/features-script-ab.json``).

1,000 entities, ~1 s of event time per event, 10% of events up to 20 s out of order,
batches of 500. Prints and saves ``bench/results/features.json``. Needs Redis
(``make up``). Usage: python bench/features.py [--events 100000] [--script-ab HEAD~1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from typing import Any  # noqa: E402

from features.lua import build_script  # noqa: E402
from features.offline import compute_offline  # noqa: E402
from features.online import RedisFeatureStore  # noqa: E402
from streams.admin import delete_keys  # noqa: E402
from weir.settings import load_settings  # noqa: E402
from weir.spec import PipelineSpec, load_spec  # noqa: E402
from weir.types import Event  # noqa: E402


class _Untrained:
    """The spec's model, never trained: the scorer's ModelSource (its predict still runs)."""

    def __init__(self, spec: PipelineSpec) -> None:
        from models.factory import build_model

        self.model = build_model(spec.model)
        self.name = spec.model.name

    def current(self) -> tuple[object, str, str]:
        return self.model, self.name, "v1"

    def refresh(self) -> bool:
        return False

    def age_seconds(self) -> float:
        return 0.0


def _redis_usec(client: Any) -> float:
    """Microseconds of CPU the Redis process used so far (``INFO cpu``, user + system).

    CPU time, not ``INFO commandstats``' usec: those are wall time inside a command, which
    on a loaded machine include the time Redis waited for a core.
    """
    cpu = client.info("cpu")
    return 1e6 * (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))


async def scorer_path(spec: PipelineSpec, events: list[Event], batch: int, rounds: int) -> dict[str, object]:
    """Microseconds per event of the scorer's batch work, feature ages on and off.

    On a private ``redis-server`` (the shared one serves other clients: its command
    statistics would mix theirs in). Per variant: wall time, this process's CPU time, and
    the Redis process's CPU time (``INFO cpu``), each per event.
    """
    import tempfile

    import redis.asyncio
    from prometheus_client import CollectorRegistry

    from bench.hot_entities import start_redis
    from models.join import ServedStore
    from streams.scoring import RawMessage, Scorer
    from weir.contracts import encode_event, encode_prediction
    from weir.metrics import WorkerMetrics

    tmp = tempfile.mkdtemp(prefix="weir-bench-fresh-")
    proc, client = start_redis(tmp)
    aredis = redis.asyncio.Redis(port=client.connection_pool.connection_kwargs["port"], socket_timeout=120)
    scorers: dict[str, Scorer] = {}
    for variant in ("on", "off"):
        vspec = spec.model_copy(update={"name": f"{spec.name}-{variant}"})
        store = RedisFeatureStore(vspec)
        if variant == "off":
            store.script = build_script(vspec, freshness=False)
            store.sha = hashlib.sha1(store.script.encode()).hexdigest()
        client.script_load(store.script)
        metrics = WorkerMetrics(CollectorRegistry()).init_series(vspec)
        scorers[variant] = Scorer(vspec, store, _Untrained(vspec), metrics, ServedStore(vspec))
    raw = [encode_event(e) for e in events]
    # per round and variant: (wall, client CPU, Redis CPU) in µs per event
    rows: dict[str, list[tuple[float, float, float]]] = {"on": [], "off": []}
    done = {"on": 0, "off": 0}
    per_round = -(-len(raw) // rounds)
    try:
        for r in range(rounds):
            chunk = range(r * per_round, min(len(raw), (r + 1) * per_round))
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for variant in order:
                scorer = scorers[variant]
                c0, r0, wall = time.process_time(), _redis_usec(client), 0.0
                for b in range(chunk.start, chunk.stop, batch):
                    now = time.time()
                    topic = scorer.spec.topics.events
                    msgs = [
                        RawMessage(v, None, topic, 0, b + i, now)
                        for i, v in enumerate(raw[b : min(b + batch, chunk.stop)])
                    ]
                    t0 = time.perf_counter()
                    out = await scorer.process(msgs, aredis)
                    for p in out.predictions:
                        encode_prediction(p)
                    await scorer.record_served(out, aredis)
                    scorer.observe(msgs, out, time.perf_counter() - t0)
                    wall += time.perf_counter() - t0
                k = len(chunk)
                done[variant] += k
                c1, r1 = time.process_time(), _redis_usec(client)
                rows[variant].append((1e6 * wall / k, 1e6 * (c1 - c0) / k, (r1 - r0) / k))
    finally:
        await aredis.aclose()
        proc.terminate()
        proc.wait(timeout=30)
    # Paired: per round, on minus off (run back to back); the median of the rounds and
    # their quartiles, so a burst of load from another process moves one round, not the figure.
    res: dict[str, object] = {"events_per_variant": done["on"], "rounds": rounds}
    for j, what in enumerate(("wall", "client_cpu", "redis_cpu")):
        on = [row[j] for row in rows["on"]]
        off = [row[j] for row in rows["off"]]
        diff = [a - b for a, b in zip(on, off, strict=True)]
        q = statistics.quantiles(diff, n=4) if len(diff) > 1 else [diff[0]] * 3
        res[f"{what}_us_per_event"] = {
            "freshness_on_median": round(statistics.median(on), 2),
            "freshness_off_median": round(statistics.median(off), 2),
            "cost_median": round(statistics.median(diff), 2),
            "cost_quartiles": [round(q[0], 2), round(q[2], 2)],
        }
    return res


def _stream(spec: PipelineSpec, n: int, entities: int, seed: int = 1) -> list[Event]:
    """n events over ``entities`` entities, ~1 s of event time apart, 10% up to 20 s late."""
    rng = random.Random(seed)
    t0 = 1_700_000_000.0
    events = []
    for i in range(n):
        ts = t0 + i - (rng.uniform(0, 20) if rng.random() < 0.1 else 0.0)
        data: dict[str, float | str | bool | None] = {f: float(rng.randint(1, 150_000)) for f in spec.fields}
        events.append(Event(f"e{i}", f"u{rng.randrange(entities)}", ts, data))
    return events


def script_ab(
    spec: PipelineSpec, ref: str, entities: int, warm: int, chunk: int, rounds: int
) -> dict[str, Any]:
    """The feature script at git revision ``ref`` ("ref") against the working tree's ("new").

    Both run the same events (with Kafka positions, as the scorer sends them) on their own
    key prefix of one private ``redis-server``; after ``warm`` events each, ``rounds``
    chunks of ``chunk`` events, each chunk run by both back to back (which goes first
    alternates). Per chunk: Redis CPU (``INFO cpu``) and the commands its scripts ran
    (``INFO commandstats``) per event.
    """
    import importlib.util
    import subprocess
    import tempfile

    from bench.hot_entities import start_redis

    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:features/lua.py"], check=True, capture_output=True, text=True
    ).stdout
    tmp = tempfile.mkdtemp(prefix="weir-bench-ab-")
    path = Path(tmp) / "ref_lua.py"
    path.write_text(source)
    mod_spec = importlib.util.spec_from_file_location("weir_bench_ref_lua", path)
    assert mod_spec is not None and mod_spec.loader is not None
    ref_lua = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(ref_lua)
    events = _stream(spec, warm + chunk * rounds, entities)
    positions = [("events", 0, i) for i in range(len(events))]
    proc, client = start_redis(tmp)
    stores: dict[str, RedisFeatureStore] = {}
    for variant, build in (("ref", ref_lua.build_script), ("new", build_script)):
        vspec = spec.model_copy(update={"name": f"{spec.name}-{variant}"})
        store = RedisFeatureStore(vspec)
        store.script = build(vspec)
        store.sha = hashlib.sha1(store.script.encode()).hexdigest()
        client.script_load(store.script)
        stores[variant] = store

    def calls() -> dict[str, int]:
        stats = client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    def run(variant: str, lo: int, hi: int) -> list[Any]:
        out: list[Any] = []
        for b in range(lo, hi, 500):
            e = min(b + 500, hi)
            out.extend(stores[variant].compute_batch(client, events[b:e], positions[b:e]))
        return out

    cpu: dict[str, list[float]] = {"ref": [], "new": []}
    per_cmd: dict[str, dict[str, int]] = {"ref": {}, "new": {}}
    differ = 0
    try:
        differ += sum(a != b for a, b in zip(run("ref", 0, warm), run("new", 0, warm), strict=True))
        for r in range(rounds):
            lo, hi = warm + r * chunk, warm + (r + 1) * chunk
            got: dict[str, list[Any]] = {}
            for variant in ("ref", "new") if r % 2 == 0 else ("new", "ref"):
                u0, k0 = _redis_usec(client), calls()
                got[variant] = run(variant, lo, hi)
                u1, k1 = _redis_usec(client), calls()
                cpu[variant].append((u1 - u0) / chunk)
                for cmd, n in k1.items():
                    if cmd not in ("info", "evalsha"):
                        per_cmd[variant][cmd] = per_cmd[variant].get(cmd, 0) + n - k0.get(cmd, 0)
            differ += sum(a != b for a, b in zip(got["ref"], got["new"], strict=True))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    n = chunk * rounds
    diff = [b - a for a, b in zip(cpu["ref"], cpu["new"], strict=True)]
    q = statistics.quantiles(diff, n=4)
    res: dict[str, Any] = {"entities": entities, "warm_up_events": warm, "rounds": rounds, "chunk": chunk}
    for variant in ("ref", "new"):
        cmds = {k: round(v / n, 2) for k, v in sorted(per_cmd[variant].items()) if v}
        res[variant] = {
            "redis_cpu_us_per_event_median": round(statistics.median(cpu[variant]), 1),
            "redis_cpu_us_per_event_min_max": [round(min(cpu[variant]), 1), round(max(cpu[variant]), 1)],
            "calls_per_event": round(sum(cmds.values()), 2),
            "calls_per_event_by_command": cmds,
        }
    res["new_minus_ref_us_per_event"] = {
        "median": round(statistics.median(diff), 1),
        "quartiles": [round(q[0], 1), round(q[2], 1)],
    }
    res["events_answered_differently"] = differ
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--scorer-events", type=int, default=20_000, help="scorer path on/off (0: skip)")
    ap.add_argument("--rounds", type=int, default=40, help="alternating rounds of the scorer path")
    ap.add_argument(
        "--script-ab",
        metavar="REV",
        help="only the A/B of the feature script: git revision REV vs the tree "
        "(saved to bench/results/features-script-ab.json)",
    )
    ap.add_argument(
        "--ab-rounds", type=int, default=16, help="paired rounds of --script-ab (4,000 events each)"
    )
    ap.add_argument("--out", help="default bench/results/features.json (features-script-ab.json)")
    args = ap.parse_args()
    n, batch = args.events, args.batch
    spec = load_spec(REPO / "examples/loan-lr.yaml")
    spec = spec.model_copy(update={"name": f"benchfeat{random.randrange(10**6)}"})
    if args.script_ab:
        out = args.out or str(REPO / "bench/results/features-script-ab.json")
        return _script_ab_only(spec, args.script_ab, args.ab_rounds, out)
    events = _stream(spec, n, 1000)
    client = load_settings().redis()
    store = RedisFeatureStore(spec)
    client.script_load(store.script)

    t = time.perf_counter()
    for b in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        for e in events[b : b + batch]:
            pipe.set(f"{spec.redis_prefix}:floor:{e.event_id}", "x", ex=60)
        pipe.execute()
    floor = n / (time.perf_counter() - t)

    t = time.perf_counter()
    for b in range(0, n, batch):
        store.compute_batch(client, events[b : b + batch])
    online = n / (time.perf_counter() - t)

    frame = pd.DataFrame(
        [{"event_id": e.event_id, "entity_id": e.entity_id, "ts": e.ts, **e.data} for e in events]
    )
    t = time.perf_counter()
    compute_offline(spec, frame)
    offline = n / (time.perf_counter() - t)

    delete_keys(client, spec.redis_prefix, chunk=10_000)
    result: dict[str, object] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "events": n,
        "batch": batch,
        "baseline_pipelined_set_events_per_second": round(floor),
        "online_events_per_second": round(online),
        "offline_rows_per_second": round(offline),
        "online_vs_baseline": round(online / floor, 3),
    }
    if args.scorer_events:
        scored = events[: args.scorer_events]
        result["scorer_path"] = asyncio.run(scorer_path(spec, scored, batch, args.rounds))
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(result, args.out or str(REPO / "bench/results/features.json"))
    return 0


def _save(result: dict[str, object], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"saved {out}")


def _script_ab_only(spec: PipelineSpec, ref: str, rounds: int, out: str) -> int:
    result: dict[str, object] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec": "examples/loan-lr.yaml",
        "ref": ref,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "runs": [
            script_ab(spec, ref, ents, warm, 4000, rounds)
            for ents, warm in ((1000, 30_000), (50_000, 100_000))
        ],
    }
    _save(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
