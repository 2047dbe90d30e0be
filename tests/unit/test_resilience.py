"""weir.resilience: bounded backoff, transient vs fatal errors, and the dependency metrics."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis.exceptions as rexc
from prometheus_client import CollectorRegistry

from weir.resilience import Backoff, DependencyHealth, is_transient, retry_async, retry_sync

FAST = Backoff(initial=0.001, maximum=0.004, jitter=0.0)


def test_backoff_doubles_up_to_its_bound() -> None:
    b = Backoff(initial=0.1, maximum=1.0, jitter=0.0)
    assert [b.delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert Backoff(initial=0.1, maximum=1.0, jitter=0.5).delay(10) <= 1.5


def test_transient_errors_are_the_servers_not_the_code() -> None:
    assert is_transient(rexc.ConnectionError("refused"))
    assert is_transient(rexc.TimeoutError("timed out"))
    assert not is_transient(ValueError("bad feature"))
    assert not is_transient(rexc.ResponseError("WRONGTYPE Operation against a key"))
    # A Redis Cluster failover: a transaction sent on a stale slot map (redis-py raises the
    # redirection once its own retry is spent) is retried, not fatal.
    assert is_transient(rexc.MovedError("14681 127.0.0.1:7005"))
    assert is_transient(rexc.TryAgainError("Multiple keys request during rehashing of slot"))
    assert is_transient(rexc.ClusterDownError("The cluster is down"))
    assert is_transient(rexc.ClusterError("TTL exhausted."))


def test_retry_async_rides_out_an_outage_and_reports_it() -> None:
    registry = CollectorRegistry()
    health = DependencyHealth(registry, "p")
    calls: list[int] = []
    seen_down: list[float | None] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise rexc.ConnectionError("Connection refused")
        seen_down.append(
            registry.get_sample_value("weir_dependency_up", {"pipeline": "p", "dependency": "redis"})
        )
        return "ok"

    assert asyncio.run(retry_async(op, what="features", health=health, backoff=FAST)) == "ok"
    assert len(calls) == 4
    assert seen_down == [0.0], "the gauge is 0 while the outage lasts"
    labels = {"pipeline": "p", "dependency": "redis"}
    assert registry.get_sample_value("weir_dependency_up", labels) == 1.0
    assert registry.get_sample_value("weir_dependency_retries_total", labels) == 3.0
    assert registry.get_sample_value("weir_dependency_up", {"pipeline": "p", "dependency": "kafka"}) == 1.0


def test_retry_does_not_retry_a_bug() -> None:
    calls: list[int] = []

    def op() -> None:
        calls.append(1)
        raise KeyError("x")

    with pytest.raises(KeyError):
        retry_sync(op, what="learn", backoff=FAST)
    assert calls == [1]


def test_retry_sync_gives_up_when_stopped() -> None:
    stop = threading.Event()
    stop.set()

    def op() -> None:
        raise rexc.TimeoutError("Timeout reading from socket")

    with pytest.raises(rexc.TimeoutError):
        retry_sync(op, what="join", backoff=FAST, stop=stop)


def test_one_health_per_registry_is_shared() -> None:
    registry = CollectorRegistry()
    a = DependencyHealth(registry, "p")
    b = DependencyHealth(registry, "p")
    a.failed("kafka")
    assert b.up is a.up
    assert registry.get_sample_value("weir_dependency_up", {"pipeline": "p", "dependency": "kafka"}) == 0.0
