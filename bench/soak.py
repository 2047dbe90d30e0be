#!/usr/bin/env python3
"""Soak benchmark (issue #18): Weir's memory and lag over time at a steady rate with labels.

For each role setup (``all``: one ``weir worker SPEC --role all``; ``split``: one
``--role scorer`` and one ``--role learner``), on a fresh pipeline:

1. the worker processes start and answer a short warm-up;
2. ``weir produce``'s own code (:func:`streams.produce.produce`) replays Agrawal rows at
   ``--rate`` events/s for ``--duration`` seconds, each label ``--label-delay`` s after
   its event;
3. every ``--interval`` seconds a sample is taken: RSS of each Weir process (VmRSS, with
   its children), Redis ``used_memory`` (the whole server: other pipelines count too) and
   ``DBSIZE``, the pipeline's keys (SCAN of its prefix, counted by kind) and their bytes
   (``MEMORY USAGE`` of a sample of them times the count), and the consumer lag of the
   events (the worker group's committed offsets) and of the labels (labels written -
   labels the learner read, from its /metrics).

Reported per setup (fitted over the second half of the run, after the warm-up of the
windows and of the processes):

* ``redis_bytes_per_rate``: the steady-state Redis bytes of the pipeline per event/s of
  rate. Measured (the level of the last fifth of the run) when the run outlasts 1.2 label
  horizons and its last 40% is flat (grows by under a tenth of its level per horizon);
  otherwise projected: growth per second x retention / rate, where retention is the
  longer of ``labels.horizon`` and ``scoring.dedupe_horizon`` (how long per-event
  records are kept today) - both the projection and the bytes per event are saved;
* ``rss_slope_mb_per_min`` of each process and ``lag_slope_per_min`` of events and labels:
  flat (about 0) is the target over 30 minutes.

Saves ``bench/results/soak.json`` and ``bench/results/soak.png`` (``--out``/``--plot``).
The default spec is issue #18's: Agrawal fields, 5 raw features, a 10 min count and a
10 min mean, label horizon 10 min, defaults otherwise.

Usage: python bench/soak.py [--rate 500] [--duration 600] [--roles all,split] [--interval 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    LabelDelay,
    OutputReader,
    Proc,
    cleanup,
    high_watermarks,
    lag,
    live_send,
    machine,
    make_topics,
    pipeline,
    records,
    rss_bytes,
    scrape,
    wait_until,
    weir_worker,
)

from weir.settings import Settings, load_settings
from weir.spec import PipelineSpec

#: Issue #18's pipeline: what a new user would try first.
SOAK_SPEC: dict[str, Any] = {
    "name": "soak",
    "task": "binary",
    "entity_field": "entity_id",
    "fields": {f: "numeric" for f in ("salary", "commission", "age", "hvalue", "loan")},
    "features": [
        *({"agg": "raw", "field": f} for f in ("salary", "commission", "age", "hvalue", "loan")),
        {"agg": "count", "window": "10m"},
        {"agg": "mean", "field": "loan", "window": "10m"},
    ],
    "classes": ["0", "1"],
    "model": {"steps": ["river.preprocessing.StandardScaler", "river.linear_model.LogisticRegression"]},
    "labels": {"horizon": "10m"},
}

SOURCE = "river:synth.Agrawal?seed=7"


def start(role: str, path: Path, tag: str) -> tuple[list[Proc], Proc]:
    """The setup's processes, and the one whose /metrics counts the labels read."""
    if role == "split":
        learner = weir_worker(path, "learner", f"{tag}-learner")
        scorer = weir_worker(path, "scorer", f"{tag}-scorer")
        return [scorer, learner], learner
    proc = weir_worker(path, "all", f"{tag}-all")
    return [proc], proc


