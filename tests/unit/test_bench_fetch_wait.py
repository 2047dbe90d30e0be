"""bench/fetch_wait.py's quantile of what a cumulative latency histogram gained between scrapes."""

from __future__ import annotations

from bench.fetch_wait import bucket_quantile


def test_quantile_reads_only_what_the_histogram_gained_between_the_scrapes() -> None:
    before = {"0.005": 100.0, "0.01": 100.0, "0.1": 100.0, "+Inf": 100.0}  # all fast, earlier
    after = {"0.005": 100.0, "0.01": 150.0, "0.1": 199.0, "+Inf": 200.0}
    # gained: 50 at <= 10 ms, 49 more at <= 100 ms, 1 beyond: the earlier 100 do not count
    assert bucket_quantile(before, after, 0.5) == 10.0
    assert bucket_quantile(before, after, 0.51) == 100.0
    assert bucket_quantile(before, after, 0.99) == 100.0
    assert bucket_quantile(before, after, 1.0) == float("inf")


def test_quantile_of_nothing_gained_is_none() -> None:
    h = {"0.01": 3.0, "+Inf": 3.0}
    assert bucket_quantile(h, h, 0.5) is None
    assert bucket_quantile({}, {}, 0.5) is None
