"""The retrain loop end to end, with the demo's pipeline, on the real Kafka and Redis.

Every test runs the real processes: ``weir worker SPEC --role all`` (features, scoring,
the label join and online learning) and ``weir monitor SPEC`` (drift, retrain, shadow,
promotion, rollback), fed by ``weir produce``'s code with delayed labels. Accuracy is
that of the predictions actually served, read back from the training-log topic.

* An abrupt concept change (Agrawal function 6 -> 7): performance drift is detected
  within 1,000 labels of the change, a challenger is fitted, shadowed and promoted, and
  over 2,000 events served by it the accuracy beats, by at least 5 points, the same spec
  with retraining disabled run side by side on the same stream. The stream comes in three
  parts (the change, the shadow, the comparison) with waits between them for the retrain
  and the promotion: how many events a retrain and a shadow take in wall time is the
  machine's business, not the loop's (on a loaded CI machine the promotion once came
  after a single 10,000-event stream had ended).
* A stationary stream of the same length causes no retrain at all.
* A bad model forced to champion (``weir models SPEC promote``) is rolled back by the
  monitor, and the predecessor returns with what it had learned.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition
from river import dummy

from models.drift import same_label
from models.registry import ModelRegistry
from streams.admin import delete_keys
from streams.produce import produce
from tests.integration.conftest import wait_for
from tests.integration.processes import Monitor, Worker, assigned_members, free_port
from weir.settings import Settings
from weir.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
CHANGE = 4000  # the event at which Agrawal switches from function 6 to 7
N = 10_000  # events (and labels) per stream
AFTER = 2000  # events of the new concept in part 1: detection (<= 1,000) and 500 fresh labels
SHADOW = 800  # events of part 2: the challenger's shadow (shadow_labels 500)
COMPARED = 2000  # events of the third part, all served by the promoted model
RATE = 700.0  # events/s per pipeline
LABEL_DELAY = 1.0  # seconds
SEED = 11


class Pipeline:
    """One pipeline of the demo spec on fresh topics: a worker and, optionally, a monitor."""

    def __init__(
        self,
        make_topics: Any,
        redis_client: Any,
        tmp: Path,
        name: str,
        *,
        monitor: bool = True,
        **retrain: Any,
    ) -> None:
        base = load_spec(REPO / "examples/demo.yaml")
        base = base.model_copy(
            update={
                "name": name,
                "retrain": base.retrain.model_copy(update=retrain),
                "topics": base.topics.model_copy(update={"partitions": 2}),
            }
        )
        self.spec: PipelineSpec = make_topics.for_spec(base)
        self.registry = ModelRegistry(redis_client, self.spec)
        self.redis = redis_client
        self.metrics_port = free_port()
        self.worker = Worker(self.spec, tmp / name, metrics_port=self.metrics_port)
        self.monitor = Monitor(self.worker.spec_path, tmp / name) if monitor else None

    def wait_ready(self, settings: Settings) -> None:
        wait_for(lambda: self.registry.alias("champion"), 60, f"{self.spec.name}: the worker's champion v1")
        wait_for(
            lambda: assigned_members(settings, self.spec.consumer_group) > 0,
            60,
            f"{self.spec.name}: the worker to join its consumer group",
        )

    def produce(self, settings: Settings, source: str, limit: int, run_id: str) -> dict[str, Any]:
        """``weir produce``'s code: ``limit`` events of ``source`` and their labels."""
        return produce(
            self.spec,
            settings,
            source,
            limit=limit,
            rate=RATE,
            label_delay=LABEL_DELAY,
            entities=2000,
            progress=False,
            run_id=run_id,
        )

    def stop(self) -> None:
        problems = []
        code = self.worker.stop()
        if code not in (0, -signal.SIGTERM):
            problems.append(f"worker exited with {code}:\n{self.worker.tail()}")
        if self.monitor is not None:
            code = self.monitor.stop()
            if code not in (0, -signal.SIGTERM):
                problems.append(f"monitor exited with {code}:\n{self.monitor.tail()}")
        delete_keys(self.redis, self.spec.redis_prefix)
        assert not problems, "\n".join(problems)


