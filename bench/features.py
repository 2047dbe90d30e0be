#!/usr/bin/env python3
"""Feature engines' throughput on examples/loan-lr.yaml, beside a plain Redis floor, in one run.

* baseline: one pipelined ``SET`` per event, one round trip per batch (the floor for
  "one Redis round trip per batch" on this machine);
* online: :class:`features.online.RedisFeatureStore` (Lua per event, pipelined per batch);
* offline: :func:`features.offline.compute_offline` on the same stream (pandas).

1,000 entities, ~1 s of event time per event, 10% of events up to 20 s out of order,
batches of 500. Prints and saves ``bench/results/features.json``. Needs Redis
(``make up``). Usage: python bench/features.py [--events 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.offline import compute_offline  # noqa: E402
from features.online import RedisFeatureStore  # noqa: E402
from streams.admin import delete_keys  # noqa: E402
from weir.settings import load_settings  # noqa: E402
from weir.spec import load_spec  # noqa: E402
from weir.types import Event  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--out", default=str(REPO / "bench/results/features.json"))
    args = ap.parse_args()
    n, batch = args.events, args.batch
    spec = load_spec(REPO / "examples/loan-lr.yaml")
    spec = spec.model_copy(update={"name": f"benchfeat{random.randrange(10**6)}"})
    rng = random.Random(1)
    t0 = 1_700_000_000.0
    events = []
    for i in range(n):
        ts = t0 + i - (rng.uniform(0, 20) if rng.random() < 0.1 else 0.0)
        data: dict[str, float | str | bool | None] = {f: float(rng.randint(1, 150_000)) for f in spec.fields}
        events.append(Event(f"e{i}", f"u{rng.randrange(1000)}", ts, data))
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
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "events": n,
        "batch": batch,
        "baseline_pipelined_set_events_per_second": round(floor),
        "online_events_per_second": round(online),
        "offline_rows_per_second": round(offline),
        "online_vs_baseline": round(online / floor, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
