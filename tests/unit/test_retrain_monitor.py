"""The monitor's logic replayed offline: concept change -> drift -> challenger -> promotion.

Same code as live (:class:`models.monitor.Monitor`), fed decoded messages; the model
registry is an in-memory stand-in with the registry's API.
"""

from __future__ import annotations

import itertools
import pickle
from typing import Any

from prometheus_client import CollectorRegistry

from models.drift import DriftRecord
from models.factory import build_model, learn, model_input, predict
from models.monitor import Monitor
from weir.metrics import MonitorMetrics
from weir.spec import PipelineSpec, parse_spec
from weir.types import ModelVersion

FEATS = ["salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"]


def make_spec(**retrain: Any) -> PipelineSpec:
    return parse_spec(
        {
            "name": "mon",
            "task": "binary",
            "classes": ["0", "1"],
            "fields": dict.fromkeys(FEATS, "numeric"),
            "features": [{"agg": "raw", "field": k} for k in FEATS],
            "model": {
                "steps": [
                    "river.preprocessing.StandardScaler",
                    {
                        "class": "river.linear_model.LogisticRegression",
                        "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.05}}},
                    },
                ]
            },
            "drift": {"reference_size": 500, "window": 500, "min_samples": 200},
            "retrain": {
                "min_fresh_labels": 500,
                "window_labels": 2000,
                "cooldown": 60,
                "shadow_labels": 500,
                "rollback_labels": 500,
                **retrain,
            },
        }
    )


class MemoryRegistry:
    """The model registry's API over dicts (pickle round trips like the real one)."""

    def __init__(self) -> None:
        self.versions: dict[str, tuple[bytes, ModelVersion]] = {}
        self.aliases: dict[str, str | None] = {"champion": None, "challenger": None}
        self.parked: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.tokens: dict[str, str] = {}

    def save(
        self,
        model: Any,
        *,
        parent: str | None,
        trigger: str,
        reason: str,
        meta: Any = None,
        token: str | None = None,
    ) -> ModelVersion:
        if token is not None and token in self.tokens:  # idempotent, as in Redis
            return self.versions[self.tokens[token]][1]
        vid = f"v{len(self.versions) + 1}"
        if token is not None:
            self.tokens[token] = vid
        mv = ModelVersion(vid, "m", parent, 0.0, trigger, reason, "", "", "", dict(meta or {}))
        self.versions[vid] = (pickle.dumps(model), mv)
        return mv

    def load(self, vid: str) -> tuple[Any, ModelVersion]:
        blob, mv = self.versions[vid]
        return pickle.loads(blob), mv

    def get(self, vid: str) -> ModelVersion:
        return self.versions[vid][1]

    def park(self, model: Any, vid: str, *, labels_learned: int, by: str) -> None:
        self.versions[vid][1]  # unknown versions are an error, as in Redis
        self.parked[vid] = (pickle.dumps(model), {"labels_learned": labels_learned, "parked_by": by})

    def load_live(self, vid: str) -> tuple[Any, dict[str, Any] | None]:
        if vid in self.parked:
            blob, meta = self.parked[vid]
            return pickle.loads(blob), meta
        return self.load(vid)[0], None

    def update_meta(self, vid: str, **meta: Any) -> ModelVersion:
        self.versions[vid][1].meta.update(meta)
        return self.versions[vid][1]

    def set_alias(self, name: str, vid: str | None) -> None:
        self.aliases[name] = vid

    def alias(self, name: str) -> str | None:
        return self.aliases[name]


def agrawal_examples(
    spec: PipelineSpec, champion: Any, fns: list[tuple[int, int]], seed: int = 7
) -> list[dict[str, Any]]:
    """Training-log records: (classification_function, count) segments, served by a frozen champion."""
    from river.datasets import synth

    out: list[dict[str, Any]] = []
    for k, (fn, n) in enumerate(fns):
        for x, y in itertools.islice(synth.Agrawal(fn, seed=seed + k), n):
            i = len(out)
            feats = {f: float(x[f]) for f in FEATS}
            out.append(
                {
                    "event_id": f"e{i:06d}",
                    "ts": 1_700_000_000.0 + i,
                    "features": feats,
                    "label": str(int(y)),
                    "prediction": predict(champion, model_input(feats), spec.task)[0],
                    "model_version": "v1.3",
                }
            )
    return out


