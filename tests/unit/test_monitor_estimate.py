"""The monitor's label-free estimate (CBPE): a drop in accuracy seen before the labels come.

A champion trained on Agrawal function 6 serves first a stream like its training data,
labelled, so the estimate is calibrated; then only events of the region where it is
unsure (a covariate shift: the served probabilities say so, the concept does not change),
whose labels have not come yet. The estimate must fall below the floor on the served
predictions alone, be flagged, and agree with the accuracy the labels show once they come.
"""

from __future__ import annotations

import itertools
from typing import Any

from prometheus_client import CollectorRegistry
from river.datasets import synth

from models.factory import model_input, predict
from models.monitor import Monitor
from weir.contracts import DriftRecord
from weir.metrics import MonitorMetrics
from weir.spec import PipelineSpec, parse_spec

from .test_retrain_monitor import FEATS, MemoryRegistry, make_spec, trained_champion


def _spec() -> PipelineSpec:
    data = make_spec().model_dump(mode="json", exclude_none=True)
    data["drift"].update({"estimate_window": 500, "estimate_min_accuracy": 0.75})
    return parse_spec(data)


def _records(
    spec: PipelineSpec, champion: Any, n: int, seed: int, unsure: bool | None
) -> list[dict[str, Any]]:
    """Served records; ``unsure``: only those served with 0.3 < P(True) < 0.7 (True), or none of
    them (False), or all (None)."""
    out: list[dict[str, Any]] = []
    for x, y in synth.Agrawal(6, seed=seed):
        feats = {f: float(x[f]) for f in FEATS}
        pred, proba = predict(champion, model_input(feats), spec.task)
        assert proba is not None
        if unsure is not None and unsure != (0.3 < proba["True"] < 0.7):
            continue
        out.append(
            {
                "event_id": f"e{seed}-{len(out)}",
                "features": feats,
                "label": str(int(y)),
                "prediction": pred,
                "proba": proba,
                "model_version": "v1.3",
            }
        )
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


def _estimates(out: list[DriftRecord]) -> list[DriftRecord]:
    return [r for r in out if r.kind == "estimate" and r.name == "accuracy"]


def test_the_estimate_falls_and_is_flagged_before_the_labels_come() -> None:
    spec = _spec()
    champion = trained_champion(spec)
    reg = MemoryRegistry()
    reg.aliases["champion"] = reg.save(champion, parent=None, trigger="initial", reason="r").id
    out: list[DriftRecord] = []
    prom = CollectorRegistry()
    clock = itertools.count(0.0, 0.05)
    mon = Monitor(spec, reg, out.append, MonitorMetrics(prom), check_every=100, clock=lambda: next(clock))

    history = _records(spec, champion, 4000, seed=3, unsure=None)
    for r in history:  # served and labelled: the calibration
        mon.on_prediction(r)
        mon.on_example(r)
    before = _estimates(out)[-1]
    assert before.value > 0.8 and not before.drifted
    realised_before = sum(r["prediction"] == (r["label"] == "1") for r in history[-500:]) / 500
    assert abs(before.value - realised_before) < 0.05

    shifted = _records(spec, champion, 600, seed=4, unsure=True)
    performance_before = sum(r.kind == "performance" and r.drifted for r in out)
    for r in shifted:  # served; their labels are still to come
        mon.on_prediction(r)
    after = _estimates(out)[-1]
    assert after.value < 0.75 and after.drifted and after.threshold == 0.75
    assert sum(r.kind == "performance" and r.drifted for r in out) == performance_before
    get = prom.get_sample_value
    assert (
        get("weir_estimated_performance", {"pipeline": "mon", "model_version": "v1", "metric": "accuracy"})
        == after.value
    )
    assert get("weir_drift_detected", {"pipeline": "mon", "kind": "estimate", "name": "accuracy"}) == 1

    print(f"estimated {before.value:.3f} -> {after.value:.3f}")
    # The labels come: what they realise is what was estimated.
    realised = sum(r["prediction"] == (r["label"] == "1") for r in shifted[-500:]) / 500
    assert abs(after.value - realised) < 0.08
    for r in shifted:
        mon.on_example(r)
    mon.check()
    err = get("weir_estimate_error", {"pipeline": "mon", "model_version": "v1"})
    assert err is not None and abs(err) < 0.08


def test_the_estimate_survives_a_checkpoint_and_skips_non_binary_tasks() -> None:
    spec = _spec()
    champion = trained_champion(spec)
    reg = MemoryRegistry()
    reg.aliases["champion"] = reg.save(champion, parent=None, trigger="initial", reason="r").id
    mon = Monitor(spec, reg, lambda r: None, check_every=10_000)
    for r in _records(spec, champion, 300, seed=5, unsure=False):
        mon.on_prediction(r)
        mon.on_example(r)
    state = mon.state()
    restarted = Monitor(spec, reg, lambda r: None, check_every=10_000)
    restarted.restore(state, {})
    assert restarted.estimates is not None
    assert restarted.estimates.estimates() == mon.estimates.estimates()  # type: ignore[union-attr]
    old = {k: v for k, v in state.items() if k != "estimates"}  # a checkpoint from before CBPE
    Monitor(spec, reg, lambda r: None).restore(old, {})

    data = spec.model_dump(mode="json", exclude_none=True)
    data.update(task="regression")
    data.pop("classes", None)
    assert Monitor(parse_spec(data), MemoryRegistry(), lambda r: None).estimates is None
