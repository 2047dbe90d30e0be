"""Event-time order of events and labels in role ``all`` (issue #16, point 1).

When both the events and the labels topics hold a backlog (a replay, a catch-up after an
outage, a new pipeline on old data), the scorer and the embedded learner would each read
theirs as fast as they can, and the scorer would score most of the backlog before the
learner learned from it. Kafka Streams orders two topics of one task by the timestamps of
their buffered heads, waiting at most ``max.task.idle.ms`` for a side that has nothing in
hand; role ``all`` does the same between its two consumers:

* an event at ``ts`` is scored once every label with a ts at or before ``ts`` is learned
  (the labels' head, the next label to learn, is later than ``ts``), or the labels are
  caught up (nothing in hand, the consumer at the high watermark);
* symmetrically, a label at ``ts`` is learned once every event before ``ts`` is scored
  (the events' head is at or after ``ts``), or the events are caught up. A label that came
  before its event was scored would be held (``early``) and learned only by the learner's
  periodic sweep, which would reorder it again.

Ties go to the label, as in ``river.evaluate.progressive_val_score``: with labels ``k``
seconds after their events, event ``i`` is then scored by a model that learned exactly the
labels of events ``0 .. i-k``.

**A live event never waits.** An event whose ts is within ``max_idle`` of the wall clock
is live: a live label due before it is at most that old, in flight, and waiting for the
labels stream to pass every live event would add its fetch latency to every prediction.
Labels caught up (nothing in hand, the consumer at the high watermark) never make the
scorer wait either. **A label always waits for the events before it** (bounded as below):
that costs the predictions nothing, and a label learned while its event is still unscored
is ``early``, held in Redis and resolved by the learner's sweep. Live labels were exempt
once, and a worker that fell more than the labels' delay behind turned every label early,
the extra work keeping it behind (issue #12: the benchmark's role ``all`` at 1,179 events/s,
17,757 of 23,586 live labels early; now none, and at 850 events/s p50/p99 126/439 ->
96/299 ms).

**Bounded waits.** A side that waits for the other stops waiting once the other has not
moved for ``scoring.max_idle`` seconds (a learner stuck on an outage, a labels topic no one
writes), and waits again only after the other moves (Kafka Streams' idle rule). A side that
is busy (:meth:`Frontier.busy`: it holds items, is starting, or, the learner, has nothing in
hand but more labels wait on the broker) is waited for :data:`BUSY_IDLE` times longer: only
a side with nothing in hand and no known lag is idle (Kafka Streams since KIP-695 waits for
a partition with known lag). A learner between two fetches of a backlog, flushing its
training log or taking a snapshot on a loaded machine, was once taken for idle after one
second: the scorer scored the rest of the backlog before it learned from it (a CI run of the
burst fidelity test, 0.823 against River's 0.882). The learner itself says when a labels
partition that returns nothing is to be taken as caught up (:class:`EmptyFetches`: after as
long as a busy side is waited for, and it logs it). The scorer does not say it is behind: a
learner that gives up on a scorer between two batches takes its labels early (held, then
resolved by the sweep: nothing lost), while making the learner wait for the scorer too cost
role ``all`` backlog rate in alternating runs of ``bench/e2e.py --systems weir-all`` (1,336,
1,598, 1,223, 1,804 events/s with both sides, 1,567 and 1,952 with the learner's side only;
the race of the two consumers makes these runs noisy). With no backlog nothing waits: the
labels are caught up, and scoring is as before.

The decisions are pure functions (:func:`ready_count`, :func:`merge_by_time`,
:class:`Idle`); :class:`EventTimeSync` holds the two sides' :class:`Frontier` for the two
threads that publish and wait (the scorer on the event loop, the learner's consumer on a
worker thread). No Kafka, no Redis here.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson

from weir.errors import InvalidMessage
from weir.spec import PipelineSpec

log = logging.getLogger("weir.worker")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

#: Which side waits: ``scorer`` waits for labels, ``learner`` for events.
Waiter = Literal["scorer", "learner"]
WAITERS: tuple[Waiter, ...] = ("scorer", "learner")

#: The event time of a message whose ts cannot be read: before everything, so it never
#: waits (an invalid event or label is dead-lettered anyway). A valid label without ts is
#: ordered at its Kafka timestamp instead (:func:`message_time`).
UNTIMED = -math.inf

#: The order's resolution: event times in the same 1/ORDER_TICKS_PER_SECOND of a second
#: (125 ms) are one instant (a label there goes before the events there). Ordering dense
#: streams item by item makes runs of one event and one label, each a hand-off between the
#: scorer and the learner (a wake-up, a Redis round trip each way): a worker behind by more
#: than ``max_idle`` then went at the hand-offs' pace and never caught up (a soak at 500
#: events/s, labels 2 s late, stalled 15 s, stayed ~20,000 events behind). An eighth of a
#: second, like a stream processor's periodic watermark, makes runs of an eighth of a
#: second of the stream. Times on the grid (whole seconds, eighths) order exactly as
#: before; a power of two, so that they map exactly (a tenth has no exact binary float).
ORDER_TICKS_PER_SECOND = 8


def order_time(ts: float) -> float:
    """The instant ``ts`` falls in, in ticks (:data:`ORDER_TICKS_PER_SECOND`); infinities as
    they are. A multiplication, not a division, so whole seconds map exactly.

    Examples:
        >>> order_time(12.0), order_time(12.1), order_time(12.125), order_time(-math.inf)
        (96, 96, 97, -inf)
    """
    return math.floor(ts * ORDER_TICKS_PER_SECOND) if math.isfinite(ts) else ts


#: A side waits this many ``max_idle`` for the other while the other holds the items due
#: first (it is processing them), and ``max_idle`` while it has nothing in hand.
BUSY_IDLE = 10


@dataclass(frozen=True, slots=True)
class Frontier:
    """Where one side is in event time, as the other side sees it.

    Attributes:
        head: ts of the next item this side will process (None: nothing in hand).
        caught_up: nothing in hand and its consumer at the high watermark.
        version: bumps on every change: the other side's idle clock restarts then.
        behind: nothing in hand, but more items wait on the broker (it is fetching them,
            or busy between fetches): not idle (:meth:`busy`). The learner says so
            (:class:`streams.live.OrderedLearnerLoop`); the scorer does not (see below).
    """

    head: float | None = None
    caught_up: bool = False
    version: int = 0
    behind: bool = False

    def busy(self) -> bool:
        """Is this side working towards its next item, so that the other side waits for it
        :data:`BUSY_IDLE` times ``max_idle``: it holds items (it is processing them), has
        not said anything yet (it is starting: loading, assigning, fetching), or knows it
        is behind. Only a side with nothing in hand and no known lag is idle in Kafka
        Streams' sense (KIP-695: a partition with known lag is waited for, not idled on).

        Examples:
            >>> Frontier(head=3.0, version=2).busy(), Frontier(version=0).busy()
            (True, True)
            >>> Frontier(version=2, behind=True).busy(), Frontier(version=2).busy()
            (True, False)
        """
        return self.head is not None or self.version == 0 or self.behind


def ready(ts: float, other: Frontier, *, tie_first: bool, live_from: float = math.inf) -> bool:
    """May the item at ``ts`` be processed now, given the other side's frontier?

    ``tie_first``: this side goes first on a tie (the labels: a label at ``ts`` is learned
    before an event at ``ts`` is scored). An item at or after ``live_from`` (the wall clock
    less ``max_idle``) is live, not a backlog: it never waits.

    Examples:
        >>> ready(10.0, Frontier(head=12.0), tie_first=False)  # an event before the next label
        True
        >>> ready(12.0, Frontier(head=12.0), tie_first=False)  # the label at 12 goes first
        False
        >>> ready(12.0, Frontier(head=12.0), tie_first=True)  # the label, with an event at 12 next
        True
        >>> ready(99.0, Frontier(caught_up=True), tie_first=False)  # nothing to wait for
        True
        >>> ready(1.0, Frontier(), tie_first=True)  # the other side has not said where it is
        False
        >>> ready(1.0, Frontier(), tie_first=True, live_from=0.5)  # live
        True
        >>> ready(12.05, Frontier(head=12.0), tie_first=False)  # one instant: the label first
        False
    """
    if other.caught_up or ts >= live_from:
        return True
    if other.head is None:
        return False
    mine, theirs = order_time(ts), order_time(other.head)
    return mine <= theirs if tie_first else mine < theirs


def ready_count(
    times: Sequence[float], other: Frontier, *, tie_first: bool, live_from: float = math.inf
) -> int:
    """How many of the next items (their event times, in processing order) may go now.

    Items go in order, so the count stops at the first that must wait.

    Examples:
        >>> ready_count([1.0, 2.0, 3.0, 2.5], Frontier(head=3.0), tie_first=False)
        2
        >>> ready_count([1.0, 2.0, 3.0], Frontier(head=3.0), tie_first=True)
        3
        >>> ready_count([5.0, 1.0], Frontier(head=3.0), tie_first=False)
        0
    """
    if other.caught_up:
        return len(times)
    n = 0
    for ts in times:
        if not ready(ts, other, tie_first=tie_first, live_from=live_from):
            break
        n += 1
    return n


def merge_by_time(
    items: Sequence[T], partition: Callable[[T], Hashable], ts: Callable[[T], float]
) -> list[T]:
    """The items in event-time order across partitions, each partition's order kept.

    Like Kafka Streams' partition group: repeatedly take the head with the smallest ts
    among the partitions' heads (on a tie, the one that arrived first). A partition's own
    order is never changed (an entity's events stay in the order its features expect).

    Examples:
        >>> batch = [("p0", 5), ("p0", 6), ("p1", 1), ("p1", 7), ("p0", 2)]
        >>> merge_by_time(batch, lambda m: m[0], lambda m: m[1])
        [('p1', 1), ('p0', 5), ('p0', 6), ('p0', 2), ('p1', 7)]
    """
    groups: dict[Hashable, list[tuple[float, int, T]]] = {}
    for i, item in enumerate(items):
        groups.setdefault(partition(item), []).append((ts(item), i, item))
    if len(groups) <= 1:
        return list(items)
    # heapq.merge compares the heads only: exactly the head-by-head pick, sorted or not.
    return [item for _, _, item in heapq.merge(*groups.values(), key=lambda t: (t[0], t[1]))]


def consumed_all(positions: Mapping[K, int], highwaters: Mapping[K, int | None]) -> bool:
    """True when every partition's position (the next offset to read) reached its high
    watermark. An unknown high watermark (None or negative) is not reached.

    Examples:
        >>> consumed_all({0: 10, 1: 4}, {0: 10, 1: 4})
        True
        >>> consumed_all({0: 10}, {0: 10, 1: 4})  # nothing read from partition 1
        False
        >>> consumed_all({0: 10}, {0: None})
        False
    """
    return all(hw is not None and hw >= 0 and positions.get(k, -1) >= hw for k, hw in highwaters.items())


def message_time(value: bytes | None, spec: PipelineSpec, arrived: float | None = None) -> float:
    """The ``ts`` of an event or label message; for an object without one, ``arrived``
    (a label's Kafka timestamp: when it became known), else :data:`UNTIMED`.

    Only the ts is read (the scorer and the learner validate the whole message later).
    A label without ts must not be ordered before everything: while the embedded learner
    held one, every event would wait for it, so a worker more than ``max_idle`` behind
    (its events a backlog) scored one learner step at a time and never caught up (a
    30-minute soak at 500 events/s fell behind for good after a load spike). At its
    arrival time it is after every event produced before it, which is what the order is
    for: no event waits for a label that became known after it.

    Examples:
        >>> from weir.spec import load_spec
        >>> spec = load_spec("examples/demo.yaml")
        >>> message_time(b'{"event_id": "e1", "label": 1, "ts": 1700000000}', spec, arrived=1700000009.0)
        1700000000.0
        >>> message_time(b'{"event_id": "e1", "label": 1}', spec, arrived=1700000009.0)
        1700000009.0
        >>> message_time(b'{"event_id": "e1", "label": 1}', spec), message_time(b"[", spec, arrived=9.0)
        (-inf, -inf)
    """
    from weir.contracts import parse_ts

    try:
        obj = orjson.loads(value or b"")
        if not isinstance(obj, dict):
            return UNTIMED
        if "ts" in obj:
            return parse_ts(obj["ts"], "ts", spec)
        return UNTIMED if arrived is None else arrived
    except (orjson.JSONDecodeError, InvalidMessage, TypeError, ValueError):
        return UNTIMED


@dataclass(slots=True)
class Idle:
    """Kafka Streams' idle rule for one waiting side.

    :meth:`left` is how much longer to wait for the other side at ``version`` of its
    frontier: ``max_idle`` from the first wait at that version. Once that ran out, it is
    0 at once until the other side moves (a new version). When the other side is ``busy``
    (it holds the items due first and is processing them: a learner taking a snapshot on
    a loaded machine), the wait is :data:`BUSY_IDLE` times longer: only a side with nothing
    in hand is idle in Kafka Streams' sense.

    Examples:
        >>> idle = Idle(max_idle=1.0)
        >>> idle.left(version=3, now=10.0), idle.left(version=3, now=10.5)
        (1.0, 0.5)
        >>> idle.left(version=3, now=11.5), idle.left(version=3, now=12.0)  # gave up on v3
        (0.0, 0.0)
        >>> idle.left(version=4, now=12.0)  # the other side moved: wait again
        1.0
        >>> idle.left(version=5, now=20.0, busy=True)
        10.0
    """

    max_idle: float
    version: int = -1
    since: float = 0.0
    logged: int = -1  # the version it last said it gave up on

    def left(self, version: int, now: float, busy: bool = False) -> float:
        if version != self.version:
            self.version, self.since = version, now
        return max(0.0, self.since + self.max_idle * (BUSY_IDLE if busy else 1) - now)


@dataclass(slots=True)
class EmptyFetches:
    """When a side that is behind (more items wait on the broker) is to be taken as caught up
    because its fetches keep finding nothing: a partition that cannot be read (its leader
    down, its watermarks unknown) is then not waited for again every time the other
    partitions move, as Kafka Streams stops idling for a partition.

    The bound is the one the other side waits for a busy side (:data:`BUSY_IDLE` times
    ``max_idle``): a consumer whose next fetch is merely slow (a loaded machine, a broker
    pausing) is still behind, not caught up. It was ``max_idle`` once, which turned a
    learner whose fetch took over a second into "caught up" without a word, and the scorer
    then scored on without the labels due first.

    Examples:
        >>> empty = EmptyFetches(max_idle=1.0)
        >>> empty.stuck(fetched=False, now=100.0), empty.stuck(fetched=False, now=109.0)
        (False, False)
        >>> empty.stuck(fetched=False, now=110.0)  # nothing for 10 x max_idle
        True
        >>> empty.stuck(fetched=True, now=111.0), empty.stuck(fetched=False, now=112.0)
        (False, False)
    """

    max_idle: float
    since: float | None = None

    @property
    def limit(self) -> float:
        """Seconds of empty fetches after which the side is taken as caught up."""
        return self.max_idle * BUSY_IDLE

    def stuck(self, fetched: bool, now: float) -> bool:
        """``fetched``: the last fetch returned items (or the side is at its end)."""
        if fetched:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.limit


@dataclass
class EventTimeSync:
    """The two frontiers of role ``all``, shared by the scorer and the embedded learner.

    The scorer publishes and waits on the event loop (:meth:`wait_labels`, async); the
    learner's consumer waits on its worker thread (:meth:`wait_events`, blocking) and
    publishes from either thread. ``on_wait(waiter, seconds)`` counts the time waited
    (``weir_event_order_wait_seconds_total``).
    """

    max_idle: float
    on_wait: Callable[[Waiter, float], None] | None = None
    events: Frontier = field(default_factory=Frontier)
    labels: Frontier = field(default_factory=Frontier)
    clock: Callable[[], float] = time.time

    def live_from(self) -> float:
        """Events at or after this event time are live (within ``max_idle`` of the wall
        clock): they never wait. A live label with a ts at or before a live event is at
        most ``max_idle`` old, still in flight (fetched, or about to be); waiting for it
        would add that to every prediction. Labels have no such exemption (see the module
        doc)."""
        return self.clock() - self.max_idle

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._labels_moved: asyncio.Event | None = None
        self.scorer_idle = Idle(self.max_idle)
        self.learner_idle = Idle(self.max_idle)
        #: The scorer is waiting for labels now: the learner takes what it has at once
        #: rather than waiting to fill a batch (:meth:`streams.live.OrderedLearnerLoop.fill_seconds`).
        self.scorer_waiting = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The scorer's event loop (where :meth:`wait_labels` runs)."""
        self._loop = loop
        self._labels_moved = asyncio.Event()

    # -- publishing -----------------------------------------------------------------

    def publish_events(self, head: float | None, caught_up: bool = False) -> None:
        with self._cond:
            if (head, caught_up) == (self.events.head, self.events.caught_up):
                return
            self.events = Frontier(head, caught_up, self.events.version + 1)
            self._cond.notify_all()

    def publish_labels(self, head: float | None, caught_up: bool = False, behind: bool = False) -> None:
        with self._cond:
            old = self.labels
            if (head, caught_up, behind) == (old.head, old.caught_up, old.behind):
                return
            self.labels = Frontier(head, caught_up, old.version + 1, behind)
        loop, moved = self._loop, self._labels_moved
        if loop is None or moved is None:
            return
        if _running_loop() is loop:  # role all's learning step, on the loop's own thread
            moved.set()  # no self-pipe write and wake-up, as call_soon_threadsafe costs
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(moved.set)

    # -- waiting --------------------------------------------------------------------

    def _gave_up(self, who: Waiter, idle: Idle, other: Frontier, ts: float) -> None:
        if idle.logged == other.version:
            return
        idle.logged = other.version
        what = ("labels", "event") if who == "scorer" else ("events", "label")
        log.warning(
            "%s: the %s have not moved for %gs (%s); going on with the next %s (ts %s) without "
            "waiting for them until they move (scoring.max_idle)",
            who,
            what[0],
            self.max_idle * (BUSY_IDLE if other.busy() else 1),
            f"next at ts {other.head}"
            if other.head is not None
            else "nothing in hand, behind"
            if other.behind
            else "nothing in hand, not caught up",
            what[1],
            ts,
        )

    def _waited(self, who: Waiter, seconds: float) -> None:
        if self.on_wait is not None and seconds > 0:
            self.on_wait(who, seconds)

    async def wait_labels(self, times: Sequence[float]) -> int:
        """The scorer: how many of the next events (their times, in order) to score now.

        Waits while none may go (the labels are behind the first event), at most until the
        labels have not moved for ``max_idle``; then all of them go.
        """
        while True:
            labels = self.labels
            n = ready_count(times, labels, tie_first=False, live_from=self.live_from())
            if n:
                return n
            left = self.scorer_idle.left(labels.version, time.monotonic(), labels.busy())
            if left <= 0 or self._labels_moved is None:
                self._gave_up("scorer", self.scorer_idle, labels, times[0])
                return len(times)
            self._labels_moved.clear()
            if self.labels.version != labels.version:
                continue  # moved between the read and the clear
            t0 = time.monotonic()
            self.scorer_waiting = True
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._labels_moved.wait(), left)
            finally:
                self.scorer_waiting = False
                self._waited("scorer", time.monotonic() - t0)

    def wait_events(self, times: Sequence[float], timeout: float) -> int:
        """The learner (blocking, on its own thread): how many of the next labels to learn.

        Waits while none may go, at most ``timeout`` seconds (then 0: the caller does its
        periodic work and asks again) and at most until the events have not moved for
        ``max_idle`` (then all of them go). Live labels wait too (no ``live_from``).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = self.events
                n = ready_count(times, events, tie_first=True)
                if n:
                    return n
                now = time.monotonic()
                left = self.learner_idle.left(events.version, now, events.busy())
                if left <= 0:
                    self._gave_up("learner", self.learner_idle, events, times[0])
                    return len(times)
                if now >= deadline:
                    return 0
                self._cond.wait(min(left, deadline - now))
                self._waited("learner", time.monotonic() - now)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None (a worker thread)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def sync_for(spec: PipelineSpec, metrics: Any | None) -> EventTimeSync | None:
    """The sync of a role ``all`` worker, or None when ``scoring.max_idle`` is 0."""
    if spec.scoring.max_idle <= 0:
        return None
    on_wait: Callable[[Waiter, float], None] | None = None
    if metrics is not None:
        counters = {w: metrics.order_wait.labels(spec.name, w) for w in WAITERS}

        def on_wait(who: Waiter, seconds: float) -> None:
            counters[who].inc(seconds)

    return EventTimeSync(spec.scoring.max_idle, on_wait)