def trained_champion(spec: PipelineSpec, fn: int = 6, n: int = 3000) -> Any:
    from river.datasets import synth

    model = build_model(spec.model)
    for x, y in itertools.islice(synth.Agrawal(fn, seed=1), n):
        learn(model, {f: float(x[f]) for f in FEATS}, str(int(y)), spec.task)
    return model


def run(
    spec: PipelineSpec, records: list[dict[str, Any]], registry: MemoryRegistry
) -> tuple[Monitor, list[DriftRecord], CollectorRegistry]:
    out: list[DriftRecord] = []
    prom = CollectorRegistry()
    clock = iter(itertools.count(0.0, 0.05))  # 20 records a second
    mon = Monitor(
        spec, registry, out.append, MonitorMetrics(prom), check_every=100, clock=lambda: next(clock)
    )
    for r in records:
        mon.on_prediction({"features": r["features"], "prediction": r["prediction"]})
        mon.on_example(r)
    return mon, out, prom


def _setup(**retrain: Any) -> tuple[PipelineSpec, Any, MemoryRegistry]:
    spec = make_spec(**retrain)
    champion = trained_champion(spec)
    reg = MemoryRegistry()
    v = reg.save(champion, parent=None, trigger="initial", reason="bootstrap")
    reg.set_alias("champion", v.id)
    return spec, champion, reg


def test_concept_change_is_detected_retrained_and_promoted() -> None:
    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 2000), (7, 3000)])
    mon, out, prom = run(spec, records, reg)

    perf = [r for r in out if r.kind == "performance" and r.drifted]
    assert perf, "no performance drift detected"
    first = perf[0].detail or {}
    assert 2000 < first["labels_seen"] <= 3000  # within 1,000 labels of the change
    trained = [r for r in out if r.kind == "decision" and r.name == "challenger"]
    assert [r.statistic for r in trained] == ["trained"]
    assert reg.versions["v2"][1].trigger == "performance"
    assert reg.versions["v2"][1].meta["window"]["since_ts"] >= records[2000]["ts"]
    promo = [r for r in out if r.name == "promotion"]
    assert [r.statistic for r in promo] == ["promote"], [r.detail for r in promo]
    assert reg.alias("champion") == "v2" and reg.alias("challenger") is None
    assert mon.promotions == ["v2"] and reg.versions["v2"][1].meta["shadow"]["labels"] == 500
    # the learner will pick v2 up as it learned in shadow, not as first fitted
    assert reg.parked["v2"][1] == {"labels_learned": 500, "parked_by": "monitor"}
    keep = [r for r in out if r.name == "rollback"]
    assert [r.statistic for r in keep] == ["keep"]
    assert prom.get_sample_value("weir_promotions_total", {"pipeline": "mon"}) == 1.0
    assert (
        prom.get_sample_value(
            "weir_retrains_total", {"pipeline": "mon", "trigger": "performance", "outcome": "trained"}
        )
        == 1.0
    )
    drifts = prom.get_sample_value("weir_drift_events_total", {"pipeline": "mon", "kind": "performance"})
    assert drifts is not None and drifts >= 1.0


def test_stationary_stream_never_retrains() -> None:
    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 5000)])
    mon, out, prom = run(spec, records, reg)
    assert prom.get_sample_value("weir_promotions_total", {"pipeline": "mon"}) is None
    assert mon.retrains == 0 and reg.alias("champion") == "v1" and len(reg.versions) == 1
    decisions = [r for r in out if r.kind == "decision"]
    assert len(decisions) == mon.checks and all(not r.drifted for r in decisions)
    assert not any(r.drifted for r in out)
    feats = {r.name for r in out if r.kind == "feature"}
    assert feats == set(FEATS)


