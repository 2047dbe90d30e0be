#!/usr/bin/env python3
"""End-to-end benchmark of what users run: events AND delayed labels, Weir beside its baselines.

One run, one stream (Agrawal rows, the same seeds for every system), one consumer of
predictions (:class:`bench.common.OutputReader`). Systems:

* ``weir-all``    ``weir worker SPEC --role all`` (one process scores and learns);
* ``weir-split``  ``--role scorer`` + ``--role learner`` (two processes);
* ``weir-score``  ``--role all`` with no labels sent: scoring only;
* ``weir-split2``, ``weir-score2`` (on request, ``--systems``): scale-out on Kafka's
  partitions, two ``--role scorer`` processes in one consumer group + ``--role learner``,
  with labels and without;
* ``floor``       (a) confluent-kafka consume -> produce, no work (bench/naive.py --floor);
* ``naive``       (b) a per-event loop: consume, one Redis HINCRBY, River predict, learn per
                  label, produce (bench/naive.py);
* ``ceiling``     (c) in-process: the spec's features (features/offline) and model, River
                  predict per event and learn per label, no Kafka or Redis.

For each (but the ceiling, which has no Kafka), in order:

1. warm-up: a few hundred events with labels, until they are answered;
2. **max sustained rate**: the processes are paused (SIGSTOP), a backlog of ``--events``
   events with their labels (each ``--backlog-label-delay`` events after its event) is
   written, the processes are resumed; rate = events / seconds from the resume until
   every event was answered and every label learned (``weir_labels_learned_total``,
   naive's counter): ``sustained_events_per_second``, the figure of the table, the ratios
   and the targets. A system that scores fast and learns late has not kept up. The rate
   of its predictions alone, outputs / (last - first output Kafka timestamp), is
   ``events_per_second`` beside it, with the learned count per poll (``learned_by_poll``);
3. **CPU**: utime + stime of the system's processes (/proc/<pid>/stat, threads and
   children included) from the resume until all outputs are out and all labels learned,
   per event, in µs; beside it, over the same window, the shared servers' (Redis, the
   Kafka broker) and the whole machine's busy CPU per event (``/proc/stat``: every
   process, this harness's reader too): on C cores no system drains faster than
   C x 1e6 / the machine's µs per event;
4. **latency at 60%** of that rate, labels flowing (``--label-delay`` after their
   event): prediction Kafka timestamp - event Kafka timestamp, p50/p99 (ms).

Prints a table with ratios and saves ``bench/results/e2e.json``. Needs the local stack
(``make up``; ``make bench`` does it). ``--quick`` is a 1-2 minute smoke run whose figures
mean nothing. Figures are only meaningful on an otherwise idle machine.

Usage: python bench/e2e.py [--events 20000] [--live-seconds 20] [--label-delay 2s]
                           [--systems weir-all,naive,...] [--quick]
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    LabelDelay,
    OutputReader,
    Proc,
    Record,
    cleanup,
    cpu_seconds,
    interleave,
    live_send,
    live_send_apart,
    machine,
    machine_busy_seconds,
    make_topics,
    pct,
    pipeline,
    preload,
    records,
    scrape,
    scrape_by,
    server_pids,
    shown,
    spawn,
    wait_until,
    weir_worker,
)

from weir.settings import load_settings
from weir.spec import PipelineSpec

#: Run order: the baselines first, so a Weir failure still leaves them measured.
SYSTEMS = ("ceiling", "floor", "naive", "weir-all", "weir-split", "weir-score", "weir-split2", "weir-score2")
#: What a run measures unless ``--systems`` says otherwise (the scale-out ones on request).
DEFAULT_SYSTEMS = SYSTEMS[:6]
TABLE_ORDER = (
    "weir-all",
    "weir-split",
    "weir-score",
    "weir-split2",
    "weir-score2",
    "floor",
    "naive",
    "ceiling",
)
WARMUP_EVENTS = 300
#: Warm-ups sent at most until every scorer of a multi-scorer system has answered some.
WARMUP_ROUNDS = 5
#: Seconds the idle processes are watched for their CPU use at rest.
IDLE_SECONDS = 3.0
#: Seconds between scrapes of the labels-learned counter while waiting for the labels (the
#: naive loops write theirs as often): the time to the last label learned is read to this.
LEARNED_POLL_SECONDS = 0.1


@dataclass
class Running:
    """A started system: its processes and how to read its labels-learned counter."""

    procs: list[Proc]
    learned: Callable[[], float | None]
    labels: bool
    joins: Callable[[], dict[str, float]] = dict
    #: seconds each side of role all waited for the other (weir_event_order_wait_seconds_total)
    waits: Callable[[], dict[str, float]] = dict


# -- starting each system -------------------------------------------------------------------


#: Split systems: how many ``--role scorer`` processes beside the one ``--role learner``.
SCORERS = {"weir-split": 1, "weir-split2": 2, "weir-score2": 2}


def start_weir(kind: str, path: Path, tag: str) -> Running:
    if kind in SCORERS:
        learner = weir_worker(path, "learner", f"{tag}-learner")
        n = SCORERS[kind]
        scorers = [weir_worker(path, "scorer", f"{tag}-scorer{i + 1 if n > 1 else ''}") for i in range(n)]
        return Running(
            [*scorers, learner],
            lambda: scrape(learner.metrics_url, "weir_labels_learned_total"),
            kind != "weir-score2",
            lambda: scrape_by(learner.metrics_url, "weir_label_joins_total", "outcome"),
        )
    proc = weir_worker(path, "all", f"{tag}-all")
    return Running(
        [proc],
        lambda: scrape(proc.metrics_url, "weir_labels_learned_total"),
        kind != "weir-score",
        lambda: scrape_by(proc.metrics_url, "weir_label_joins_total", "outcome"),
        lambda: scrape_by(proc.metrics_url, "weir_event_order_wait_seconds_total", "waiter"),
    )


def start_naive(kind: str, path: Path, tag: str) -> Running:
    stats = Path(tempfile.gettempdir()) / f"weir-bench-{tag}-{kind}.json"
    argv = [sys.executable, str(REPO / "bench/naive.py"), str(path), "--stats", str(stats)]
    if kind == "floor":
        argv.append("--floor")
    proc = spawn(f"{tag}-{kind}", argv)

    def learned() -> float | None:
        try:
            s = orjson.loads(stats.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        # The floor learns nothing: count the labels it read, so "all labels consumed" is waited for.
        return float(s["labels"] if kind == "floor" else s["learned"])

    return Running([proc], learned, True)


def check_alive(run: Running) -> None:
    for p in run.procs:
        if not p.alive():
            raise RuntimeError(f"{p.name} exited with status {p.popen.returncode}; log {p.log}:\n{p.tail()}")


# -- one system, measured -------------------------------------------------------------------


def _delta(before: dict[str, float], after: dict[str, float], fmt: Callable[[float], Any]) -> dict[str, Any]:
    """The counters that moved between two scrapes, by label value."""
    return {k: fmt(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}


def latency_summary(sent: dict[str, float], got: dict[str, float]) -> dict[str, Any]:
    answered = [(t, got[k] - t) for k, t in sent.items() if k in got]  # (sent at, latency)
    lats = [lat for _, lat in answered]
    times = sorted(sent.values())
    return {
        "sent": len(sent),
        "received": len(lats),
        "achieved_send_rate": round((len(times) - 1) / (times[-1] - times[0]), 1) if len(times) > 2 else None,
        "p50_ms": round(pct(lats, 0.5) * 1000, 1) if lats else None,  # type: ignore[operator]
        "p99_ms": round(pct(lats, 0.99) * 1000, 1) if lats else None,  # type: ignore[operator]
        "max_ms": round(max(lats) * 1000, 1) if lats else None,
        # Where the tail is: p99 of the events sent in each second of the phase (a start-up
        # stall, a periodic pause or a queue that grows read differently).
        "p99_ms_by_second": _p99_by_second(answered, times[0]) if times else [],
    }


def _p99_by_second(answered: list[tuple[float, float]], t0: float) -> list[float | None]:
    per: dict[int, list[float]] = {}
    for t, lat in answered:
        per.setdefault(int(t - t0), []).append(lat)
    last = max(per, default=-1)
    return [round(pct(per[i], 0.99) * 1000, 1) if i in per else None for i in range(last + 1)]  # type: ignore[operator]


def warm_up(
    kind: str, run: Running, reader: OutputReader, settings: Any, spec: PipelineSpec, entities: int
) -> None:
    """Warm-up events (with labels if the system learns) until they are answered; for a system
    of several scorers, again until each has answered some (its consumer group settled)."""
    scorers = [p for p in run.procs if "-scorer" in p.name] if SCORERS.get(kind, 1) > 1 else []
    for round_ in range(WARMUP_ROUNDS):
        warm = records(
            spec,
            WARMUP_EVENTS,
            run_id=f"warm{round_ or ''}",
            seed=1 + round_,
            entities=entities,
            labels=run.labels,
        )
        ids = {r.event_id for r in warm}
        live_send(settings, spec, warm, 100.0, LabelDelay(events=50))
        if not wait_until(
            lambda ids=ids: reader.count(ids) >= len(ids) or not all(p.alive() for p in run.procs), 240
        ):
            check_alive(run)
            raise RuntimeError(f"{kind}: no answer to the warm-up within 240 s; logs in {run.procs[0].log}")
        check_alive(run)
        if all((scrape(p.metrics_url, "weir_events_total") or 0) > 0 for p in scorers):
            return
    raise RuntimeError(
        f"{kind}: a scorer answered none of {WARMUP_ROUNDS} warm-ups (its group never settled)"
    )


def measure(
    kind: str, settings: Any, spec: PipelineSpec, path: Path, tag: str, args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": kind}
    starter = start_naive if kind in ("floor", "naive") else start_weir
    run = starter(kind, path, f"{tag}-{kind}")
    labels = run.labels
    spies: list[subprocess.Popen[bytes]] = []
    try:
        # 1) warm-up: started, assigned, answering (and learning)
        t0 = time.time()
        reader = OutputReader(settings, spec.topics.predictions)
        reader.start()
        warm_up(kind, run, reader, settings, spec, args.entities)
        reader.close()
        out["startup_seconds"] = round(time.time() - t0, 1)
        if args.profile:
            spies = [profile(p, Path(args.profile)) for p in run.procs]
        if labels:
            wait_until(lambda: (run.learned() or 0) >= WARMUP_EVENTS, 60)
        # What the processes burn doing nothing (timers, polls), to read the CPU per event net of it.
        i0, ti = sum(cpu_seconds(p.pid) for p in run.procs), time.time()
        time.sleep(IDLE_SECONDS)
        idle_rate = (sum(cpu_seconds(p.pid) for p in run.procs) - i0) / (time.time() - ti)

        # 2) + 3) backlog drain, CPU
        recs = records(spec, args.events, run_id="bk", seed=3, entities=args.entities, labels=labels)
        reader = OutputReader(settings, spec.topics.predictions)
        reader.start()
        learned0 = run.learned() or 0.0
        joins0, waits0 = run.joins(), run.waits()
        for p in run.procs:
            p.signal(signal.SIGSTOP)
        t_load = time.time()
        preload(settings, spec, recs, args.backlog_label_delay)
        load_s = time.time() - t_load
        cpu0 = {p.name: cpu_seconds(p.pid) for p in run.procs}
        servers = server_pids(settings)
        srv0 = {k: cpu_seconds(pid) for k, pid in servers.items()}
        busy0 = machine_busy_seconds()
        t_resume = time.time()
        for p in run.procs:
            p.signal(signal.SIGCONT)
        ids = {r.event_id for r in recs}
        complete = wait_until(lambda: reader.count(ids) >= len(ids), args.timeout, 0.1)
        t_out = time.time()
        all_learned = None
        learn_s = None
        timeline: list[tuple[float, int]] = []
        if labels:

            def learned_all() -> bool:
                n = int((run.learned() or 0) - learned0)
                timeline.append((round(time.time() - t_resume, 2), n))
                return n >= len(recs)

            # A scrape asks for the counter alone (bench.common.scrape): the whole /metrics
            # page costs the worker ~6 ms of CPU (the fine latency buckets), which at 10/s
            # was 16% of its busy samples while it resolved held labels. Polled once a second
            # instead, the last label's time was read up to a second late (issue #12).
            all_learned = wait_until(learned_all, args.timeout, LEARNED_POLL_SECONDS)
            learn_s = round(time.time() - t_resume, 2)
        cpu1 = {p.name: cpu_seconds(p.pid) for p in run.procs}
        srv1 = {k: cpu_seconds(pid) for k, pid in servers.items()}
        busy1 = machine_busy_seconds()
        window = time.time() - t_resume
        joins1, waits1 = run.joins(), run.waits()
        reader.close()
        check_alive(run)
        times = sorted(reader.times[i] for i in ids if i in reader.times)
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        rate = (len(times) - 1) / span if span and span > 0 else float("nan")
        # Done: every event answered and, with labels, every label learned.
        done_s = max(t_out - t_resume, learn_s or 0.0)
        done_rate = len(recs) / done_s if complete and all_learned is not False and done_s > 0 else None
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        out["backlog"] = {
            "events": len(recs),
            "labels": sum(1 for r in recs if r.label is not None),
            "label_delay_events": args.backlog_label_delay if labels else None,
            "received": len(times),
            "complete": complete,
            "first_to_last_seconds": round(span, 3),
            "events_per_second": round(rate, 1),
            "sustained_events_per_second": None if done_rate is None else round(done_rate, 1),
            "resume_to_last_output_seconds": round(t_out - t_resume, 2),
            "labels_learned": None if not labels else int((run.learned() or 0) - learned0),
            "all_labels_learned": all_learned,
            "resume_to_all_learned_seconds": learn_s,
            "learned_by_poll": timeline,
            "label_joins": _delta(joins0, joins1, int),
            "order_wait_seconds": _delta(waits0, waits1, lambda v: round(v, 2)),
            "load_seconds": round(load_s, 2),
        }
        out["cpu"] = {
            "seconds_by_process": {k: round(v, 2) for k, v in cpu.items()},
            "us_per_event": round(1e6 * sum(cpu.values()) / len(recs), 1),
            "idle_cpu_seconds_per_second": round(idle_rate, 4),
            "window_seconds": round(window, 2),
            "us_per_event_net_of_idle": round(1e6 * (sum(cpu.values()) - idle_rate * window) / len(recs), 1),
            "us_per_event_by_process": {k: round(1e6 * v / len(recs), 1) for k, v in cpu.items()},
            # The shared servers' work for this system's events, and the whole machine's
            # (the servers, this harness reading the predictions, anything else running):
            # on a machine of C cores no system drains faster than C x 1e6 / that figure.
            "servers_us_per_event": {k: round(1e6 * (srv1[k] - srv0[k]) / len(recs), 1) for k in srv0},
            "machine_us_per_event": round(1e6 * (busy1 - busy0) / len(recs), 1),
            "machine_cores": os.cpu_count(),
        }

        # 4) latency at 60% of the max rate (answered and learned), labels flowing
        if done_rate:
            live_rate = min(0.6 * done_rate, args.max_live_rate)
            n = max(50, int(live_rate * args.live_seconds))
            live = records(spec, n, run_id="lv", seed=4, entities=args.entities, labels=labels)
            reader = OutputReader(settings, spec.topics.predictions)
            reader.start()
            c0 = sum(cpu_seconds(p.pid) for p in run.procs)
            joins0, waits0 = run.joins(), run.waits()
            sent = live_send_apart(settings, spec, live, live_rate, args.label_delay)
            reader.wait_for(set(sent), 60)
            c1 = sum(cpu_seconds(p.pid) for p in run.procs)
            joins1, waits1 = run.joins(), run.waits()
            reader.close()
            out["live_60pct"] = {
                "rate": round(live_rate, 1),
                "rate_capped": live_rate < 0.6 * done_rate,
                "label_delay": str(args.label_delay) if labels else None,
                **latency_summary(sent, reader.times),
                "cpu_us_per_event": round(1e6 * (c1 - c0) / len(sent), 1),
                # live labels turning early, and the scorer waiting for the labels, show a
                # worker that fell more than scoring.max_idle behind (docs/performance.md)
                "label_joins": _delta(joins0, joins1, int),
                "order_wait_seconds": _delta(waits0, waits1, lambda v: round(v, 2)),
            }
        check_alive(run)
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its flame graph on SIGINT
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
        for p in run.procs:
            p.stop()
    if args.profile:
        out["profiles"] = sorted(str(f) for f in Path(args.profile).glob(f"{tag}-{kind}-*.svg"))
    return out


def profile(proc: Proc, folder: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``proc`` (threads and children) until SIGINT, to ``folder/<proc>.svg``."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy (see docs/performance.md)")
    folder.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(proc.pid), "--subprocesses", "--nonblocking", "--rate", "100"]
    argv += ["--output", str(folder / f"{proc.name}.svg")]
    log = open(folder / f"{proc.name}.py-spy.log", "wb")  # noqa: SIM115 - lives with py-spy
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def ceiling(spec: PipelineSpec, recs: Sequence[Record], delay_events: int) -> dict[str, Any]:
    """(c) The spec's features and model in one process, no Kafka or Redis.

    Per message what the worker must do besides I/O: parse the event (contracts), its
    features (features/offline over the whole stream at once, amortised per event),
    River predict, encode the prediction; per label parse, coerce and learn with the
    features kept for its event.
    """
    import math

    import pandas as pd

    from features.base import to_model_input
    from features.offline import compute_offline
    from models.factory import build_model, coerce_label, learn, predict
    from weir.contracts import encode_prediction, parse_event, parse_label
    from weir.types import Prediction

    model = build_model(spec.model)
    task = spec.task
    order = list(interleave(recs, delay_events))
    index = {r.event_id: i for i, r in enumerate(recs)}
    names = [f.name for f in spec.features]
    c0, t0 = time.process_time(), time.perf_counter()
    events = [parse_event(r.event, spec) for r in recs]
    frame = pd.DataFrame(
        {
            "event_id": [e.event_id for e in events],
            "entity_id": [e.entity_id for e in events],
            "ts": [e.ts for e in events],
            **{f: [e.data.get(f) for e in events] for f in spec.fields},
        }
    )
    feats = compute_offline(spec, frame)[names].to_dict("records")
    t_features = time.perf_counter() - t0
    kept: dict[str, dict[str, Any]] = {}
    for is_label, r in order:
        if is_label:
            lab = parse_label(r.label, spec)
            x = kept.pop(lab.event_id)
            learn(model, x, coerce_label(lab.label, spec), task)
            continue
        i = index[r.event_id]
        ev = events[i]
        fv = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in feats[i].items()}
        x = to_model_input(fv)
        y, proba = predict(model, x, task)
        encode_prediction(
            Prediction(ev.event_id, ev.entity_id, ev.ts, spec.model.name, "v1", y, proba, fv, 0.0)
        )
        kept[ev.event_id] = x
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "system": "ceiling",
        "backlog": {
            "events": len(recs),
            "labels": sum(1 for r in recs if r.label is not None),
            "label_delay_events": delay_events,
            "received": len(recs),
            "complete": True,
            "events_per_second": round(len(recs) / wall, 1),
            "sustained_events_per_second": round(len(recs) / wall, 1),
            "features_seconds": round(t_features, 3),
            "labels_learned": sum(1 for r in recs if r.label is not None),
        },
        "cpu": {"us_per_event": round(1e6 * cpu / len(recs), 1)},
    }


# -- the table ------------------------------------------------------------------------------

LABELS = {
    "weir-all": "Weir, role all",
    "weir-split": "Weir, scorer + learner",
    "weir-score": "Weir, scoring only (no labels)",
    "weir-split2": "Weir, 2 scorers + learner",
    "weir-score2": "Weir, 2 scorers, no labels",
    "floor": "(a) floor: consume->produce",
    "naive": "(b) naive per-event loop",
    "ceiling": "(c) in-process ceiling",
}


def plot(results: dict[str, Any], path: Path) -> list[str]:
    """Two panels into ``path`` (PNG): the backlog's events per second of every system
    (with labels where the system learns), and each system's live p99 per second at 60%
    of its own rate. Returns the systems drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sysres = results["systems"]
    drawn = [k for k in TABLE_ORDER if k in sysres]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    rates = [sustained(sysres[k]) or 0.0 for k in drawn]
    # The floor reads in bursts (10-100x the others): clipped, its figure in the label.
    top = 1.2 * max([r for k, r in zip(drawn, rates, strict=True) if k != "floor"] or [1.0])
    bars = left.barh(
        [LABELS[k] for k in drawn],
        [min(r, top) for r in rates],
        color=["C0" if k.startswith("weir") else "C7" for k in drawn],
    )
    left.bar_label(
        bars,
        labels=[f"{r:,.0f}" + (" (off the scale)" if r > top else "") for r in rates],
        fontsize=8,
        padding=3,
    )
    left.invert_yaxis()
    left.set_xlim(0, top * 1.3)
    left.set_title("backlog: events/s")
    left.set_xlabel("events/s, backlog: all answered and (role all, split, naive) all labels learned")
    left.grid(axis="x", alpha=0.3)
    for k in drawn:
        live = sysres[k].get("live_60pct") or {}
        by_second = live.get("p99_ms_by_second") or []
        if by_second:
            right.plot(
                range(1, len(by_second) + 1),
                by_second,
                marker=".",
                label=f"{LABELS[k]} ({live.get('rate', 0):,.0f}/s)",
            )
    right.axhline(50, color="k", linestyle="--", linewidth=1, label="issue #12 target: 50 ms")
    right.set_yscale("log")
    right.set_xlabel("second of the live phase")
    right.set_ylabel("p99 event -> prediction, ms")
    right.set_title("live, at 60% of each system's backlog rate")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(
        f"weir bench/e2e.py, {results.get('events', '?')} events per system ({results.get('when', '')})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def sustained(res: dict[str, Any]) -> float | None:
    """A system's max sustained rate: its backlog's events over the seconds from the resume
    until every event was answered and, with labels, every label learned (a run saved
    before that figure existed: the rate of its predictions). None when incomplete."""
    b = res.get("backlog", {})
    v = b.get("sustained_events_per_second", b.get("events_per_second"))
    return v if b.get("complete") and v is not None and v == v else None


def table(results: dict[str, Any]) -> str:
    sysres = results["systems"]

    def rate(k: str) -> float | None:
        return sustained(sysres.get(k, {}))

    naive, floor, ceil = rate("naive"), rate("floor"), rate("ceiling")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.3g}x" if a and b else "-"

    lines = [
        f"{'system':32s} {'events/s':>9s} {'output/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU us/ev':>9s} "
        f"{'machine':>8s} {'learned':>8s} {'/naive':>7s} {'/floor':>7s} {'/ceil':>7s}"
    ]
    for k in TABLE_ORDER:
        if k not in sysres:
            continue
        r = sysres[k]
        if "error" in r:
            lines.append(f"{LABELS[k]:32s} failed: {r['error'][:80]}")
            continue
        bk, live = r.get("backlog", {}), r.get("live_60pct", {})
        ev = rate(k)
        learned = bk.get("labels_learned")
        learned_s = "-" if not bk.get("labels") else f"{learned}/{bk['labels']}"
        lines.append(
            f"{LABELS[k]:32s} {ev if ev is not None else 'n/a':>9} {bk.get('events_per_second', '-')!s:>9s} "
            f"{live.get('p50_ms', '-')!s:>7s} "
            f"{live.get('p99_ms', '-')!s:>7s} {r.get('cpu', {}).get('us_per_event', '-')!s:>9s} "
            f"{r.get('cpu', {}).get('machine_us_per_event', '-')!s:>8s} {learned_s:>8s} "
            f"{ratio(ev, naive):>7s} {ratio(ev, floor):>7s} {ratio(ev, ceil):>7s}"
        )
    return "\n".join(lines)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    rates = {k: r for k, v in results["systems"].items() if (r := sustained(v)) is not None}
    out: dict[str, float | None] = {}
    baselines = ("naive", "floor", "ceiling")
    for a in (k for k in TABLE_ORDER if k not in baselines):
        for b in baselines:
            out[f"{a}/{b}"] = round(rates[a] / rates[b], 3) if a in rates and b in rates else None
    out["naive/floor"] = (
        round(rates["naive"] / rates["floor"], 3) if {"naive", "floor"} <= rates.keys() else None
    )
    return out


