"""Riding out outages of Redis and Kafka: bounded exponential backoff and its metrics.

Every long-running Weir process (worker, learner, monitor) wraps the calls that touch a
server in :func:`retry_async` or :func:`retry_sync`. A *transient* failure (connection
refused or reset, a timeout, an undelivered Kafka batch) pauses the caller and retries the
same operation after a backoff that doubles from ``initial`` up to ``maximum`` seconds (with
jitter), forever or until ``stop`` is set. The process neither exits nor moves on: the batch
in hand is retried whole, so nothing is acked that was not done. Any other exception is not
retried: it is a bug or a poison message, handled by the caller.

While a dependency is failing, ``weir_dependency_up{pipeline,dependency}`` is 0 and
``weir_dependency_retries_total`` counts the retries; the ``WeirDependencyDown`` alert in
``deploy/prometheus/rules/weir.rules.yml`` fires on them.

Examples:
    >>> b = Backoff(initial=0.1, maximum=1.0, jitter=0.0)
    >>> [b.delay(n) for n in range(6)]
    [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from weir.errors import StackError

log = logging.getLogger("weir.resilience")

T = TypeVar("T")

Dependency = Literal["redis", "kafka"]
#: The dependencies whose health every process reports (init_series creates them at 1).
DEPENDENCIES: tuple[str, ...] = ("redis", "kafka")


@dataclass(frozen=True)
class Backoff:
    """Delays of bounded exponential backoff: ``initial * 2**n`` capped at ``maximum``,
    each stretched by up to ``jitter`` (a fraction) so many processes do not retry in step."""

    initial: float = 0.1
    maximum: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        d = min(self.maximum, self.initial * (2 ** min(attempt, 30)))
        if self.jitter:
            d *= 1.0 + random.random() * self.jitter
        return round(d, 6)


def is_transient(exc: BaseException) -> bool:
    """True for failures that a server's return cures: retry them, do not dead-letter."""
    try:
        import redis.exceptions as rexc

        if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | rexc.BusyLoadingError):
            return True
        if isinstance(exc, rexc.ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN")):
            return True
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    try:
        from confluent_kafka import KafkaException

        if isinstance(exc, KafkaException):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, StackError | ConnectionError | TimeoutError | asyncio.TimeoutError | OSError)


def dependency_of(exc: BaseException) -> Dependency:
    """Which server a transient failure is about (for the metrics)."""
    mod = type(exc).__module__
    if mod.startswith("redis"):
        return "redis"
    if mod.startswith(("confluent_kafka", "aiokafka", "kafka")):
        return "kafka"
    text = str(exc).lower()
    return "redis" if "redis" in text else "kafka"


class DependencyHealth:
    """``weir_dependency_up`` and ``weir_dependency_retries_total`` of one process.

    Shared by every part of a process (a worker with role ``all`` scores and learns on one
    registry), so it is created once per registry.
    """

    def __init__(self, registry: CollectorRegistry | None, pipeline: str) -> None:
        self.pipeline = pipeline
        self.up: Gauge | None = None
        self.retries: Counter | None = None
        if registry is None:
            return
        up: Gauge
        retries: Counter
        found = registry._names_to_collectors.get("weir_dependency_up")
        if found is not None:
            up = found  # type: ignore[assignment]
            retries = registry._names_to_collectors["weir_dependency_retries"]  # type: ignore[assignment]
        else:
            up = Gauge(
                "weir_dependency_up",
                "1 while the last call to this server succeeded, 0 while it is being retried.",
                ["pipeline", "dependency"],
                registry=registry,
            )
            retries = Counter(
                "weir_dependency_retries_total",
                "Retries of a call to a server that failed transiently (outage, timeout).",
                ["pipeline", "dependency"],
                registry=registry,
            )
        for dep in DEPENDENCIES:
            up.labels(pipeline, dep).set(1)
            retries.labels(pipeline, dep)
        self.up, self.retries = up, retries

    def ok(self, dependency: str) -> None:
        if self.up is not None:
            self.up.labels(self.pipeline, dependency).set(1)

    def failed(self, dependency: str) -> None:
        if self.up is not None and self.retries is not None:
            self.up.labels(self.pipeline, dependency).set(0)
            self.retries.labels(self.pipeline, dependency).inc()


async def retry_async(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    health: DependencyHealth | None = None,
    backoff: Backoff = Backoff(),
    stop: Callable[[], bool] | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Await ``op()`` until it succeeds; transient failures are retried with backoff.

    Raises the last error if ``stop()`` turns true while retrying, and any non-transient
    error at once.
    """
    attempt = 0
    down_since: float | None = None
    dep: str | None = None
    while True:
        try:
            result = await op()
        except Exception as exc:
            if not transient(exc):
                raise
            dep = dependency_of(exc)
            if health is not None:
                health.failed(dep)
            if down_since is None:
                down_since = time.monotonic()
                log.warning("%s failed (%s: %s); retrying with backoff", what, type(exc).__name__, exc)
            if stop is not None and stop():
                raise
            await asyncio.sleep(backoff.delay(attempt))
            attempt += 1
            continue
        if down_since is not None:
            log.warning(
                "%s succeeded again after %.1fs (%d retries)", what, time.monotonic() - down_since, attempt
            )
            if health is not None and dep is not None:
                health.ok(dep)
        return result


def retry_sync(
    op: Callable[[], T],
    *,
    what: str,
    health: DependencyHealth | None = None,
    backoff: Backoff = Backoff(),
    stop: threading.Event | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """The blocking twin of :func:`retry_async`, for the learner's and monitor's threads."""
    attempt = 0
    down_since: float | None = None
    dep: str | None = None
    while True:
        try:
            result = op()
        except Exception as exc:
            if not transient(exc):
                raise
            dep = dependency_of(exc)
            if health is not None:
                health.failed(dep)
            if down_since is None:
                down_since = time.monotonic()
                log.warning("%s failed (%s: %s); retrying with backoff", what, type(exc).__name__, exc)
            if stop is not None and stop.is_set():
                raise
            time.sleep(backoff.delay(attempt))
            attempt += 1
            continue
        if down_since is not None:
            log.warning(
                "%s succeeded again after %.1fs (%d retries)", what, time.monotonic() - down_since, attempt
            )
            if health is not None and dep is not None:
                health.ok(dep)
        return result


__all__ = [
    "DEPENDENCIES",
    "Backoff",
    "DependencyHealth",
    "dependency_of",
    "is_transient",
    "retry_async",
    "retry_sync",
]