def redis_sample(client: Any, prefix: str, memory_sample: int) -> dict[str, Any]:
    """Server memory, and the pipeline's keys and bytes by kind: one full pass of the
    learner's own footprint walk (weir/footprint.py: every key of a small kind measured, so
    the few large hashes and sorted sets are not missed; one in ``memory_sample`` of a
    large kind)."""
    from weir.footprint import RedisFootprint

    info = client.info("memory")
    walk = RedisFootprint(prefix, "soak", sample_every=memory_sample)
    while not walk.step(client):
        pass
    return {
        "used_memory": int(info["used_memory"]),
        "dbsize": int(client.dbsize()),
        "keys": sum(n for n, _ in walk.last.values()),
        "keys_by_kind": {k: n for k, (n, _) in walk.last.items()},
        "bytes_by_kind": {k: b for k, (_, b) in walk.last.items()},
        "bytes_estimate": sum(b for _, b in walk.last.values()),
    }


def slope(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope of ys over xs (None values skipped), per unit of x."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    if len(pts) < 3:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def analyse(
    spec: PipelineSpec, samples: list[dict[str, Any]], rate: float, duration: float
) -> dict[str, Any]:
    # The second half of the producing time: past the warm-up, before the stream stops.
    half = [s for s in samples if duration / 2 <= s["t"] <= duration]
    t = [s["t"] for s in half]
    out: dict[str, Any] = {}
    growth = slope(t, [s["redis"]["bytes_estimate"] for s in half])
    used_growth = slope(t, [s["redis"]["used_memory"] for s in half])
    horizon = spec.labels.horizon
    retention = max(horizon, spec.scoring.dedupe_horizon)
    # A plateau: the run outlasts the horizon and the last 40% of it no longer grows by
    # more than a tenth of its level per horizon (records kept longer, e.g. for the
    # dedupe horizon, keep it growing).
    late = [s for s in half if s["t"] >= 0.6 * duration]
    tail = late[-max(1, len(late) // 2) :] if late else []
    level = sum(s["redis"]["bytes_estimate"] for s in tail) / len(tail) if tail else 0.0
    late_growth = slope([s["t"] for s in late], [s["redis"]["bytes_estimate"] for s in late])
    long_enough = duration >= 1.2 * horizon and len(late) >= 3
    flat = late_growth is not None and late_growth * horizon <= 0.1 * max(level, 1.0)
    measured = long_enough and flat
    out["redis_steady_state_measured"] = measured
    out["redis_level_bytes"] = int(level)
    if long_enough and not flat:
        out["redis_still_growing_after_horizon"] = True
    if measured:
        out["redis_bytes_per_rate"] = round(level / rate, 1)
    if growth is not None:
        out["redis_growth_bytes_per_s"] = round(growth, 1)
        out["redis_bytes_per_event"] = round(growth / rate, 1)
        if not measured:
            out["redis_bytes_per_rate"] = round(growth * retention / rate, 1)
            out["redis_projected_plateau_bytes"] = int(growth * retention)
            out["projection_retention_seconds"] = retention
    if used_growth is not None:
        out["used_memory_growth_bytes_per_s"] = round(used_growth, 1)
    keys_growth = slope(t, [s["redis"]["keys"] for s in half])
    if keys_growth is not None:
        out["keys_per_event"] = round(keys_growth / rate, 3)
    out["final_keys_by_kind"] = samples[-1]["redis"]["keys_by_kind"] if samples else {}
    out["rss_slope_mb_per_min"] = {
        name: _per_min(slope(t, [s["rss"].get(name) for s in half]), 1 / 2**20)
        for name in (samples[0]["rss"] if samples else {})
    }
    out["rss_mb_last"] = {k: round(v / 2**20, 1) for k, v in (samples[-1]["rss"] if samples else {}).items()}
    out["lag_slope_per_min"] = {
        k: _per_min(slope(t, [s["lag"].get(k) for s in half]), 1.0) for k in ("events", "labels")
    }
    out["lag_last"] = samples[-1]["lag"] if samples else {}
    return out


def _per_min(v: float | None, scale: float) -> float | None:
    return None if v is None else round(v * 60 * scale, 3)


def soak(
    role: str, settings: Settings, base: dict[str, Any], tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    import streams.produce as produce_mod

    spec, path = pipeline(base, f"soak{tag}{role}")
    make_topics(settings, spec)
    procs: list[Proc] = []
    client = settings.redis()
    try:
        baseline = int(client.info("memory")["used_memory"])
        procs, learner = start(role, path, f"{tag}-{role}")
        # warm-up: answered, so the run starts with the processes ready
        warm = records(spec, 20, run_id="warm", seed=1, entities=args.entities)
        reader = OutputReader(settings, spec.topics.predictions)
        reader.start()
        live_send(settings, spec, warm, 20.0, LabelDelay(seconds=0.5))
        ok = wait_until(lambda: reader.count() >= 20 or not all(p.alive() for p in procs), 240)
        reader.close()
        if not ok or not all(p.alive() for p in procs):
            raise RuntimeError(f"the {role} setup did not answer; logs: {[str(p.log) for p in procs]}")
        stop = threading.Event()
        summary: dict[str, Any] = {}

        def run_producer() -> None:
            try:
                summary.update(
                    produce_mod.produce(
                        spec,
                        settings,
                        SOURCE,
                        rate=args.rate,
                        limit=int(args.rate * args.duration),
                        label_delay=args.label_delay,
                        entities=args.entities,
                        progress=False,
                        stop=stop,
                        run_id="soak",
                    )
                )
            except Exception as exc:
                summary["error"] = f"{type(exc).__name__}: {exc}"

        prod = threading.Thread(target=run_producer, daemon=True)
        t0 = time.time()
        prod.start()
        samples: list[dict[str, Any]] = []
        while True:
            now = time.time() - t0
            labels_read = scrape(learner.metrics_url, "weir_labels_total")
            labels_written = high_watermarks(settings, spec.topics.labels)
            sample: dict[str, Any] = {
                "t": round(now, 1),
                "rss": {p.name.removeprefix(f"{tag}-{role}-"): rss_bytes(p.pid) for p in procs},
                "redis": redis_sample(client, spec.redis_prefix, args.memory_sample),
                "lag": {
                    "events": lag(settings, spec.consumer_group, spec.topics.events),
                    "labels": (
                        None
                        if labels_read is None or labels_written is None
                        else max(0, int(labels_written - labels_read))
                    ),
                },
                "learned": scrape(learner.metrics_url, "weir_labels_learned_total"),
            }
            sample["redis"]["used_memory_delta"] = sample["redis"]["used_memory"] - baseline
            samples.append(sample)
            r, lg = sample["redis"], sample["lag"]
            print(
                f"  t={now:6.0f}s rss {[round(v / 2**20) for v in sample['rss'].values()]} MB  "
                f"keys {r['keys']:,} ~{r['bytes_estimate'] / 2**20:.1f} MB  "
                f"used_memory {r['used_memory'] / 2**20:.0f} MB  lag ev {lg['events']} lab {lg['labels']}",
                flush=True,
            )
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited ({p.popen.returncode}); log {p.log}:\n{p.tail()}")
            if not prod.is_alive() and now >= args.duration:
                break
            if now >= args.duration + 60:  # the producer fell behind: stop it, report what ran
                stop.set()
            time.sleep(max(0.0, args.interval - (time.time() - t0 - now)))
        prod.join(30)
        return {
            "role": role,
            "spec": spec.model_dump(mode="json", exclude={"name"}),
            "rate": args.rate,
            "duration": args.duration,
            "label_delay": args.label_delay,
            "entities": args.entities,
            "producer": summary,
            "figures": analyse(spec, samples, args.rate, args.duration),
            "samples": samples,
        }
    finally:
        for p in procs:
            p.stop()
        client.close()
        if not args.keep:
            cleanup(settings, spec)
        path.unlink(missing_ok=True)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for role, res in results["runs"].items():
        s = res.get("samples") or []
        if not s:
            continue
        t = [x["t"] / 60 for x in s]
        for name in s[0]["rss"]:
            ax[0][0].plot(t, [x["rss"].get(name, 0) / 2**20 for x in s], label=f"{role}: {name}")
        ax[0][1].plot(t, [x["redis"]["bytes_estimate"] / 2**20 for x in s], label=f"{role}: pipeline keys")
        ax[0][1].plot(
            t, [x["redis"]["used_memory_delta"] / 2**20 for x in s], "--", label=f"{role}: used_memory delta"
        )
        ax[1][0].plot(t, [x["redis"]["keys"] for x in s], label=f"{role}")
        for k in ("events", "labels"):
            ax[1][1].plot(t, [x["lag"].get(k) or 0 for x in s], label=f"{role}: {k}")
    for a, title in zip(
        ax.flat,
        ("worker RSS (MB)", "Redis (MB)", "pipeline keys in Redis", "consumer lag (messages)"),
        strict=True,
    ):
        a.set_title(title)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    for a in ax[1]:
        a.set_xlabel("minutes")
    fig.suptitle(
        f"weir soak: {results['rate']:g} events/s, labels {results['label_delay']:g} s late, "
        f"{results['duration']:g} s per setup ({results['when']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="events/s (default 500)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds per setup (default 600)")
    ap.add_argument("--label-delay", type=float, default=2.0, help="seconds from event to label (default 2)")
    ap.add_argument("--roles", default="all,split", help="setups to run: all, split (default both)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--entities", type=int, default=1000, help="distinct entities (default 1,000)")
    ap.add_argument(
        "--memory-sample",
        type=int,
        default=50,
        help="MEMORY USAGE of the first N keys of each kind, then of one key in N",
    )
    ap.add_argument("--spec", default=None, help="pipeline YAML (default: issue #18's spec)")
    ap.add_argument("--keep", action="store_true", help="keep the topics and keys after the run")
    ap.add_argument("--out", default=str(REPO / "bench/results/soak.json"))
    ap.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    args = ap.parse_args()
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if not roles or set(roles) - {"all", "split"}:
        raise SystemExit(f"--roles must list all and/or split, got {args.roles!r}")
    if args.rate <= 0 or args.duration <= 0 or args.interval <= 0:
        raise SystemExit("--rate, --duration and --interval must be > 0")
    import yaml

    base = yaml.safe_load(Path(args.spec).read_text()) if args.spec else SOAK_SPEC
    settings = load_settings()
    tag = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rate": args.rate,
        "duration": args.duration,
        "label_delay": args.label_delay,
        "runs": {},
    }
    print(
        f"soak {tag}: {args.rate:g} ev/s for {args.duration:g} s per setup ({', '.join(roles)})", flush=True
    )
    for role in roles:
        print(f"- role {role}", flush=True)
        try:
            results["runs"][role] = soak(role, settings, base, tag, args)
        except Exception as exc:
            results["runs"][role] = {"role": role, "error": f"{type(exc).__name__}: {exc}"}
            print(f"  failed: {results['runs'][role]['error']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(results, png)
    print()
    for role, res in results["runs"].items():
        f = res.get("figures")
        if not f:
            print(f"{role}: {res.get('error')}")
            continue
        how = "measured" if f["redis_steady_state_measured"] else "projected"
        print(
            f"{role}: Redis {f.get('redis_bytes_per_rate')} bytes per event/s of rate ({how}), "
            f"{f.get('redis_bytes_per_event')} bytes/event kept, {f.get('keys_per_event')} keys/event; "
            f"RSS slope {f['rss_slope_mb_per_min']} MB/min; lag slope {f['lag_slope_per_min']} /min"
        )
    print(f"saved {out} and {png}")
    if tempfile.gettempdir() in str(out):
        print("(a temporary output: a smoke run, not a result)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