def _monitor_caught_up(settings: Settings, spec: PipelineSpec) -> bool:
    """The monitor's group has committed the end of the training-log topic."""
    c = Consumer({**settings.confluent_config(), "group.id": f"{spec.consumer_group}-monitor"})
    try:
        md = c.list_topics(spec.topics.training_log, timeout=10).topics[spec.topics.training_log]
        tps = [TopicPartition(spec.topics.training_log, p) for p in md.partitions]
        committed = c.committed(tps, timeout=10)
        for tp in committed:
            low, high = c.get_watermark_offsets(tp, timeout=10)
            if high > low and tp.offset < high:  # an empty partition has nothing to commit
                return False
        return True
    finally:
        c.close()


def _index(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


def _training_log(consume_all: Any, spec: PipelineSpec, n: int) -> dict[str, dict[str, Any]]:
    """Joined examples by event id: label, served prediction, model_version."""
    msgs = consume_all(spec.topics.training_log, n, timeout=90)
    out = {}
    for m in msgs:
        rec = orjson.loads(m.value())
        out[rec["event_id"]] = rec
    assert len(out) == n, f"{len(out)} distinct joined examples of {n}"
    return out


def _part(log: dict[str, dict[str, Any]], run_id: str) -> dict[int, dict[str, Any]]:
    """The joined examples of one ``weir produce`` run (its run id), by event index."""
    return {_index(k): v for k, v in log.items() if k.startswith(f"{run_id}-")}


def _served_versions(port: int) -> set[str]:
    """The model versions (snapshot ids cut to the version) a worker says it scores with."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        str(s.labels["model_version"]).split(".")[0]
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "weir_model_version_info" and s.value == 1
    }


def _drift(consume_all: Any, spec: PipelineSpec) -> list[dict[str, Any]]:
    msgs = consume_all(spec.topics.drift, 1_000_000, timeout=5.0, allow_fewer=True)
    return [orjson.loads(m.value()) for m in msgs]


def _correct(rec: dict[str, Any]) -> bool:
    return rec["prediction"] is not None and same_label(rec["label"], rec["prediction"])


def _accuracy(log: dict[int, dict[str, Any]], indices: range) -> float:
    return sum(_correct(log[i]) for i in indices) / len(indices)


def _taken(records: list[dict[str, Any]], name: str, statistic: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["kind"] == "decision"
        and r["name"] == name
        and r["drifted"]
        and (statistic is None or r["statistic"] == statistic)
    ]


def _within(check: Any, timeout: float) -> Any:
    """``check()``'s first truthy result within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
    return result


def _produce_both(
    settings: Settings, pipelines: tuple[Pipeline, ...], source: str, n: int, run_id: str
) -> None:
    """The same ``n`` events (and labels) to every pipeline at once, side by side."""
    summaries: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(
            target=lambda p=p: summaries.update({p.spec.name: p.produce(settings, source, n, run_id)})
        )
        for p in pipelines
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(summaries) == len(pipelines), f"a producer did not finish: {summaries}"
    assert all(s["events"] == n and s["labels"] == n for s in summaries.values()), summaries


def test_concept_change_retrained_promoted_and_better_than_no_retraining(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any, tmp_path: Path
) -> None:
    on = Pipeline(make_topics, redis_client, tmp_path, "loop", cooldown=10.0)
    off = Pipeline(make_topics, redis_client, tmp_path, "noloop", monitor=False, enabled=False)
    both = (on, off)

    def decisions() -> list[tuple[Any, ...]]:
        return [
            (r["name"], r["statistic"], r["model_version"], r["detail"].get("reason"))
            for r in _drift(consume_all, on.spec)
            if r["kind"] == "decision" and (r["drifted"] or r["name"] != "retrain")
        ]

    try:
        on.wait_ready(settings)
        off.wait_ready(settings)
        # Part 1, the change: function 6, then function 7 from event CHANGE on.
        drifting = f"river:agrawal-drift?position={CHANGE}&before=6&after=7&seed={SEED}"
        _produce_both(settings, both, drifting, CHANGE + AFTER, "ev")
        fitted = _within(lambda: on.registry.alias("challenger") or on.registry.alias("champion") != "v1", 90)
        assert fitted, f"no challenger 90 s after the change's labels; decisions: {decisions()}"
        # Detected within 1,000 labels of the change, and never before it.
        records = _drift(consume_all, on.spec)
        detections = sorted(
            _index(r["detail"]["event_id"]) for r in records if r["kind"] == "performance" and r["drifted"]
        )
        assert detections and detections[0] >= CHANGE, f"performance drift at events {detections}"
        assert detections[0] - CHANGE <= 1000, f"detected {detections[0] - CHANGE} labels after the change"

        # Part 2, the shadow: the new concept goes on; the challenger must earn its promotion.
        _produce_both(
            settings, both, f"river:synth.Agrawal?classification_function=7&seed={SEED + 1}", SHADOW, "b"
        )
        promoted = _within(lambda: (v := on.registry.alias("champion")) != "v1" and v, 90)
        assert promoted, f"no promotion 90 s after the shadow's labels; decisions: {decisions()}"
        mv = on.registry.get(promoted)
        assert mv.trigger == "performance" and mv.parent == "v1"
        assert mv.meta["window"]["since_ts"] is not None and mv.meta["shadow"]["labels"] >= 500
        # The worker swaps the promoted model in (it follows the champion alias).
        swapped = _within(lambda: _served_versions(on.metrics_port) == {promoted}, 60)
        assert swapped, f"the worker still scores with {_served_versions(on.metrics_port)}, not {promoted}"

        # Part 3, the comparison: the same 2,000 events to both pipelines.
        _produce_both(
            settings, both, f"river:synth.Agrawal?classification_function=7&seed={SEED + 2}", COMPARED, "c"
        )
        total = CHANGE + AFTER + SHADOW + COMPARED
        log_on = _training_log(consume_all, on.spec, total)
        log_off = _training_log(consume_all, off.spec, total)
        wait_for(lambda: _monitor_caught_up(settings, on.spec), 60, "the monitor to read the training log")
        records = _drift(consume_all, on.spec)
        assert _taken(records, "retrain"), "no retrain taken"
        promotions = _taken(records, "promotion", "promote")
        assert promotions and promotions[0]["detail"]["challenger"] == promoted, decisions()
        assert not _taken(records, "rollback"), "the promoted model was rolled back"
        assert on.registry.alias("champion") == promoted, decisions()

        compared_on, compared_off = _part(log_on, "c"), _part(log_off, "c")
        late = [i for i, rec in compared_on.items() if str(rec["model_version"]).split(".")[0] != promoted]
        assert not late, f"{len(late)} events of part 3 served by another version than {promoted}"
        window = range(COMPARED)
        acc_on, acc_off = _accuracy(compared_on, window), _accuracy(compared_off, window)
        change_on, change_off = _part(log_on, "ev"), _part(log_off, "ev")
        before, after = range(CHANGE - 1000, CHANGE), range(CHANGE, CHANGE + AFTER)
        print(
            f"\naccuracy, retraining / disabled: before the change {_accuracy(change_on, before):.3f} / "
            f"{_accuracy(change_off, before):.3f}; after it {_accuracy(change_on, after):.3f} / "
            f"{_accuracy(change_off, after):.3f} (detected at +{detections[0] - CHANGE} labels); "
            f"{COMPARED:,} events served by {promoted}: {acc_on:.3f} / {acc_off:.3f}"
        )
        assert acc_on >= acc_off + 0.05, f"retraining {acc_on:.3f} vs disabled {acc_off:.3f}"
        assert off.registry.list() and len(off.registry.list()) == 1
    finally:
        on.stop()
        off.stop()


def test_stationary_stream_causes_no_retrain(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any, tmp_path: Path
) -> None:
    p = Pipeline(make_topics, redis_client, tmp_path, "calm", cooldown=10.0)
    try:
        p.wait_ready(settings)
        s = p.produce(settings, f"river:synth.Agrawal?classification_function=6&seed={SEED}", N, "ev")
        assert s["events"] == N and s["labels"] == N
        log = _part(_training_log(consume_all, p.spec, N), "ev")
        wait_for(lambda: _monitor_caught_up(settings, p.spec), 60, "the monitor to read the training log")
        records = _drift(consume_all, p.spec)
        decisions = [r for r in records if r["kind"] == "decision"]
        assert len(decisions) >= N // 250 // 2, f"only {len(decisions)} retrain decisions recorded"
        taken = [r["detail"]["reason"] for r in decisions if r["drifted"]]
        assert not taken, f"decisions taken on a stationary stream: {taken}"
        assert [v.id for v in p.registry.list()] == ["v1"] and p.registry.alias("challenger") is None
        assert _accuracy(log, range(N - 2000, N)) > 0.85  # the model did learn
    finally:
        p.stop()


def test_bad_champion_forced_in_is_rolled_back(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any, tmp_path: Path
) -> None:
    p = Pipeline(make_topics, redis_client, tmp_path, "guard", rollback_labels=1000, rollback_margin=0.05)
    source = f"river:synth.Agrawal?classification_function=6&seed={SEED}"
    first, second = 3000, 4000
    try:
        p.wait_ready(settings)
        s = p.produce(settings, source, first, "a")
        assert s["labels"] == first
        wait_for(lambda: _monitor_caught_up(settings, p.spec), 60, "the monitor to read the first part")

        # An operator forces a bad model in: it always predicts the last label it saw.
        bad = p.registry.save(dummy.NoChangeClassifier(), parent="v1", trigger="manual", reason="forced in")
        cli = subprocess.run(
            [sys.executable, "-m", "weir.cli", "models", str(p.worker.spec_path), "promote", bad.id],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        swapped = _within(lambda: _served_versions(p.metrics_port) == {bad.id}, 60)
        assert swapped, f"the worker still scores with {_served_versions(p.metrics_port)}, not {bad.id}"

        s = p.produce(settings, source.replace(f"seed={SEED}", f"seed={SEED + 1}"), second, "b")
        assert s["labels"] == second
        _training_log(consume_all, p.spec, first + second)  # part a's and b's indices overlap
        wait_for(lambda: _monitor_caught_up(settings, p.spec), 60, "the monitor to read the second part")
        records = _drift(consume_all, p.spec)
        rb = [r for r in records if r["kind"] == "decision" and r["name"] == "rollback"]
        assert [r["statistic"] for r in rb] == ["rollback"], [r["detail"]["reason"] for r in rb]
        assert p.registry.alias("champion") == "v1"
        assert "rolled_back" in p.registry.get(bad.id).meta

        # Part b in event order (its own run id): the bad model served, then v1 again.
        msgs = consume_all(p.spec.topics.training_log, first + second, timeout=30)
        part_b = {}
        for m in msgs:
            rec = orjson.loads(m.value())
            if rec["event_id"].startswith("b-"):
                part_b[_index(rec["event_id"])] = rec
        assert len(part_b) == second
        version = {i: str(r["model_version"]).split(".")[0] for i, r in part_b.items()}
        by_bad = [i for i in range(second) if version[i] == bad.id]
        # The guard decides after rollback_labels (1000) labels of the bad model, which the
        # worker served from the start of part b (waited for above).
        assert len(by_bad) >= 900, f"the bad model served only {len(by_bad)} events"
        back = [i for i in range(max(by_bad) + 1, second) if version[i] == "v1"]
        assert len(back) >= 500, f"only {len(back)} events served by v1 after the rollback"
        acc_bad = sum(_correct(part_b[i]) for i in by_bad) / len(by_bad)
        acc_back = sum(_correct(part_b[i]) for i in back) / len(back)
        print(f"\nbad model {acc_bad:.3f} over {len(by_bad)} events; v1 after rollback {acc_back:.3f}")
        # v1 resumes with what it had learned (an untrained tree would start near 0.5).
        assert acc_back > 0.85 and acc_back > acc_bad + 0.2
    finally:
        p.stop()