def targets(results: dict[str, Any]) -> dict[str, bool | None]:
    """Issue #12's targets (a benchmark figure, never a test)."""
    s = results["systems"]

    def ev(k: str) -> float | None:
        return sustained(s.get(k, {}))

    def p99_ok(k: str) -> bool | None:
        v = s.get(k, {}).get("live_60pct", {}).get("p99_ms")
        return None if v is None else float(v) <= 50

    def ge(a: float | None, b: float) -> bool | None:
        return None if a is None else a >= b

    all_, naive = ev("weir-all"), ev("naive")
    return {
        "weir-all >= 3x naive": None if all_ is None or naive is None else all_ >= 3 * naive,
        "weir-all >= 6000 ev/s": ge(all_, 6000),
        "weir-split >= 8000 ev/s": ge(ev("weir-split"), 8000),
        "weir-score >= 10000 ev/s": ge(ev("weir-score"), 10000),
        **{f"{k} p99 <= 50 ms at 60%": p99_ok(k) for k in ("weir-all", "weir-split", "weir-score")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument(
        "--spec", default=str(REPO / "examples/loan-lr.yaml"), help="pipeline YAML (default loan-lr)"
    )
    ap.add_argument("--events", type=int, default=20_000, help="backlog events per system (default 20,000)")
    ap.add_argument(
        "--live-seconds", type=float, default=20.0, help="length of the latency phase (default 20)"
    )
    ap.add_argument(
        "--label-delay",
        type=LabelDelay.parse,
        default=LabelDelay.parse("2s"),
        help="label delay in the latency phase: seconds ('2s') or events ('500ev'); default 2s",
    )
    ap.add_argument(
        "--backlog-label-delay",
        type=int,
        default=1000,
        help="events between an event and its label in the backlog (default 1000)",
    )
    ap.add_argument(
        "--max-live-rate",
        type=float,
        default=10_000.0,
        help="cap of the latency phase's rate: one Python sender does not go much faster (default 10,000)",
    )
    ap.add_argument("--entities", type=int, default=50_000, help="distinct entities (default 50,000)")
    ap.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default {','.join(DEFAULT_SYSTEMS)})",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a backlog to drain")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="py-spy flame graphs of every process of each system into DIR (slows them: not a result)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 events, 5 s live phases")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON output (default bench/results/e2e.json; --quick: a temp file); a plot beside it (.png)",
    )
    ap.add_argument(
        "--plot", default=None, metavar="JSON", help="only draw the plot of a saved run (JSON -> .png)"
    )
    args = ap.parse_args()
    if args.plot is not None:
        saved = Path(args.plot)
        drawn = plot(json.loads(saved.read_text()), saved.with_suffix(".png"))
        print(f"saved {saved.with_suffix('.png')} ({', '.join(drawn)})")
        return 0
    if args.quick:
        args.events, args.live_seconds, args.timeout = 2000, 5.0, 120.0
        args.backlog_label_delay = min(args.backlog_label_delay, 200)
    if args.out is None:
        args.out = (
            str(Path(tempfile.gettempdir()) / "weir-e2e-quick.json")
            if args.quick
            else str(REPO / "bench/results/e2e.json")
        )
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose among {', '.join(SYSTEMS)}")

    settings = load_settings()
    base = yaml.safe_load(Path(args.spec).read_text())
    tag = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "spec": shown(args.spec),
        "events": args.events,
        "entities": args.entities,
        "backlog_label_delay_events": args.backlog_label_delay,
        "live_label_delay": str(args.label_delay),
        "live_seconds": args.live_seconds,
        "quick": args.quick,
        "profiled": bool(args.profile),
        "systems": {},
    }
    print(
        f"e2e benchmark {tag}: {args.events:,} events per system, labels {args.backlog_label_delay} events "
        f"late in the backlog and {args.label_delay} late live; spec {results['spec']}",
        flush=True,
    )
    for kind in [s for s in SYSTEMS if s in chosen]:
        spec, path = pipeline(base, f"b{tag}{kind.replace('-', '')}")
        print(f"- {LABELS[kind]} ...", flush=True)
        try:
            if kind == "ceiling":
                recs = records(spec, args.events, run_id="bk", seed=3, entities=args.entities)
                res = ceiling(spec, recs, args.backlog_label_delay)
            else:
                make_topics(settings, spec)
                res = measure(kind, settings, spec, path, tag, args)
        except Exception as exc:
            res = {"system": kind, "error": f"{type(exc).__name__}: {exc}"}
            print(f"  failed: {res['error']}", flush=True)
        finally:
            if kind != "ceiling":
                cleanup(settings, spec)
            path.unlink(missing_ok=True)
        results["systems"][kind] = res
        bk, live = res.get("backlog", {}), res.get("live_60pct", {})
        print(
            f"  {sustained(res)} ev/s answered and learned, {bk.get('events_per_second')} ev/s of "
            f"predictions (complete {bk.get('complete')}), "
            f"CPU {res.get('cpu', {}).get('us_per_event')} us/ev, "
            f"live p50/p99 {live.get('p50_ms')}/{live.get('p99_ms')} ms",
            flush=True,
        )
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print("\nratios:", json.dumps(results["ratios"]))
    print("issue #12 targets:", json.dumps(results["targets"]))
    print(f"saved {args.out}")
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"saved {Path(args.out).with_suffix('.png')}")
    if args.quick:
        print("(--quick: a smoke run; its figures are not results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
