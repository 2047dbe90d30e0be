"""bench/e2e.py's plot: the saved run drawn (backlog rates, live p99 per second)."""

from __future__ import annotations

import sys
from pathlib import Path

_path = list(sys.path)
from bench.e2e import plot  # noqa: E402

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
        },
    }
    path = tmp_path / "sub" / "e2e.png"
    drawn = plot(results, path)
    assert drawn == ["weir-all", "floor", "naive", "ceiling"]
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
