#!/usr/bin/env python3
"""Redis time per label of the label join (``LabelJoiner.join``), and what each part costs.

The join is one script call per batch of labels: it first writes what the learner queued
(the marks of learned labels: each served record rewritten with its marker and its pending
score negated; the deletions of records whose labels are in a published snapshot), then
reads the batch's served records. Three ways of running the same stream of labels, in
alternating rounds, each on a fresh pipeline's served records:

* ``read``: the labels joined, nothing learned (the read alone);
* ``learn``: every hit marked learned, as the learner does (the read and the marks);
* ``publish``: as ``learn``, with a snapshot published after each batch (the read, the
  marks and the deletions of the records learned a batch earlier).

Each round's Redis time is ``INFO commandstats``' ``evalsha`` time over the round, per
label, so the Redis it runs on should be otherwise idle (``make up``, nothing else running).
Saves ``bench/results/join.json``; docs/performance.md ("Redis per event, live with
labels") and docs/scaling.md quote it.

Usage: python bench/join.py [--labels 40000] [--batch 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, shown  # noqa: E402
from models.join import LabelJoiner, ServedStore  # noqa: E402
from streams.admin import delete_keys  # noqa: E402
from weir.settings import load_settings  # noqa: E402
from weir.spec import PipelineSpec, parse_spec  # noqa: E402
from weir.types import Label, Prediction  # noqa: E402

MODES = ("read", "learn", "publish")


def evalsha_usec(client: Any) -> int:
    """Redis's total time in ``EVALSHA`` so far, in µs."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def served_records(client: Any, spec: PipelineSpec, n: int, rng: random.Random) -> list[str]:
    """``n`` served records of loan-lr's shape (its ten features), written as the scorer does."""
    now = time.time()
    names = [f.name for f in spec.features]
    preds = [
        Prediction(
            f"ev-{i:08d}",
            f"user-{rng.randrange(50_000)}",
            now,
            spec.model.name,
            "v1.0",
            True,
            {"0": 0.3, "1": 0.7},
            {name: rng.uniform(0, 150_000) for name in names},
            now,
        )
        for i in range(n)
    ]
    store = ServedStore(spec)
    for b in range(0, n, 2_000):
        store.write(client, preds[b : b + 2_000], now)
    return [p.event_id for p in preds]


def one_round(client: Any, base: dict[str, Any], mode: str, n: int, batch: int, seed: int) -> dict[str, Any]:
    """The join of ``n`` labels in batches of ``batch`` on a fresh pipeline, in ``mode``."""
    spec = parse_spec({**base, "name": f"bench-join-{uuid.uuid4().hex[:8]}"})
    ids = served_records(client, spec, n, random.Random(seed))
    joiner = LabelJoiner(spec, client)
    outcomes: dict[str, int] = {}
    try:
        u0, t0 = evalsha_usec(client), time.perf_counter()
        for seq, b in enumerate(range(0, n, batch), start=1):
            labels = [Label(eid, True, time.time()) for eid in ids[b : b + batch]]
            results = joiner.join(labels)
            for r in results:
                outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
            if mode != "read":
                joiner.mark_learned((r.event_id, seq) for r in results if r.outcome == "hit")
            if mode == "publish":
                joiner.published(seq)
        joiner.flush()
        wall, usec = time.perf_counter() - t0, evalsha_usec(client) - u0
    finally:
        delete_keys(client, spec.redis_prefix)
    if outcomes.get("hit", 0) != n:
        raise SystemExit(f"{mode}: expected {n} hits, got {outcomes}: is another process using the pipeline?")
    return {"mode": mode, "redis_us_per_label": usec / n, "client_us_per_label": wall * 1e6 / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=40_000, help="labels per round (default 40,000)")
    ap.add_argument("--batch", type=int, default=500, help="labels per join call (default 500)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating (default 3)")
    ap.add_argument("--spec", type=Path, default=REPO / "examples/loan-lr.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/join.json")
    args = ap.parse_args()

    client = load_settings().redis()
    spec = yaml.safe_load(args.spec.read_text())
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for mode in MODES:
            res = one_round(client, spec, mode, args.labels, args.batch, seed=r)
            rounds.append(res)
            print(
                f"round {r + 1}/{args.rounds} {mode:8} Redis {res['redis_us_per_label']:5.1f} µs/label,"
                f" client {res['client_us_per_label']:5.1f} µs/label",
                flush=True,
            )
    median = {m: statistics.median(x["redis_us_per_label"] for x in rounds if x["mode"] == m) for m in MODES}
    parts = {
        "read": median["read"],
        "marks": median["learn"] - median["read"],
        "deletions": median["publish"] - median["learn"],
    }
    print("\nRedis µs per label (medians):", ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    out = {
        "spec": shown(args.spec),
        "labels": args.labels,
        "batch": args.batch,
        "redis": client.info("server")["redis_version"],
        "machine": machine(),
        "median_redis_us_per_label": {m: round(v, 2) for m, v in median.items()},
        "parts_redis_us_per_label": {k: round(v, 2) for k, v in parts.items()},
        "rounds": [{k: round(v, 2) if isinstance(v, float) else v for k, v in x.items()} for x in rounds],
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {shown(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
