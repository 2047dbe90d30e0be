"""The scorer's fault handling without Kafka or Redis: poison isolation and transient retries.

The feature engine here is an in-memory stand-in (the Redis engine has its own tests); what
is tested is the Scorer's logic around it: which failures are retried, which are poison,
and that every event ends as a prediction or a ``model_error`` dead letter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
import redis.exceptions as rexc
from prometheus_client import CollectorRegistry

from features.base import FeatureResult
from streams.scoring import RawMessage, Scorer, is_transient_failure, isolate
from tests.unit.doubles import StaticModel
from weir.errors import FeatureError, StackError
from weir.metrics import WorkerMetrics
from weir.resilience import Backoff, DependencyHealth
from weir.spec import PipelineSpec, parse_spec
from weir.types import Event

FAST = Backoff(initial=0.001, maximum=0.001, jitter=0.0)


def _spec() -> PipelineSpec:
    return parse_spec(
        {
            "name": "p",
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}],
            "late_events": "ignore",
            "model": {"name": "m", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )


class PoisonModel:
    """A classifier that raises on one input value (a model bug one event triggers)."""

    def __init__(self, poison: float) -> None:
        self.poison = poison

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        if x.get("x") == self.poison:
            raise ValueError(f"cannot score x={x['x']}")
        return {False: 0.25, True: 0.75}


class MemoryFeatures:
    """Raw features from the event, idempotent by event_id like the Redis engine.

    ``fail_times`` makes the next calls raise ``error`` first; ``poison_x`` makes a call
    containing that value raise FeatureError (a bug one event triggers).
    """

    def __init__(
        self, fail_times: int = 0, error: BaseException | None = None, poison_x: float | None = None
    ):
        self.fail_times = fail_times
        self.error = error
        self.poison_x = poison_x
        self.calls = 0
        self.seen: dict[str, dict[str, Any]] = {}

    async def acompute_batch(
        self, redis: Any, events: Sequence[Event], positions: Sequence[Any] | None = None
    ) -> list[FeatureResult]:
        self.calls += 1
        if self.fail_times:
            self.fail_times -= 1
            assert self.error is not None
            raise self.error
        if self.poison_x is not None and any(e.data.get("x") == self.poison_x for e in events):
            raise FeatureError(f"the feature script failed in Redis: bad x={self.poison_x}")
        out = []
        for e in events:
            if e.event_id in self.seen:
                out.append(FeatureResult("duplicate", self.seen[e.event_id]))
            else:
                self.seen[e.event_id] = {"x": e.data.get("x")}
                out.append(FeatureResult("ok", self.seen[e.event_id]))
        return out


def _msgs(xs: Sequence[float]) -> list[RawMessage]:
    now = time.time()
    return [
        RawMessage(
            orjson.dumps({"event_id": f"e{i}", "entity_id": "a", "ts": now, "data": {"x": x}}),
            None,
            "ev",
            0,
            i,
            now,
        )
        for i, x in enumerate(xs)
    ]


# -- isolate -----------------------------------------------------------------------------


def test_isolate_finds_every_poison_item_and_keeps_order() -> None:
    calls: list[int] = []

    async def run(xs: Sequence[int]) -> list[int]:
        calls.append(len(xs))
        if any(x % 97 == 13 for x in xs):
            raise ValueError("poison")
        return [x * 2 for x in xs]

    items = list(range(500))
    ok, bad = asyncio.run(isolate(items, run))
    assert [x for x, _ in bad] == [x for x in items if x % 97 == 13]
    assert all(isinstance(e, ValueError) for _, e in bad)
    assert [x for x, _ in ok] == [x for x in items if x % 97 != 13]
    assert all(r == x * 2 for x, r in ok)
    assert len(calls) < 120, f"bisection should need few runs for 6 poisons in 500, took {len(calls)}"


def test_isolate_one_poison_costs_a_logarithmic_number_of_runs() -> None:
    n = 0

    async def run(xs: Sequence[int]) -> list[int]:
        nonlocal n
        n += 1
        if 321 in xs:
            raise RuntimeError("boom")
        return list(xs)

    ok, bad = asyncio.run(isolate(list(range(512)), run))
    assert [x for x, _ in bad] == [321] and len(ok) == 511
    assert n <= 1 + 2 * 9


def test_isolate_lets_a_transient_failure_through_for_the_caller_to_retry() -> None:
    async def run(xs: Sequence[int]) -> list[int]:
        raise rexc.TimeoutError("Timeout reading from socket")

    with pytest.raises(rexc.TimeoutError):
        asyncio.run(isolate([1, 2, 3], run))


def test_isolate_refuses_a_run_that_loses_results() -> None:
    async def run(xs: Sequence[int]) -> list[int]:
        return list(xs)[:-1]

    with pytest.raises(ValueError, match="2 results for 3 items"):
        asyncio.run(isolate([1, 2, 3], run))


# -- transient or poison -------------------------------------------------------------------


def _raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (rexc.TimeoutError("Timeout reading from socket"), True),
        (rexc.ConnectionError("Connection refused"), True),
        (_raised_from(FeatureError("Redis failed during a feature batch"), rexc.TimeoutError("t")), True),
        (_raised_from(FeatureError("the feature script failed"), rexc.NoPermissionError("no evalsha")), True),
        (rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"), True),
        (rexc.ReadOnlyError("You can't write against a read only replica."), True),
        (rexc.ResponseError("MISCONF Redis is configured to save RDB snapshots"), True),
        (StackError("Kafka did not acknowledge 3 record(s)"), True),
        (
            _raised_from(
                FeatureError("the feature script failed"), rexc.ResponseError("Error running script")
            ),
            False,
        ),
        (FeatureError("feature 'x': expected numeric, got 'abc'"), False),
        (ValueError("cannot score"), False),
        (ZeroDivisionError("division by zero"), False),
    ],
)
def test_transient_or_poison(exc: BaseException, transient: bool) -> None:
    assert is_transient_failure(exc) is transient


# -- Scorer.process --------------------------------------------------------------------------


def _scorer(features: Any, model: Any = None, registry: CollectorRegistry | None = None) -> Scorer:
    spec = _spec()
    metrics = WorkerMetrics(registry).init_series(spec) if registry is not None else None
    health = DependencyHealth(registry, spec.name)
    return Scorer(
        spec,
        features,
        StaticModel(model or PoisonModel(poison=-1.0), "m", "v1.42"),
        metrics,
        health=health,
        backoff=FAST,
    )


def test_a_model_error_on_one_event_dead_letters_it_and_scores_the_rest() -> None:
    registry = CollectorRegistry()
    scorer = _scorer(MemoryFeatures(), PoisonModel(poison=13.0), registry)
    msgs = _msgs([1.0, 2.0, 13.0, 4.0, 5.0, 13.0, 7.0])
    out = asyncio.run(scorer.process(msgs, redis=None))
    assert sorted(p.event_id for p in out.predictions) == ["e0", "e1", "e3", "e4", "e6"]
    assert [(d.reason, d.offset) for d in out.dead_letters] == [("model_error", 2), ("model_error", 5)]
    assert "ValueError: cannot score x=13.0" in out.dead_letters[0].detail
    assert out.dead_letters[0].value == msgs[2].value  # the original, to replay it
    scorer.observe(msgs, out, 0.01)
    get = registry.get_sample_value
    assert get("weir_dead_letters_total", {"pipeline": "p", "reason": "model_error"}) == 2
    # Labelled by model version, not by snapshot: the series do not grow with snapshots.
    assert get("weir_predictions_total", {"pipeline": "p", "model": "m", "model_version": "v1"}) == 5
    assert get("weir_predictions_total", {"pipeline": "p", "model": "m", "model_version": "v1.42"}) is None


def test_a_model_that_raises_on_everything_dead_letters_everything_without_stalling() -> None:
    class Broken:
        def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
            raise KeyError("weights")

    out = asyncio.run(_scorer(MemoryFeatures(), Broken()).process(_msgs([1.0, 2.0, 3.0]), redis=None))
    assert out.predictions == []
    assert [d.reason for d in out.dead_letters] == ["model_error"] * 3


def test_a_feature_error_on_one_event_is_isolated_and_the_others_keep_their_first_features() -> None:
    features = MemoryFeatures(poison_x=66.0)
    out = asyncio.run(_scorer(features).process(_msgs([1.0, 66.0, 3.0, 4.0]), redis=None))
    assert sorted(p.event_id for p in out.predictions) == ["e0", "e2", "e3"]
    assert [(d.reason, d.offset) for d in out.dead_letters] == [("model_error", 1)]
    assert "FeatureError" in out.dead_letters[0].detail
    # Re-running halves after a failed call is safe: features are idempotent by event_id.
    assert {p.event_id: p.features for p in out.predictions} == {
        "e0": {"x": 1.0},
        "e2": {"x": 3.0},
        "e3": {"x": 4.0},
    }


def test_a_redis_outage_is_retried_on_the_same_batch_and_shows_in_the_metrics() -> None:
    registry = CollectorRegistry()
    outage = _raised_from(FeatureError("Redis failed during a feature batch"), rexc.TimeoutError("t"))
    features = MemoryFeatures(fail_times=3, error=outage)
    scorer = _scorer(features, registry=registry)
    out = asyncio.run(scorer.process(_msgs([1.0, 2.0, 3.0]), redis=None))
    assert [p.event_id for p in out.predictions] == ["e0", "e1", "e2"]
    assert out.dead_letters == [] and out.duplicates == 0
    assert features.calls == 4
    get = registry.get_sample_value
    assert get("weir_dependency_retries_total", {"pipeline": "p", "dependency": "redis"}) == 3
    assert get("weir_dependency_up", {"pipeline": "p", "dependency": "redis"}) == 1


def test_the_dependency_gauge_is_zero_while_the_retries_last() -> None:
    registry = CollectorRegistry()
    features = MemoryFeatures(fail_times=10**6, error=rexc.ConnectionError("Connection refused"))
    scorer = _scorer(features, registry=registry)

    async def run() -> float | None:
        task = asyncio.create_task(scorer.process(_msgs([1.0]), redis=None))
        await asyncio.sleep(0.05)
        seen = registry.get_sample_value("weir_dependency_up", {"pipeline": "p", "dependency": "redis"})
        assert not task.done(), "the scorer gave up on the batch during an outage"
        features.fail_times = 0  # the server is back
        out = await asyncio.wait_for(task, 5)
        assert [p.event_id for p in out.predictions] == ["e0"]
        return seen

    assert asyncio.run(run()) == 0
    assert registry.get_sample_value("weir_dependency_up", {"pipeline": "p", "dependency": "redis"}) == 1


class FlakyPipeline:
    """A redis-py pipeline stand-in whose first ``fail`` executes raise a timeout."""

    def __init__(self, client: FlakyRedis) -> None:
        self.client = client
        self.ops: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> None:
            self.ops.append((name, args))

        return queue

    async def execute(self) -> list[Any]:
        self.client.executes += 1
        if self.client.fail:
            self.client.fail -= 1
            raise rexc.TimeoutError("Timeout reading from socket")
        self.client.done.extend(self.ops)
        return [True] * len(self.ops)


class FlakyRedis:
    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.executes = 0
        self.done: list[tuple[str, Any]] = []

    def pipeline(self, transaction: bool = False) -> FlakyPipeline:
        return FlakyPipeline(self)


def test_served_records_are_retried_until_stored() -> None:
    from models.join import ServedStore

    spec = _spec()
    registry = CollectorRegistry()
    scorer = Scorer(
        spec,
        MemoryFeatures(),
        StaticModel(PoisonModel(-1.0), "m", "v1"),
        WorkerMetrics(registry).init_series(spec),
        ServedStore(spec),
        health=DependencyHealth(registry, spec.name),
        backoff=FAST,
    )
    client = FlakyRedis(fail=2)
    out = asyncio.run(scorer.process(_msgs([1.0, 2.0]), redis=None))
    asyncio.run(scorer.record_served(out, client))
    assert client.executes == 3
    ops = [op for op, _ in client.done]
    assert ops == ["execute_command"], ops  # stored once, after the failures: one call for the batch
    command = client.done[0][1]
    assert command[0] == "EVAL" and command[2] == 1, command[:3]  # one declared key (Redis Cluster routing)
    records = command[9:]  # after EVAL, the script, its key count, the key and 5 arguments
    assert len(records) == 2 * 2, records  # (event id, record) of both predictions
    assert (
        registry.get_sample_value("weir_dependency_retries_total", {"pipeline": "p", "dependency": "redis"})
        == 2
    )


def test_observe_many_equals_observing_one_by_one() -> None:
    import random

    from prometheus_client import CollectorRegistry, Histogram

    from streams.scoring import observe_many
    from weir.metrics import LATENCY_BUCKETS

    rng = random.Random(3)
    values = [rng.expovariate(20.0) for _ in range(500)] + [0.0, 0.001, 0.0010001, 99.0]
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat_seconds", "x", ["p"], buckets=LATENCY_BUCKETS, registry=r1)
    h2 = Histogram("lat_seconds", "x", ["p"], buckets=LATENCY_BUCKETS, registry=r2)
    for v in values:
        h1.labels("a").observe(v)
    observe_many(h2.labels("a"), values)
    observe_many(h2.labels("a"), [])
    s1 = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in next(iter(h1.collect())).samples}
    s2 = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in next(iter(h2.collect())).samples}
    s1.pop(("lat_seconds_created", (("p", "a"),)), None)
    s2.pop(("lat_seconds_created", (("p", "a"),)), None)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s2[k] == pytest.approx(s1[k], rel=1e-12), k
