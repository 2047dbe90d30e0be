"""bench/e2e.py's plot (the saved run drawn: backlog rates, live p99 per second) and the
rate its table, ratios and targets read."""

from __future__ import annotations

import sys
from pathlib import Path

_path = list(sys.path)
from bench.e2e import plot, ratios, sustained, table, targets  # noqa: E402

# bench/e2e.py puts bench/ first on sys.path for its sibling modules; bench/features.py
# would then shadow the features package for whatever imports it next.
sys.path[:] = _path


def _system(rate: float, p99s: list[float] | None) -> dict[str, object]:
    out: dict[str, object] = {"backlog": {"events_per_second": rate, "complete": True}}
    if p99s is not None:
        out["live_60pct"] = {"rate": 0.6 * rate, "p99_ms_by_second": p99s}
    return out


def test_plot_draws_every_system_in_the_table_order_and_the_floor_clipped(tmp_path: Path) -> None:
    results = {
        "when": "2026-12-01T00:00:00Z",
        "events": 100,
        "systems": {
            "naive": _system(2000.0, [80.0, 90.0]),
            "floor": _system(170_000.0, [10.0, 12.0]),  # bursts: clipped on the bars
            "weir-all": _system(1900.0, [120.0, 300.0, 250.0]),
            "ceiling": _system(12_000.0, None),  # no live phase
            "weir-score2": _system(5000.0, [40.0]),  # a scale-out system, on request
        },
    }
    path = tmp_path / "sub" / "e2e.png"
    drawn = plot(results, path)
    assert drawn == ["weir-all", "weir-score2", "floor", "naive", "ceiling"]
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_system_that_scores_fast_and_learns_late_is_rated_by_when_it_is_done() -> None:
    # Predictions at 7,000/s but the last label learned 35 s after the resume (issue #12:
    # the rate of the outputs alone called that role `all` 6,900 events/s).
    late = {
        "backlog": {
            "events": 60_000,
            "complete": True,
            "events_per_second": 7000.0,
            "sustained_events_per_second": round(60_000 / 35.0, 1),
        }
    }
    naive = {
        "backlog": {"complete": True, "events_per_second": 9000.0, "sustained_events_per_second": 8800.0}
    }
    old = {"backlog": {"complete": True, "events_per_second": 3000.0}}  # saved before the figure
    broken = {
        "backlog": {"complete": False, "events_per_second": 9000.0, "sustained_events_per_second": None}
    }
    assert sustained(late) == 1714.3 and sustained(old) == 3000.0 and sustained(broken) is None
    results = {
        "systems": {
            "weir-all": late,
            "naive": naive,
            "weir-score": old,
            "weir-split": broken,
            "weir-split2": old,
        }
    }
    assert ratios(results)["weir-all/naive"] == round(1714.3 / 8800.0, 3)
    assert ratios(results)["weir-split2/naive"] == round(3000.0 / 8800.0, 3)
    assert any(line.startswith("Weir, 2 scorers + learner") for line in table(results).splitlines())
    t = targets(results)
    assert t["weir-all >= 6000 ev/s"] is False and t["weir-split >= 8000 ev/s"] is None
    row = next(line for line in table(results).splitlines() if line.startswith("Weir, role all"))
    assert row.split()[3:5] == ["1714.3", "7000.0"], row
