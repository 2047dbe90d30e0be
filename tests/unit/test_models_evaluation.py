"""OnlineEvaluator's numbers equal River's metrics fed directly."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from river import metrics, utils

from models.evaluation import OnlineEvaluator
from weir.metrics import LearnerMetrics
from weir.types import version_of


def _binary_stream(n: int, seed: int = 1) -> list[tuple[bool, bool, dict[str, float]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.random()
        out.append((rng.random() < 0.4, p > 0.5, {"False": 1 - p, "True": p}))
    return out


def test_binary_matches_river() -> None:
    ev = OnlineEvaluator("binary", rolling_window=50)
    ref: dict[str, tuple[Any, Any]] = {
        "accuracy": (metrics.Accuracy(), utils.Rolling(metrics.Accuracy, window_size=50)),
        "f1": (metrics.F1(), utils.Rolling(metrics.F1, window_size=50)),
        "log_loss": (metrics.LogLoss(), utils.Rolling(metrics.LogLoss, window_size=50)),
        "roc_auc": (metrics.ROCAUC(), utils.Rolling(metrics.ROCAUC, window_size=50)),
    }
    for i, (y, yp, proba) in enumerate(_binary_stream(500)):
        ev.update(y, yp, proba, model_version=f"v{1 + i // 250}.{i}")
        for name, (m, r) in ref.items():
            arg: object = proba if name in ("log_loss", "roc_auc") else yp
            if name in ("log_loss", "roc_auc"):
                arg = {True: proba["True"], False: proba["False"]}
            m.update(y, arg)
            r.update(y, arg)
    snap = ev.snapshot()
    assert set(snap) == {"*", "v1", "v2"}
    assert snap["*"]["n"] == 500 and snap["v1"]["n"] == 250
    for name, (m, r) in ref.items():
        assert snap["*"]["all"][name] == pytest.approx(m.get(), abs=1e-12)
        assert snap["*"]["rolling"][name] == pytest.approx(r.get(), abs=1e-12)


def test_per_version_matches_river() -> None:
    ev = OnlineEvaluator("binary")
    acc_v2 = metrics.Accuracy()
    for i, (y, yp, proba) in enumerate(_binary_stream(300, seed=5)):
        version = "v1" if i % 3 else "v2"
        ev.update(y, yp, proba, model_version=f"{version}.7")
        if version == "v2":
            acc_v2.update(y, yp)
    assert ev.get("accuracy", "v2") == pytest.approx(acc_v2.get())
    assert ev.count("v2") == 100


def test_multiclass_matches_river() -> None:
    rng = random.Random(3)
    classes = ["a", "b", "c"]
    ev = OnlineEvaluator("multiclass", rolling_window=30)
    acc, f1, ce = metrics.Accuracy(), metrics.MacroF1(), metrics.CrossEntropy()
    # Rolling forwards get() to the wrapped metric through __getattr__, typed as object.
    roll: Any = utils.Rolling(metrics.MacroF1, window_size=30)
    for _ in range(200):
        w = [rng.random() for _ in classes]
        proba = {c: v / sum(w) for c, v in zip(classes, w, strict=True)}
        yp = max(proba, key=proba.__getitem__)
        y = rng.choice(classes)
        ev.update(y, yp, proba, model_version="v1")
        acc.update(y, yp)
        f1.update(y, yp)
        ce.update(y, proba)
        roll.update(y, yp)
    s = ev.snapshot()["v1"]
    assert s["all"]["accuracy"] == pytest.approx(acc.get())
    assert s["all"]["macro_f1"] == pytest.approx(f1.get())
    assert s["all"]["log_loss"] == pytest.approx(ce.get())
    assert s["rolling"]["macro_f1"] == pytest.approx(roll.get())


def test_regression_matches_river() -> None:
    rng = random.Random(9)
    ev = OnlineEvaluator("regression", rolling_window=20)
    mae, rmse = metrics.MAE(), metrics.RMSE()
    rmae: Any = utils.Rolling(metrics.MAE, window_size=20)
    for _ in range(100):
        y, yp = rng.gauss(0, 1), rng.gauss(0, 1)
        ev.update(y, yp, None)
        mae.update(y, yp)
        rmse.update(y, yp)
        rmae.update(y, yp)
    assert ev.get("mae") == pytest.approx(mae.get())
    assert ev.get("rmse") == pytest.approx(rmse.get())
    assert ev.get("mae", window="rolling") == pytest.approx(rmae.get())


def test_unserved_prediction_not_scored() -> None:
    ev = OnlineEvaluator("binary")
    assert ev.update(True, None, None) is False
    assert ev.unscored == 1 and ev.snapshot() == {}


def test_export_sets_gauges() -> None:
    reg = CollectorRegistry()
    m = LearnerMetrics(reg)
    ev = OnlineEvaluator("binary")
    ev.update(True, True, {"False": 0.1, "True": 0.9}, model_version="v4.2")
    ev.export(m, "demo", "lr")
    labels = {"pipeline": "demo", "model": "lr", "model_version": "v4", "window": "all"}
    assert reg.get_sample_value("weir_online_metric", {**labels, "metric": "accuracy"}) == 1.0


def test_version_of() -> None:
    assert version_of("v3.17") == "v3"
    assert version_of("v3") == "v3"


def test_binary_rolling_with_unscored_and_probaless_labels_matches_river() -> None:
    """A label without proba is out of the proba metrics' window only (River's Rolling
    updated only when there is a proba); the windows wrap many times."""
    rng = random.Random(11)
    ev = OnlineEvaluator("binary", rolling_window=7)
    names = {
        "accuracy": metrics.Accuracy,
        "f1": metrics.F1,
        "log_loss": metrics.LogLoss,
        "roc_auc": metrics.ROCAUC,
    }
    ref: dict[str, tuple[Any, Any]] = {n: (c(), utils.Rolling(c, window_size=7)) for n, c in names.items()}
    for y, yp, proba in _binary_stream(400, seed=11):
        p: dict[str, float] | None = None if rng.random() < 0.3 else proba
        ev.update(y, yp, p, model_version="v1")
        for name, (m, r) in ref.items():
            if name in ("log_loss", "roc_auc"):
                if p is None:
                    continue
                arg: object = {True: p["True"], False: p["False"]}
            else:
                arg = yp
            m.update(y, arg)
            r.update(y, arg)
    snap = ev.snapshot()["v1"]
    for name, (m, r) in ref.items():
        assert snap["all"][name] == pytest.approx(m.get(), abs=1e-12), name
        assert snap["rolling"][name] == pytest.approx(r.get(), abs=1e-12), name
        assert ev.get(name, "v1", "rolling") == pytest.approx(r.get(), abs=1e-12), name
