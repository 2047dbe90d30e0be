from __future__ import annotations

import re

from streams.report import build_report
from weir.spec import load_spec

SPEC = load_spec("examples/demo.yaml")


def _training(n: int, flip_at: int) -> list[dict]:
    out = []
    for i in range(n):
        y = i % 2 == 0
        pred = y if i < flip_at else not y
        out.append(
            {"event_id": f"e{i}", "ts": 1000.0 + i, "label_ts": 1001.0 + i, "label": y, "prediction": pred}
        )
    return out


def test_report_has_plots_and_every_decision_escaped():
    drift = [
        {
            "time": 1500.0,
            "pipeline": "demo",
            "model_version": "v1",
            "kind": "performance",
            "name": "loss",
            "statistic": "adwin",
            "value": 0.4,
            "threshold": 0.0,
            "drifted": True,
        },
        {
            "time": 1400.0,
            "pipeline": "demo",
            "model_version": "v1",
            "kind": "feature",
            "name": "loan",
            "statistic": "psi",
            "value": 0.05,
            "threshold": 0.2,
            "drifted": False,
        },
        {
            "time": 1600.0,
            "pipeline": "demo",
            "model_version": "v1",
            "kind": "feature",
            "name": "loan",
            "statistic": "psi",
            "value": 0.31,
            "threshold": 0.2,
            "drifted": True,
        },
        {
            "time": 1550.0,
            "pipeline": "demo",
            "model_version": "v1",
            "kind": "decision",
            "name": "retrain",
            "statistic": "performance",
            "value": 600,
            "threshold": 500,
            "drifted": True,
            "detail": {"reason": "performance drift <ADWIN> on loss"},
        },
        {
            "time": 1560.0,
            "pipeline": "demo",
            "model_version": "v1",
            "kind": "decision",
            "name": "retrain",
            "statistic": "performance",
            "value": 10,
            "threshold": 500,
            "drifted": False,
            "detail": {"reason": "only 10 fresh labels < 500"},
        },
        {
            "time": 1700.0,
            "pipeline": "demo",
            "model_version": "v1",
            "kind": "decision",
            "name": "promotion",
            "statistic": "promote",
            "value": 0.9,
            "threshold": 0.0,
            "drifted": True,
            "detail": {"reason": "challenger 0.90 > champion 0.55"},
        },
    ]
    page = build_report(SPEC, drift, _training(1000, 500))
    assert page.count("data:image/png;base64,") == 2
    assert "performance drift &lt;ADWIN&gt; on loss" in page  # escaped
    assert "challenger 0.90 &gt; champion 0.55" in page
    assert "only 10 fresh labels" not in page  # retrains not taken are left out of the story
    assert "1000 joined labels; 1 performance drift detection(s)" in page
    assert len(re.findall(r"<tr><td>", page)) == 2


def test_report_says_when_there_is_nothing_yet():
    page = build_report(SPEC, [], [])
    assert "No joined labels" in page and "No drift statistics" in page and "No decisions taken yet" in page
    assert "data:image/png" not in page
