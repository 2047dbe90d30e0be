"""Event-time order of events and labels (streams/sync.py): the pure rules, and the
waits of the shared frontiers (threads and an event loop, no Kafka, no Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import doctest
import itertools
import math
import random
import threading
import time
from typing import Any

import pytest
from river.stream import simulate_qa

from streams import sync as sync_module
from streams.scoring import BatchOutput
from streams.sync import (
    ORDER_TICKS_PER_SECOND,
    UNTIMED,
    EventTimeSync,
    Frontier,
    Idle,
    merge_by_time,
    message_time,
    ready_count,
)
from streams.worker import merge_outputs
from weir.errors import SpecError
from weir.spec import parse_spec


def test_doctests() -> None:
    result = doctest.testmod(sync_module)
    assert result.attempted >= 10 and result.failed == 0


def _frontier(times: list[float], done: int) -> Frontier:
    """A side with ``times`` to process, ``done`` of them processed (its topic has no more)."""
    if done >= len(times):
        return Frontier(caught_up=True)
    return Frontier(head=times[done])


def _interleave(event_ts: list[float], label_ts: list[float], batch: int) -> list[tuple[str, int]]:
    """Both sides of role ``all`` driven by the rules alone: the scorer takes runs of up to
    ``batch`` events, the learner the labels due, until both are done."""
    order: list[tuple[str, int]] = []
    e = lab = 0
    while e < len(event_ts) or lab < len(label_ts):
        n = ready_count(event_ts[e : e + batch], _frontier(label_ts, lab), tie_first=False)
        order += [("event", i) for i in range(e, e + n)]
        e += n
        m = ready_count(label_ts[lab:], _frontier(event_ts, e), tie_first=True)
        order += [("label", j) for j in range(lab, lab + m)]
        lab += m
        assert n + m > 0, f"neither side may go at event {e}, label {lab}"
    return order


def _river_order(n: int, delay: Any) -> list[tuple[str, int]]:
    rows: list[tuple[dict[Any, Any], Any]] = [({"i": i}, i) for i in range(n)]
    return [("label" if y is not None else "event", i) for i, _, y in simulate_qa(rows, None, delay)]


@pytest.mark.parametrize("k", [1, 7, 30])
@pytest.mark.parametrize("batch", [1, 13, 500])
def test_constant_delay_is_rivers_order(k: int, batch: int) -> None:
    # event i at ts i, its label at i + k: River's progressive_val_score(delay=k)
    n = 200
    order = _interleave([float(i) for i in range(n)], [float(i + k) for i in range(n)], batch)
    assert order == _river_order(n, k)


def test_varying_delays_are_rivers_order() -> None:
    # Delays on the order's grid (eighths of a second, none 0: a label cannot come with its
    # own event) order exactly as River does.
    rng = random.Random(3)
    n = 300
    delays = [
        rng.choice([0, 1, 2, 5, 40]) + rng.randint(1, ORDER_TICKS_PER_SECOND) / ORDER_TICKS_PER_SECOND
        for _ in range(n)
    ]
    # the labels topic holds them in the order they became known (their ts)
    by_ts = sorted(range(n), key=lambda i: (i + delays[i], i))
    order = _interleave([float(i) for i in range(n)], [i + delays[i] for i in by_ts], batch=64)
    learned = [("label", by_ts[j]) if kind == "label" else (kind, j) for kind, j in order]
    assert learned == _river_order(n, lambda x, _: delays[x["i"]])


def test_times_off_the_grid_are_ordered_to_within_a_tick() -> None:
    # Any times: a label learned before an event became known less than a tick after it,
    # and an event scored before a label is not after it (River's rule, to a tick).
    rng = random.Random(4)
    n = 400
    event_ts = sorted(rng.uniform(0, 40) for _ in range(n))
    label_ts = sorted(t + rng.uniform(0, 3) for t in event_ts)
    order = _interleave(event_ts, label_ts, batch=64)
    tick = 1 / ORDER_TICKS_PER_SECOND
    learned = float("-inf")
    for kind, i in order:
        if kind == "label":
            learned = max(learned, label_ts[i])
        else:
            assert learned < event_ts[i] + tick, (i, learned, event_ts[i])
    assert [i for kind, i in order if kind == "event"] == list(range(n))
    scored = float("-inf")
    for kind, i in order:
        if kind == "event":
            scored = max(scored, event_ts[i])
        else:
            assert scored <= label_ts[i], (i, scored, label_ts[i])


def test_a_dense_stream_goes_in_runs_of_a_tick() -> None:
    # 500 events/s with labels 2 s late, both a backlog: runs of about a tick of the stream
    # (62 events), not of one event (the hand-offs a worker behind could not keep up with).
    event_ts = [i / 500 for i in range(5000)]
    order = _interleave(event_ts, [t + 2 for t in event_ts], batch=500)
    runs = sum(1 for a, b in itertools.pairwise(order) if a[0] == "label" and b[0] == "event")
    assert runs <= 5000 / 500 * ORDER_TICKS_PER_SECOND + 1, runs


def test_an_untimed_label_goes_at_once() -> None:
    assert ready_count([UNTIMED, 5.0], Frontier(head=0.0), tie_first=True) == 1
    # ... and events wait for it (it is the labels' head)
    assert ready_count([0.0], Frontier(head=UNTIMED), tie_first=False) == 0


def test_merge_by_time_keeps_each_partitions_order() -> None:
    rng = random.Random(5)
    items = [(rng.randrange(3), rng.random() * 100) for _ in range(200)]
    merged = merge_by_time(items, lambda t: t[0], lambda t: t[1])
    assert sorted(merged) == sorted(items)
    for p in range(3):
        assert [t for t in merged if t[0] == p] == [t for t in items if t[0] == p]
    # per-partition sorted input: fully sorted output
    runs = sorted(items, key=lambda t: (t[0], t[1]))
    assert [t[1] for t in merge_by_time(runs, lambda t: t[0], lambda t: t[1])] == sorted(t[1] for t in items)
    one = [(0, 3.0), (0, 1.0)]
    assert merge_by_time(one, lambda t: t[0], lambda t: t[1]) == one


def test_idle_waits_once_per_move_of_the_other_side() -> None:
    idle = Idle(max_idle=2.0)
    assert idle.left(1, now=100.0) == 2.0
    assert idle.left(1, now=101.5) == 0.5
    assert idle.left(1, now=103.0) == 0.0
    assert idle.left(1, now=200.0) == 0.0  # still stuck: no more waiting
    assert idle.left(2, now=200.0) == 2.0


def test_message_time() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "task": "binary",
            "fields": {"a": "numeric"},
            "features": [{"agg": "raw", "field": "a"}],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
        }
    )
    assert message_time(b'{"ts": 1700000000.5, "event_id": "e"}', spec) == 1700000000.5
    assert message_time(b'{"ts": "2023-11-14T22:13:20Z"}', spec) == 1700000000.0
    for untimed in (b'{"event_id": "e"}', b"not json", None, b"[1]", b'{"ts": "soon"}'):
        assert message_time(untimed, spec) == UNTIMED
    # A label without ts is ordered at its Kafka timestamp; its own ts wins; junk stays untimed.
    assert message_time(b'{"event_id": "e", "label": 1}', spec, arrived=1700000001.0) == 1700000001.0
    assert message_time(b'{"event_id": "e", "ts": 1700000000}', spec, arrived=1700000001.0) == 1700000000.0
    for junk in (b"not json", None, b"[1]", b'{"ts": "soon"}'):
        assert message_time(junk, spec, arrived=1700000001.0) == UNTIMED


def test_labels_without_ts_do_not_hold_back_a_backlog_of_events() -> None:
    """A worker behind by more than max_idle: its events are a backlog and ordered. The
    labels in hand carry no ts; at their arrival time (now) they are after every event of
    the backlog, so the scorer takes the whole batch; at UNTIMED it would take none."""
    now = 1_000.0
    backlog = [now - 30 + i * 0.01 for i in range(500)]  # 30 s behind, one batch
    arrived = Frontier(head=now - 0.5, version=1)  # the learner holds a label read 0.5 s ago
    assert ready_count(backlog, arrived, tie_first=False, live_from=now - 1.0) == 500
    untimed = Frontier(head=UNTIMED, version=1)
    assert ready_count(backlog, untimed, tie_first=False, live_from=now - 1.0) == 0


def _spec_with(scoring: dict[str, Any]) -> Any:
    return parse_spec(
        {
            "name": "p",
            "task": "binary",
            "fields": {"a": "numeric"},
            "features": [{"agg": "raw", "field": "a"}],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
            "scoring": scoring,
        }
    )


def test_max_idle_setting() -> None:
    assert _spec_with({}).scoring.max_idle == 1.0
    assert _spec_with({"max_idle": "2s"}).scoring.max_idle == 2.0
    assert _spec_with({"max_idle": 0}).scoring.max_idle == 0.0
    for bad in (-1, "1h"):
        with pytest.raises(
            SpecError, match=r"scoring\.max_idle: max_idle must be between 0 and 300 seconds.*'1s'"
        ):
            _spec_with({"max_idle": bad})
    assert sync_module.sync_for(_spec_with({"max_idle": 0}), None) is None


def test_scorer_waits_for_labels_published_from_another_thread() -> None:
    waited: list[tuple[str, float]] = []
    sync = EventTimeSync(max_idle=5.0, on_wait=lambda who, s: waited.append((who, s)))
    sync.publish_labels(head=10.0)

    async def main() -> tuple[int, float]:
        sync.bind(asyncio.get_running_loop())
        # the learner learns the label at 10 on its thread, then its next label is at 13
        threading.Timer(0.1, lambda: sync.publish_labels(head=13.0)).start()
        t0 = time.monotonic()
        n = await sync.wait_labels([9.0, 10.0, 12.0, 13.0])  # 9 goes at once
        assert n == 1
        n = await sync.wait_labels([10.0, 12.0, 13.0])
        return n, time.monotonic() - t0

    n, took = asyncio.run(main())
    assert n == 2  # 10 and 12; 13 waits for the label at 13
    assert 0.05 < took < 2.0
    assert [w for w, _ in waited] == ["scorer"] and 0.05 < waited[0][1] < 2.0


@pytest.mark.parametrize(
    ("labels", "bound"),
    [
        (Frontier(), 0.1),  # nothing in hand, no known lag: idle, max_idle
        (Frontier(head=10.0), 1.0),  # labels in hand that the learner is learning: BUSY_IDLE times
        (Frontier(behind=True), 1.0),  # nothing in hand but more on the broker: busy too
    ],
    ids=["idle", "in-hand", "behind"],
)
def test_scorer_stops_waiting_for_labels_that_do_not_move(labels: Frontier, bound: float) -> None:
    sync = EventTimeSync(max_idle=0.1)
    sync.publish_labels(head=1.0)  # the learner has said where it is: version 1, not starting
    sync.publish_labels(labels.head, labels.caught_up, labels.behind)
    assert sync.labels.version == 2

    async def main() -> list[tuple[int, float]]:
        sync.bind(asyncio.get_running_loop())
        out = []
        for times in ([11.0, 12.0], [12.0]):
            t0 = time.monotonic()
            out.append((await sync.wait_labels(times), time.monotonic() - t0))
        return out

    (n1, t1), (n2, t2) = asyncio.run(main())
    assert (n1, n2) == (2, 1)
    assert bound * 0.9 < t1 < bound * 4 + 0.2  # waited once...
    assert t2 < 0.05  # ...and not again until the labels move


def test_labels_caught_up_means_no_wait() -> None:
    sync = EventTimeSync(max_idle=5.0)
    sync.publish_labels(head=None, caught_up=True)

    async def main() -> int:
        sync.bind(asyncio.get_running_loop())
        return await sync.wait_labels([1e12, 2e12])

    t0 = time.monotonic()
    assert asyncio.run(main()) == 2
    assert time.monotonic() - t0 < 0.5


def test_learner_waits_for_events_on_its_thread() -> None:
    sync = EventTimeSync(max_idle=5.0)
    sync.publish_events(head=3.0)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(sync.wait_events([3.0, 4.0, 9.0], timeout=5.0)))
    t.start()
    t.join()
    assert got == [1]  # the label at 3 goes before the event at 3; the one at 4 waits
    t = threading.Thread(target=lambda: got.append(sync.wait_events([4.0, 9.0], timeout=5.0)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    sync.publish_events(head=8.0)
    t.join(2.0)
    assert got == [1, 1]
    # nothing moves: 0 after the timeout (the learner sweeps, asks again)...
    assert sync.wait_events([9.0], timeout=0.05) == 0
    # ...and all of it once the events have not moved for long enough
    sync.learner_idle.since -= 100.0  # the scorer holds events: BUSY_IDLE * max_idle
    assert sync.wait_events([9.0, 10.0], timeout=0.05) == 2


def test_publishing_the_same_frontier_is_not_a_move() -> None:
    sync = EventTimeSync(max_idle=1.0)
    sync.publish_labels(head=1.0)
    v = sync.labels.version
    sync.publish_labels(head=1.0)
    assert sync.labels.version == v
    sync.publish_labels(head=None, caught_up=True)
    assert sync.labels.version == v + 1
    assert math.isinf(UNTIMED) and UNTIMED < 0


def test_merge_outputs_merges_every_field() -> None:
    p: list[Any] = ["p1", "p2"]
    d: list[Any] = ["d1"]
    a = BatchOutput(predictions=p[:1], dead_letters=d, duplicates=1, late_ignored=2, max_ts=5.0)
    b = BatchOutput(predictions=p[1:], dead_letters=[], duplicates=3, late_ignored=0, max_ts=4.0)
    merged = merge_outputs([a, b])
    assert merged == BatchOutput(predictions=p, dead_letters=d, duplicates=4, late_ignored=2, max_ts=5.0)
    # a field added to BatchOutput must be merged too: this lists the ones that are
    assert {f.name for f in dataclasses.fields(BatchOutput)} == {
        "predictions",
        "dead_letters",
        "duplicates",
        "late_ignored",
        "max_ts",
    }
    assert merge_outputs([a]) is a


def test_live_events_never_wait_and_labels_wait_for_the_events_before_them() -> None:
    # within max_idle of the wall clock: live, not a backlog (labels in flight are not waited for)
    sync = EventTimeSync(max_idle=1.0, clock=lambda: 1000.0)
    sync.publish_labels(head=500.0)  # the learner has an old label in hand
    sync.publish_events(head=500.0)

    async def main() -> int:
        sync.bind(asyncio.get_running_loop())
        return await sync.wait_labels([999.5, 1000.2])

    t0 = time.monotonic()
    assert asyncio.run(main()) == 2
    assert time.monotonic() - t0 < 0.5
    # A live label still waits for the events before it (the scorer behind by more than
    # the label's delay would else find no served record: an early label, held and swept).
    assert sync.wait_events([999.0, 2000.0], timeout=0.2) == 0
    sync.publish_events(head=1000.5)  # the scorer passed 999
    assert sync.wait_events([999.0, 2000.0], timeout=0.2) == 1
    sync.publish_events(head=None, caught_up=True)
    assert sync.wait_events([2000.0], timeout=0.2) == 1
    # a backlog event still waits: the old label goes first, the event at 999 after it
    assert ready_count([400.0, 600.0, 999.0], sync.labels, tie_first=False, live_from=sync.live_from()) == 1
