"""``weir demo``: the whole scoring path live, with a terminal summary.

Starts a worker (``weir worker SPEC --role all``) as a child process, replays a drifting
River stream into the events topic (with a few malformed messages and delayed labels),
reads the predictions and dead-letter topics, and prints once a second: events/s,
event-to-prediction latency percentiles, prediction mix, dead letters, and rolling
accuracy against the true labels. Stops after ``duration`` seconds or on Ctrl-C,
stopping the worker cleanly, then writes ``summary.json`` and ``accuracy.png``.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from weir.errors import StackError
from weir.settings import Settings
from weir.spec import PipelineSpec


def _percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


class Tally:
    """Everything the demo shows, updated by the consumer thread."""

    def __init__(self, window: int = 500) -> None:
        self.lock = threading.Lock()
        self.predictions = 0
        self.seen: set[str] = set()
        self.latencies: collections.deque[float] = collections.deque(maxlen=5000)
        self.mix: collections.Counter[str] = collections.Counter()
        self.dead: collections.Counter[str] = collections.Counter()
        self.versions: collections.Counter[str] = collections.Counter()
        self.truth: dict[str, Any] = {}
        self.hits: collections.deque[int] = collections.deque(maxlen=window)
        self.curve: list[tuple[float, int, float]] = []  # (time, n, rolling accuracy)
        self.pending: dict[str, Any] = {}
        self.story: list[tuple[float, int, str, str]] = []  # (time, predictions, kind, text)
        self.printed = 0
        self.drifting: dict[str, bool] = {}

    def on_drift(self, rec: dict[str, Any]) -> None:
        """Keep the drift records that tell the story: detections and decisions taken."""
        kind, detail = rec.get("kind"), rec.get("detail") or {}
        reason = detail.get("reason") if isinstance(detail, dict) else None
        if kind == "decision":
            if rec.get("name") == "retrain" and not rec.get("drifted"):
                return  # a retrain not taken (cooldown, too few labels): in the topic, not the story
            text = f"{rec.get('name')} ({rec.get('statistic')}): {reason or ''}"
            mark = "decision"
        elif kind in ("feature", "prediction"):
            # Only the moment a statistic starts drifting belongs to the story.
            key = f"{kind}:{rec.get('name')}"
            was = self.drifting.get(key, False)
            self.drifting[key] = bool(rec.get("drifted"))
            if was or not rec.get("drifted"):
                return
            text = (
                f"{kind} drift on {rec.get('name')}: {rec.get('statistic')}="
                f"{rec.get('value') if rec.get('value') is None else round(float(rec['value']), 3)}"
                f" > {rec.get('threshold')}"
            )
            mark = "drift"
        elif rec.get("drifted"):
            text = (
                f"{kind} drift on {rec.get('name')}: {rec.get('statistic')}="
                f"{rec.get('value') if rec.get('value') is None else round(float(rec['value']), 3)}"
                f" > {rec.get('threshold')}"
            )
            mark = "drift"
        else:
            return
        with self.lock:
            if self.story and self.story[-1][3] == text:
                return
            self.story.append((time.time(), self.predictions, mark, text))

    def on_prediction(self, rec: dict[str, Any], kafka_ts: float) -> None:
        with self.lock:
            eid = rec["event_id"]
            if eid in self.seen:
                return
            self.seen.add(eid)
            self.predictions += 1
            self.latencies.append(max(0.0, kafka_ts - float(rec["ts"])))
            self.mix[str(rec["prediction"])] += 1
            self.versions[str(rec["model_version"])] += 1
            self.pending[eid] = rec["prediction"]
            self._score(eid)

    def on_truth(self, event_id: str, y: Any) -> None:
        with self.lock:
            self.truth[event_id] = y
            self._score(event_id)

    def _score(self, eid: str) -> None:
        if eid in self.pending and eid in self.truth:
            pred, y = self.pending.pop(eid), self.truth.pop(eid)
            self.hits.append(
                int(str(pred).lower() in (str(y).lower(), {"1": "true", "0": "false"}.get(str(y))))
            )
            n = len(self.hits)
            self.curve.append((time.time(), self.predictions, sum(self.hits) / n))


def _consume(
    settings: Settings, spec: PipelineSpec, tally: Tally, stop: threading.Event, ready: threading.Event
) -> None:
    from confluent_kafka import Consumer, TopicPartition

    conf = settings.confluent_config()
    conf.update({"group.id": f"weir-demo-{os.getpid()}-{int(time.time())}", "enable.auto.commit": False})
    c = Consumer(conf)
    # Predictions are scored against the labels as they arrive on the labels topic.
    topics = [spec.topics.predictions, spec.topics.dead_letters, spec.topics.drift, spec.topics.labels]
    # Start at the current end of both topics: the demo shows only this run.
    assignment = []
    for t in topics:
        md = c.list_topics(t, timeout=10).topics[t]
        for p in md.partitions:
            _, high = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            assignment.append(TopicPartition(t, p, high))
    c.assign(assignment)
    ready.set()
    try:
        while not stop.is_set():
            for msg in c.consume(500, 0.2):
                if msg.error():
                    continue
                rec = orjson.loads(msg.value() or b"{}")
                if msg.topic() == spec.topics.predictions:
                    tally.on_prediction(rec, msg.timestamp()[1] / 1000.0)
                elif msg.topic() == spec.topics.drift:
                    tally.on_drift(rec)
                elif msg.topic() == spec.topics.labels:
                    tally.on_truth(str(rec.get("event_id")), rec.get("label"))
                else:
                    with tally.lock:
                        tally.dead[rec["reason"]] += 1
    finally:
        c.close()


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the worker exited with code {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.3)
    raise StackError(f"the worker's {url} did not answer within {timeout}s; see {log}")


def reset_pipeline(spec: PipelineSpec, settings: Settings) -> None:
    """Start the demo from nothing: delete the pipeline's topics and its Redis keys.

    The demo tells a story from an untrained model on; a second run would otherwise
    resume the first one's registry, snapshots and consumer offsets.
    """
    from streams.admin import delete_keys, delete_topics

    deleted = delete_topics(settings, list(spec.topics.names().values()))
    client = settings.redis()
    try:
        n_keys = delete_keys(client, spec.redis_prefix)
    finally:
        client.close()
    if deleted or n_keys:
        print(
            f"starting from a clean state: deleted {len(deleted)} topics and {n_keys} Redis keys "
            f"of pipeline {spec.name!r} (--resume keeps them)",
            flush=True,
        )


def run_demo(
    spec_path: str,
    spec: PipelineSpec,
    settings: Settings,
    *,
    duration: float = 60.0,
    rate: float = 300.0,
    source: str | None = None,
    label_delay: float = 2.0,
    out_dir: str | None = None,
    metrics_port: int = 9300,
    resume: bool = False,
) -> dict[str, Any]:
    from streams.admin import check_broker, check_redis, ensure_topics
    from streams.produce import produce

    check_broker(settings)
    check_redis(settings, spec=spec)
    if not resume:
        reset_pipeline(spec, settings)
    ensure_topics(settings, spec)
    out = Path(out_dir or Path(settings.data_dir) / "demo")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "worker.log"
    n_total = int(duration * rate)
    source = source or f"river:agrawal-drift?position={max(1000, n_total // 2)}&seed=7"
    env = dict(os.environ)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weir.cli",
                "worker",
                spec_path,
                "--role",
                "all",
                "--metrics-port",
                str(metrics_port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    monitor_log = out / "monitor.log"
    with open(monitor_log, "wb") as mlog:
        monitor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weir.cli",
                "monitor",
                spec_path,
                "--metrics-port",
                str(metrics_port + 1),
                "--check-every",
                "250",
            ],
            stdout=mlog,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    tally = Tally()
    stop = threading.Event()
    ready = threading.Event()
    consumer = threading.Thread(target=_consume, args=(settings, spec, tally, stop, ready), daemon=True)
    produced: dict[str, Any] = {}
    prod_stop = threading.Event()
    try:
        print(f"worker started (pid {proc.pid}, log {log_path}); waiting for it to be ready...", flush=True)
        _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 60, proc, log_path)
        consumer.start()
        ready.wait(15)
        time.sleep(3)  # let the worker join its group before traffic starts
        run_id = f"demo{int(time.time())}"

        def _produce() -> None:
            produced.update(
                produce(
                    spec,
                    settings,
                    source,
                    rate=rate,
                    limit=n_total,
                    label_delay=label_delay,
                    bad_every=250,
                    run_id=run_id,
                    progress=False,
                    stop=prod_stop,
                )
            )

        producer = threading.Thread(target=_produce, daemon=True)
        producer.start()
        t_start = time.time()
        last_n, last_t = 0, t_start
        print(f"producing {n_total} events at {rate:.0f}/s from {source} for {duration:.0f}s (Ctrl-C stops)")
        print(
            f"{'t':>4} {'ev/s':>7} {'preds':>7} {'p50ms':>7} {'p95ms':>7} {'p99ms':>7} "
            f"{'acc@500':>7} {'dead':>5}  mix / versions"
        )
        while time.time() - t_start < duration + 10:
            time.sleep(1)
            if proc.poll() is not None:
                raise StackError(f"the worker died (exit {proc.returncode}); see {log_path}")
            with tally.lock:
                n = tally.predictions
                lat = sorted(tally.latencies)
                acc = sum(tally.hits) / len(tally.hits) if tally.hits else float("nan")
                dead = sum(tally.dead.values())
                mix = dict(tally.mix.most_common(3))
                versions = list(tally.versions)[-1:] if tally.versions else []
            now = time.time()
            rate_now = (n - last_n) / (now - last_t)
            last_n, last_t = n, now
            p50, p95, p99 = (_percentile(lat, q) for q in (0.5, 0.95, 0.99))
            fmt = lambda v: f"{v * 1000:7.1f}" if v is not None else "      -"  # noqa: E731
            print(
                f"{now - t_start:4.0f} {rate_now:7.0f} {n:7d} {fmt(p50)} {fmt(p95)} {fmt(p99)} "
                f"{acc:7.3f} {dead:5d}  {mix} {versions}",
                flush=True,
            )
            with tally.lock:
                new, tally.printed = tally.story[tally.printed :], len(tally.story)
            for _, at, _, text in new:
                print(f"      >> at prediction {at}: {text}", flush=True)
            if not producer.is_alive() and n >= produced.get("events", n_total + 1):
                break
    except KeyboardInterrupt:
        print("\nstopping (Ctrl-C)...")
    finally:
        prod_stop.set()
        stop.set()
        for child in (proc, monitor):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in (proc, monitor):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)
        if consumer.is_alive():
            consumer.join(5)
    with tally.lock:
        lat = sorted(tally.latencies)
        summary = {
            "produced": produced,
            "predictions": tally.predictions,
            "dead_letters": dict(tally.dead),
            "latency_ms": {
                q: (round(v * 1000, 2) if v is not None else None)
                for q, v in (
                    ("p50", _percentile(lat, 0.5)),
                    ("p95", _percentile(lat, 0.95)),
                    ("p99", _percentile(lat, 0.99)),
                )
            },
            "prediction_mix": dict(tally.mix),
            "model_versions": dict(tally.versions),
            "worker_exit_code": proc.returncode,
            "monitor_exit_code": monitor.returncode,
            "story": [{"at_prediction": at, "kind": kind, "text": text} for _, at, kind, text in tally.story],
        }
        curve = list(tally.curve)
        story = list(tally.story)
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if curve:
        _plot(curve, story, out / "accuracy.png")
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {out / 'summary.json'}" + (f" and {out / 'accuracy.png'}" if curve else ""))
    return summary


def _plot(
    curve: list[tuple[float, int, float]], story: list[tuple[float, int, str, str]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([c[1] for c in curve], [c[2] for c in curve], lw=1.2, label="rolling accuracy")
    colors = {"drift": "tab:red", "decision": "tab:green"}
    seen: set[str] = set()
    for _, at, kind, text in story:
        label = None if kind in seen else kind
        seen.add(kind)
        ax.axvline(at, color=colors.get(kind, "grey"), ls="--", lw=0.9, label=label)
        if kind == "decision":
            ax.annotate(text.split(":")[0], (at, 0.05), rotation=90, fontsize=7, color=colors[kind])
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("predictions")
    ax.set_ylabel("rolling accuracy (last 500 labels)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("Weir demo: online accuracy of the served predictions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