def test_a_bad_champion_forced_in_is_rolled_back() -> None:
    from river import dummy

    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 3000)])
    out: list[DriftRecord] = []
    mon = Monitor(spec, reg, out.append, check_every=100)
    for r in records[:1000]:
        mon.on_example(r)
    bad = reg.save(dummy.NoChangeClassifier(), parent="v1", trigger="manual", reason="forced")
    reg.set_alias("champion", bad.id)  # an operator forces a bad model in
    for r in records[1000:]:
        mon.on_example({**r, "model_version": "v1.9"})  # the learner has not switched yet
    rb = [r for r in out if r.name == "rollback"]
    assert [r.statistic for r in rb] == ["rollback"], [r.detail for r in rb]
    assert reg.alias("champion") == "v1" and mon.rollbacks == [bad.id]
    assert "predecessor" in (rb[0].detail or {})["reason"]


def test_manual_request_is_obeyed() -> None:
    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 800)])
    out: list[DriftRecord] = []
    mon = Monitor(spec, reg, out.append, check_every=10_000)
    for r in records:
        mon.on_example(r)
    mon.on_control({"command": "retrain", "reason": "new labels backfilled"})
    trained = [r for r in out if r.name == "challenger"]
    assert trained and trained[0].statistic == "trained"
    assert reg.get("v2").trigger == "manual" and reg.alias("challenger") == "v2"
    assert reg.get("v2").reason == "manual: new labels backfilled"


def feed_examples(
    spec: PipelineSpec, records: list[dict[str, Any]], reg: MemoryRegistry, cuts: tuple[int, ...] = ()
) -> tuple[Monitor, list[DriftRecord], list[tuple[int, int]]]:
    """Feed examples (position = (0, index)); at each cut, a new Monitor takes up the old
    one's pickled :meth:`Monitor.state` and the buffer read back by position."""
    out: list[DriftRecord] = []
    ticks = itertools.count(0.0, 0.05)

    def clock() -> float:
        return next(ticks)

    mon = Monitor(spec, reg, out.append, check_every=100, clock=clock)
    moments: list[tuple[int, int]] = []  # (examples seen, transitions) at each transition
    for i, r in enumerate(records):
        if i in cuts:
            state = pickle.loads(pickle.dumps(mon.state()))
            mon = Monitor(spec, reg, out.append, check_every=100, clock=clock)
            by_pos = {(0, j): records[j] for j in range(i)}
            assert mon.restore(state, by_pos) == 0
            mon.reconcile()
        before = mon.transitions
        mon.on_example(r, (0, i))
        if mon.transitions != before:
            moments.append((mon.examples_seen, mon.transitions))
    return mon, out, moments


def _decisions(out: list[DriftRecord]) -> list[tuple[Any, ...]]:
    return [(r.kind, r.name, r.statistic, r.value, r.drifted) for r in out if r.kind != "feature"]


def test_state_survives_a_restart_mid_shadow_and_mid_rollback_watch() -> None:
    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 2000), (7, 2500)])
    ref, ref_out, moments = feed_examples(spec, records, reg)
    assert ref.promotions == ["v2"] and [r.statistic for r in ref_out if r.name == "rollback"] == ["keep"]
    retrained_at, promoted_at = moments[0][0], moments[1][0]
    assert promoted_at - retrained_at >= spec.retrain.shadow_labels

    spec2, _, reg2 = _setup()
    cuts = (retrained_at + 200, promoted_at + 200)  # mid-shadow, then mid-rollback watch
    mon, out, _ = feed_examples(spec2, records, reg2, cuts)
    assert _decisions(out) == _decisions(ref_out)  # same drift, verdicts and values
    assert [r["event_id"] for r in mon.buffer] == [r["event_id"] for r in ref.buffer]
    assert list(mon.positions) == list(ref.positions)
    assert (mon.examples_seen, mon.retrains, mon.promotions) == (ref.examples_seen, 1, ["v2"])
    assert reg2.alias("champion") == "v2" and reg2.get("v2").meta["shadow"] == reg.get("v2").meta["shadow"]


