"""Prometheus label sets stay bounded however many snapshots and retrains a run sees.

Snapshot ids (``v3.17``) change every few seconds: as a label value each would be a new
series forever. Model versions change once per retrain, and only the newest few are kept.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry

from models.evaluation import OnlineEvaluator
from models.monitor import Monitor
from tests.unit.test_retrain_monitor import MemoryRegistry, agrawal_examples, make_spec, trained_champion
from weir.metrics import LearnerMetrics, MonitorMetrics

SNAPSHOT_ID = re.compile(r"^v\d+\.\d+$")


def _series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [s.labels for m in registry.collect() for s in m.samples if s.name == name]


def test_online_metric_keeps_the_newest_versions_only() -> None:
    prom = CollectorRegistry()
    metrics = LearnerMetrics(prom)
    ev = OnlineEvaluator("binary", rolling_window=10, max_versions=3)
    for version in range(1, 13):  # twelve retrains, fifty snapshots each
        for i in range(50):
            y = i % 2 == 0
            ev.update(y, y, {"False": 0.3, "True": 0.7}, model_version=f"v{version}.{i}")
        ev.export(metrics, "p", "lr")
    series = _series(prom, "weir_online_metric")
    versions = {s["model_version"] for s in series}
    assert versions == {"*", "v10", "v11", "v12"}
    assert len(series) == 4 * 4 * 2  # versions x metrics x windows
    assert set(ev.snapshot()) == versions


def test_monitor_metrics_carry_no_model_version() -> None:
    spec = make_spec(cooldown=3600)
    champion = trained_champion(spec)
    reg = MemoryRegistry()
    reg.set_alias("champion", reg.save(champion, parent=None, trigger="initial", reason="r").id)
    prom = CollectorRegistry()
    mon = Monitor(spec, reg, lambda r: None, MonitorMetrics(prom).init_series(spec), check_every=100)
    records = agrawal_examples(spec, champion, [(6, 2000), (7, 2500)])
    counts: list[int] = []
    for i, r in enumerate(records):
        r = {**r, "model_version": f"v1.{i // 50}"}  # a new snapshot every 50 labels
        mon.on_predictions([{"features": r["features"], "prediction": r["prediction"]}])
        mon.on_example(r)
        if i in (2999, len(records) - 1):
            counts.append(sum(1 for m in prom.collect() for _ in m.samples))
    assert mon.promotions == ["v2"]
    labels: list[dict[str, Any]] = [s.labels for m in prom.collect() for s in m.samples]
    assert not any("model_version" in ls for ls in labels)
    assert not any(SNAPSHOT_ID.match(str(v)) for ls in labels for v in ls.values())
    assert counts[0] == counts[1], "monitor series grew with the stream"
