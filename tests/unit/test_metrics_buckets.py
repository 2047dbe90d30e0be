"""The latency histograms' buckets resolve p50 and p99 below 100 ms (issue #12 point 5)."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import CollectorRegistry

from weir.metrics import LATENCY_BUCKETS, REDIS_BUCKETS, WorkerMetrics


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, REDIS_BUCKETS])
def test_buckets_are_increasing(buckets: tuple[float, ...]) -> None:
    assert list(buckets) == sorted(set(buckets))


def test_latency_buckets_span_1ms_to_10s() -> None:
    assert LATENCY_BUCKETS[0] <= 0.001
    assert LATENCY_BUCKETS[-1] >= 10.0


def test_latency_buckets_are_fine_below_100ms() -> None:
    # histogram_quantile interpolates inside one bucket: its width is the reading's error.
    # 1 ms steps up to 5 ms, then no bucket wider than half its lower bound up to 100 ms.
    below = [b for b in LATENCY_BUCKETS if b <= 0.1]
    for lo, hi in itertools.pairwise(below):
        assert hi - lo <= max(0.001 + 1e-12, 0.5 * lo + 1e-12), (lo, hi)
    # A 1-2-5 series (0.01, 0.02, 0.05) would fail: 20 -> 50 ms is a 150% step.
    assert any(0.02 < b < 0.05 for b in LATENCY_BUCKETS)


def test_worker_histograms_use_them() -> None:
    m = WorkerMetrics(CollectorRegistry())
    m.latency.labels("p").observe(0.012)
    # 0.012 s falls in the (0.01, 0.015] bucket.
    name = "weir_event_to_prediction_seconds_bucket"
    assert m.registry.get_sample_value(name, {"pipeline": "p", "le": "0.01"}) == 0
    assert m.registry.get_sample_value(name, {"pipeline": "p", "le": "0.015"}) == 1
