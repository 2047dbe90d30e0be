#!/usr/bin/env python3
"""Bytes per item of a pipeline's Redis state, measured with ``MEMORY USAGE`` on real keys.

Runs issue #18's soak spec (5 raw Agrawal fields, a 10 min count and mean) through the
real feature script and served-record writes, then learns every other label, and measures
(``MEMORY USAGE key SAMPLES 0``: exact, every element):

* per window member (``win`` ZSETs over their members), per entity (``meta`` hash, with
  the mean's time tiles, 48 B each, and the ZSET's own overhead), per recent id
  (``recent`` hash over its fields), the applied offsets hash, per served record, per pending entry;
* for comparison, the keys this replaced: an ``fv:{event_id}`` string and a
  ``learned:{event_id}`` marker, written with their old layout.

Saves ``bench/results/redis_bytes.json``; docs/performance.md ("Redis memory") quotes it.

Usage: python bench/redis_bytes.py [--events 20000] [--entities 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.online import RedisFeatureStore  # noqa: E402
from models.join import Keys, LabelJoiner, ServedStore  # noqa: E402
from weir.settings import load_settings  # noqa: E402
from weir.spec import parse_spec  # noqa: E402
from weir.types import Event, Label, Prediction  # noqa: E402

FIELDS = ("salary", "commission", "age", "hvalue", "loan")


def usage(client: Any, pattern: str) -> tuple[int, int]:
    """(keys, bytes) of the keys matching ``pattern``."""
    keys = list(client.scan_iter(match=pattern, count=5000))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    return len(keys), sum(int(b or 0) for b in pipe.execute())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--entities", type=int, default=2_000)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/redis_bytes.json")
    args = ap.parse_args()

    name = f"bytes-{uuid.uuid4().hex[:8]}"
    spec = parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {f: "numeric" for f in FIELDS},
            "features": [
                *({"agg": "raw", "field": f} for f in FIELDS),
                {"agg": "count", "window": "10m"},
                {"agg": "mean", "field": "loan", "window": "10m"},
            ],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
            "labels": {"horizon": "10m"},
        }
    )
    client = load_settings().redis()
    p = spec.redis_prefix
    rng = random.Random(7)
    store, served = RedisFeatureStore(spec), ServedStore(spec)
    t0 = time.time() - 300
    events = [
        Event(
            f"ev-{i:08d}",
            f"user-{rng.randrange(args.entities)}",
            t0 + i * 300 / args.events,
            {f: rng.uniform(0, 150_000) for f in FIELDS},
        )
        for i in range(args.events)
    ]
    try:
        for b in range(0, len(events), 500):
            batch = events[b : b + 500]
            res = store.compute_batch(client, batch, [("events", 0, b + i) for i in range(len(batch))])
            preds = [
                Prediction(
                    e.event_id,
                    e.entity_id,
                    e.ts,
                    "lr",
                    "v1.3",
                    False,
                    {"False": 0.7, "True": 0.3},
                    r.features or {},
                    time.time(),
                )
                for e, r in zip(batch, res, strict=True)
            ]
            pipe = client.pipeline(transaction=False)
            served.add_to_pipeline(pipe, preds)
            pipe.execute()
        joiner = LabelJoiner(spec, client)
        half = [e.event_id for e in events[::2]]
        joiner.join([Label(eid, True, time.time()) for eid in half])
        joiner.mark_learned((eid, i) for i, eid in enumerate(half))
        joiner.flush()

        n_win, win_bytes = usage(client, f"{p}:win:*")
        members = sum(client.zcard(k) for k in client.scan_iter(match=f"{p}:win:*", count=5000))
        n_meta, meta_bytes = usage(client, f"{p}:meta:*")
        # The mean's time tiles (features/lua.py): 48 B records in the meta hash's 't1'.
        pipe = client.pipeline(transaction=False)
        for k in client.scan_iter(match=f"{p}:meta:*", count=5000):
            pipe.hstrlen(k, "t1")
        tiles = sum(pipe.execute()) / 48
        n_recent, recent_bytes = usage(client, f"{p}:recent:*")
        recent_ids = sum(client.hlen(k) for k in client.scan_iter(match=f"{p}:recent:*"))
        _, applied_bytes = usage(client, f"{p}:applied")
        n_served, served_bytes = usage(client, f"{p}:served:*")
        keys = Keys(spec)
        pending_n = client.zcard(keys.pending)
        pending_bytes = int(client.memory_usage(keys.pending, samples=0) or 0)
        # The replaced layouts, for comparison: one fv string and one marker per event.
        feats = "|".join(f"{rng.uniform(0, 150_000)!r}" for _ in range(7))
        pipe = client.pipeline(transaction=False)
        for e in events[:2000]:
            pipe.set(f"{p}:fv:{e.event_id}", feats, ex=3600)
            pipe.set(f"{p}:learned:{e.event_id}", f"{uuid.uuid4().hex[:12]}:123456", px=600_000)
        pipe.execute()
        n_fv, fv_bytes = usage(client, f"{p}:fv:*")
        n_marker, marker_bytes = usage(client, f"{p}:learned:*")
        out = {
            "spec": "issue #18 soak spec: 5 raw numeric, count 10m, mean 10m; horizon 10m",
            "events": args.events,
            "entities": n_meta,
            "redis": client.info("server")["redis_version"],
            "window_member_bytes": round(win_bytes / members, 1),
            "window_zset_per_entity_bytes": round(win_bytes / n_win, 1),
            "meta_per_entity_bytes": round(meta_bytes / n_meta, 1),
            "tiles_per_entity": round(tiles / n_meta, 1),
            "window_members_per_entity": round(members / n_win, 1),
            "recent_per_event_bytes": round(recent_bytes / recent_ids, 1),
            "recent_keys": n_recent,
            "applied_hash_bytes": applied_bytes,
            "served_record_bytes": round(served_bytes / n_served, 1),
            "served_records": n_served,
            "pending_member_bytes": round(pending_bytes / pending_n, 1),
            "old_fv_key_bytes": round(fv_bytes / n_fv, 1),
            "old_learned_marker_bytes": round(marker_bytes / n_marker, 1),
        }
    finally:
        for k in client.scan_iter(match=f"{p}:*", count=5000):
            client.unlink(k)
    print(json.dumps(out, indent=2))
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