def test_a_challenger_saved_after_the_checkpoint_is_adopted() -> None:
    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 600)])
    mon = Monitor(spec, reg, lambda r: None, check_every=10_000)
    for i, r in enumerate(records):
        mon.on_example(r, (0, i))
    state = pickle.loads(pickle.dumps(mon.state()))  # the checkpoint, before the retrain
    mon.on_control({"command": "retrain", "reason": "r"})
    assert reg.alias("challenger") == "v2"
    restarted = Monitor(spec, reg, lambda r: None, check_every=10_000)
    restarted.restore(state, {(0, i): r for i, r in enumerate(records)})
    restarted.reconcile()
    assert restarted.shadow is not None and restarted.shadow.version_id == "v2"
    assert restarted.shadow.trigger == "manual" and restarted.policy.pending == {}


def test_a_replay_of_covered_records_is_not_applied_twice() -> None:
    import orjson

    from models.monitor import Intake

    spec, champion, reg = _setup()
    t = spec.topics
    records = agrawal_examples(spec, champion, [(6, 1200)])

    def feed(intake: Intake, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            r = records[i]
            pred = {"features": r["features"], "prediction": r["prediction"]}
            intake.add(t.predictions, 0, i, orjson.dumps(pred))
            intake.add(t.training_log, 1, i, orjson.dumps(r))
        intake.flush()

    ref = Monitor(spec, reg, lambda r: None, check_every=10_000)
    feed(Intake(ref), 0, 1200)

    first = Monitor(spec, reg, lambda r: None, check_every=10_000)
    intake = Intake(first)
    feed(intake, 0, 800)
    feed(intake, 700, 800)  # a rebalance seeks back: nothing is applied again
    assert intake.replayed == 200 and first.examples_seen == 800 and first.predictions_seen == 800
    state = pickle.loads(pickle.dumps(first.state()))  # the checkpoint, with its offsets
    offsets = {topic: dict(parts) for topic, parts in intake.offsets.items()}
    assert offsets == {t.predictions: {0: 800}, t.training_log: {1: 800}}

    # The restart resumes from an earlier position than its state covers (records 500-799
    # are delivered again): only 800 on are applied.
    restarted = Monitor(spec, reg, lambda r: None, check_every=10_000)
    restarted.restore(state, {(1, i): records[i] for i in range(800)})
    again = Intake(restarted, offsets)
    feed(again, 500, 1200)
    assert again.replayed == 2 * 300
    assert (restarted.examples_seen, restarted.predictions_seen) == (1200, 1200)
    perf, ref_perf = restarted.suite.performance, ref.suite.performance
    assert perf is not None and ref_perf is not None
    assert perf.n_samples == ref_perf.n_samples == 1200 and perf.value() == ref_perf.value()
    assert restarted.policy.fresh_labels == ref.policy.fresh_labels
    assert [r["event_id"] for r in restarted.buffer] == [r["event_id"] for r in ref.buffer]
    assert list(restarted.positions) == list(ref.positions)


def test_late_joined_labels_of_another_version_raise_no_performance_drift() -> None:
    # The learner joins a label that came before its served record was found seconds later,
    # in a block: after a promotion, the training log still holds records served by the
    # version before (here: all wrong). Read as the champion's loss they are a rise; they
    # are labels (counted, buffered) but not the champion's loss.
    spec, champion, reg = _setup()
    records = agrawal_examples(spec, champion, [(6, 3000)])
    flip = {"0": "1", "1": "0"}
    late = [{**r, "prediction": flip[r["label"]], "model_version": "v0.7"} for r in records[:300]]
    stream = records[:2800] + late + records[2800:]

    def perf_drifts(recs: list[dict[str, Any]]) -> tuple[Monitor, list[DriftRecord]]:
        out: list[DriftRecord] = []
        mon = Monitor(spec, reg, out.append, check_every=100)
        for i, r in enumerate(recs):
            mon.on_example(r, (0, i))
        return mon, [r for r in out if r.kind == "performance" and r.drifted]

    mon, drifts = perf_drifts(stream)
    assert drifts == [], [d.detail for d in drifts]
    assert mon.stale_examples == 300 and mon.examples_seen == 3300 and len(mon.buffer) == 2000
    assert mon.retrains == 0 and reg.alias("champion") == "v1"
    # The same block served by the champion is its loss: a drift.
    mon, drifts = perf_drifts([*records[:2800], *({**r, "model_version": "v1.3"} for r in late)])
    assert drifts and mon.stale_examples == 0, "the block, taken as the champion's loss, is a rise"
