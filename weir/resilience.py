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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from weir.errors import StackError
from weir.metrics import DependencyMetrics

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


#: Redis replies that report the server's state, not the command's fault (a replica during a
#: failover, a full or misconfigured server, a script holding it, a revoked ACL).
_REDIS_STATE_PREFIXES = (
    "LOADING",
    "MASTERDOWN",
    "TRYAGAIN",
    "OOM ",
    "READONLY ",
    "NOPERM ",
    "MISCONF ",
    "CLUSTERDOWN ",
    "BUSY ",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``raise ... from``), each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__


def _is_kafka(exc: BaseException) -> bool:
    from confluent_kafka import KafkaException  # its module is "cimpl", not confluent_kafka

    return isinstance(exc, KafkaException)


def _transient_one(exc: BaseException) -> bool:
    mod = type(exc).__module__
    if mod.startswith("redis"):
        import redis.exceptions as rexc

        if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | rexc.BusyLoadingError):
            return True
        if isinstance(exc, rexc.OutOfMemoryError | rexc.ReadOnlyError | rexc.NoPermissionError):
            return True
        # A Redis Cluster in a failover or a resharding: a slot that moved (MOVED, ASK; the
        # client has already updated its slot map, so the next call goes to the new owner),
        # a slot not served yet, the cluster down or out of redirections.
        if isinstance(exc, rexc.AskError | rexc.TryAgainError | rexc.ClusterError | rexc.SlotNotCoveredError):
            return True
        return isinstance(exc, rexc.ResponseError) and str(exc).startswith(_REDIS_STATE_PREFIXES)
    if _is_kafka(exc):
        return True  # a broker that is down or not answering
    return isinstance(exc, StackError | ConnectionError | TimeoutError | asyncio.TimeoutError | OSError)


def is_transient(exc: BaseException) -> bool:
    """True for failures that a server's return cures: retry them, do not dead-letter.

    Looks through the ``__cause__`` chain (the feature engine wraps Redis errors in
    ``FeatureError``) and counts the Redis replies that report the server's state
    (``OOM``, ``READONLY``, ``NOPERM``, ``LOADING``...) as transient.

    Examples:
        >>> from weir.errors import FeatureError
        >>> is_transient(FeatureError("bad value"))
        False
        >>> try:
        ...     raise FeatureError("Redis failed") from TimeoutError("timed out")
        ... except FeatureError as exc:
        ...     is_transient(exc)
        True
    """
    return any(_transient_one(e) for e in _chain(exc))


def dependency_of(exc: BaseException) -> Dependency:
    """Which server a transient failure is about (for the metrics)."""
    for e in _chain(exc):
        mod = type(e).__module__
        if mod.startswith("redis"):
            return "redis"
        if _is_kafka(e) or mod.startswith(("aiokafka", "kafka")):
            return "kafka"
    return "redis" if "redis" in str(exc).lower() else "kafka"


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
        m = DependencyMetrics(registry)
        for dep in DEPENDENCIES:
            m.up.labels(pipeline, dep).set(1)
            m.retries.labels(pipeline, dep)
        self.up, self.retries = m.up, m.retries

    def ok(self, dependency: str) -> None:
        if self.up is not None:
            self.up.labels(self.pipeline, dependency).set(1)

    def failed(self, dependency: str) -> None:
        if self.up is not None and self.retries is not None:
            self.up.labels(self.pipeline, dependency).set(0)
            self.retries.labels(self.pipeline, dependency).inc()


class _Outage:
    """The bookkeeping both retry loops share: metrics, one log line when a server goes
    away and one when it is back, and the backoff's attempt count."""

    def __init__(self, what: str, health: DependencyHealth | None, backoff: Backoff) -> None:
        self.what, self.health, self.backoff = what, health, backoff
        self.attempt = 0
        self.since: float | None = None
        self.dependency: str | None = None

    def failed(self, exc: BaseException) -> float:
        """Record a transient failure; the seconds to wait before the next try."""
        self.dependency = dependency_of(exc)
        if self.health is not None:
            self.health.failed(self.dependency)
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s failed (%s: %s); retrying with backoff", self.what, type(exc).__name__, exc)
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        return delay

    def succeeded(self) -> None:
        if self.since is None:
            return
        log.warning(
            "%s succeeded again after %.1fs (%d retries)",
            self.what,
            time.monotonic() - self.since,
            self.attempt,
        )
        if self.health is not None and self.dependency is not None:
            self.health.ok(self.dependency)


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
    outage = _Outage(what, health, backoff)
    while True:
        try:
            result = await op()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = outage.failed(exc)
            if stop is not None and stop():
                raise
            await asyncio.sleep(delay)
            continue
        outage.succeeded()
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
    outage = _Outage(what, health, backoff)
    while True:
        try:
            result = op()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = outage.failed(exc)
            if stop is not None and stop.is_set():
                raise
            time.sleep(delay)
            continue
        outage.succeeded()
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
