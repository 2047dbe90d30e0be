"""The pipeline's Redis memory, sampled with SCAN and MEMORY USAGE on the real Redis."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from weir.footprint import SCAN_COUNT, SCANS_PER_STEP, STEP_KEYS, RedisFootprint
from weir.metrics import LearnerMetrics


def test_a_pass_counts_and_sizes_the_pipeline_keys_by_kind(redis_client: Any, unique: str) -> None:
    prefix = f"weir:fp-{unique}"
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"{prefix}:served:e{i}", b"\x01" + b"x" * 160, ex=60)
    for i in range(20):
        pipe.zadd(f"{prefix}:win:u{i}", {f"{k:012d}|1.0": k for k in range(50)})
        pipe.expire(f"{prefix}:win:u{i}", 60)
    pipe.set(f"{prefix}-other:served:e0", b"not this pipeline's", ex=60)
    # A kind of a few keys of very different sizes (like recent or join): measured whole.
    pipe.hset(f"{prefix}:recent:1", mapping={f"e{i}": "x" * 100 for i in range(2000)})
    pipe.hset(f"{prefix}:recent:2", mapping={"e0": "x"})
    pipe.expire(f"{prefix}:recent:1", 60)
    pipe.expire(f"{prefix}:recent:2", 60)
    pipe.execute()
    recent_bytes = sum(redis_client.memory_usage(f"{prefix}:recent:{n}", samples=5) for n in (1, 2))
    metrics = LearnerMetrics(CollectorRegistry())
    footprint = RedisFootprint(prefix, "p", metrics)
    try:
        steps = 1
        while not footprint.step(redis_client):
            steps += 1
            assert steps < 100_000
        assert {k: n for k, (n, _) in footprint.last.items()} == {"served": 300, "win": 20, "recent": 2}
        assert footprint.last["recent"][1] == recent_bytes
        served_bytes = footprint.last["served"][1] / 300
        win_bytes = footprint.last["win"][1] / 20
        assert 160 < served_bytes < 400, served_bytes  # a 161-byte value and its key
        assert 50 * 10 < win_bytes < 50 * 200, win_bytes
        value = metrics.registry.get_sample_value
        assert value("weir_redis_keys", {"pipeline": "p", "kind": "served"}) == 300
        assert value("weir_redis_memory_bytes", {"pipeline": "p", "kind": "win"}) == footprint.last["win"][1]
        assert value("weir_redis_maxmemory_bytes", {"pipeline": "p"}) is not None
        # A kind that is gone reads 0 at the next pass.
        redis_client.delete(*[f"{prefix}:served:e{i}" for i in range(300)])
        while not footprint.step(redis_client):
            pass
        assert value("weir_redis_keys", {"pipeline": "p", "kind": "served"}) == 0
    finally:
        for key in redis_client.scan_iter(match=f"weir:fp-{unique}*", count=1000):
            redis_client.unlink(key)


def test_a_pass_over_a_redis_shared_with_other_keys_takes_few_steps(redis_client: Any, unique: str) -> None:
    """A step scans until it holds STEP_KEYS of the pipeline's keys (at most SCANS_PER_STEP
    calls): 60,000 keys of someone else took one call per step, six steps and more (12 s at
    the learner's pace, minutes on a Redis of 660,000 keys) before the gauges had a series."""
    prefix, other = f"weir:fp-{unique}", f"fp-other-{unique}"
    pipe = redis_client.pipeline(transaction=False)
    for i in range(100):
        pipe.set(f"{prefix}:served:e{i}", b"x" * 50, ex=120)
    for i in range(60_000):
        pipe.set(f"{other}:{i}", b"1", ex=120)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    try:
        size = redis_client.dbsize()
        footprint = RedisFootprint(prefix, "p")
        steps = 1
        while not footprint.step(redis_client):
            steps += 1
        assert {k: n for k, (n, _) in footprint.last.items()} == {"served": 100}
        one_call_a_step = size // SCAN_COUNT  # at least as many steps with one SCAN call each
        assert steps <= size // (SCAN_COUNT * SCANS_PER_STEP // 3) + 2 < one_call_a_step, (steps, size)
    finally:
        for pattern in (f"{prefix}:*", f"{other}:*"):
            batch = list(redis_client.scan_iter(match=pattern, count=10_000))
            for at in range(0, len(batch), 10_000):
                redis_client.unlink(*batch[at : at + 10_000])


class _ScanSpy:
    """The real client, its SCAN calls' COUNT recorded (nothing else changed)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.counts: list[int] = []

    def scan(self, cursor: int, match: str, count: int) -> Any:
        self.counts.append(count)
        return self.client.scan(cursor, match=match, count=count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_step_collects_its_keys_in_short_scan_calls(redis_client: Any, unique: str) -> None:
    """A SCAN call holds Redis for its length (a call of 10,000 slots ~12 ms on a loaded
    2-core machine, in the scorers' way): a step collects STEP_KEYS of the pipeline's keys in
    several calls of SCAN_COUNT slots, not in one call of STEP_KEYS."""
    prefix = f"weir:fp-{unique}"
    pipe = redis_client.pipeline(transaction=False)
    for i in range(STEP_KEYS + 2_000):
        pipe.set(f"{prefix}:served:e{i}", b"x", ex=120)
    pipe.execute()
    try:
        spy = _ScanSpy(redis_client)
        footprint = RedisFootprint(prefix, "p")
        footprint.step(spy)
        assert spy.counts and set(spy.counts) == {SCAN_COUNT} and SCAN_COUNT <= 2_000, spy.counts
        assert len(spy.counts) >= 3, spy.counts  # ~STEP_KEYS / SCAN_COUNT calls for a step's keys
        steps = 1
        while not footprint.step(spy):
            steps += 1
        assert footprint.last["served"][0] == STEP_KEYS + 2_000
    finally:
        batch = list(redis_client.scan_iter(match=f"{prefix}:*", count=10_000))
        for at in range(0, len(batch), 10_000):
            redis_client.unlink(*batch[at : at + 10_000])
