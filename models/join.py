"""The label join: delayed labels meet the features that were *served*, never recomputed.

Redis keys (``P`` = ``spec.redis_prefix``, ``weir:{<name>}``, when ``spec.redis.buckets``
is 1; else the event's bucket prefix, see "Buckets" below), all with a TTL of
``labels.horizon``:

* ``P:served:{event_id}`` - the served record (compact: the features as served as packed
  doubles, their names kept once per pipeline; prediction, proba, model_version, ts,
  entity_id, scored_at; see :class:`ServedStore`), written by the scorer through
  :meth:`ServedStore.awrite` (one script command per batch, per node with buckets), and
  deleted by the learner once the label joined to it is in a published snapshot.
* ``P:join:pending`` - sorted set of served event ids by deadline (scored_at + horizon);
  the learner's sweep counts those past their deadline as expiries (no label came). A
  learned event stays until its deadline with the score negated (``-deadline``): after its
  served record is deleted, that is what tells a second label for it (a ``duplicate``)
  from an early one.
* ``P:join:expired`` - sorted set of event ids whose horizon passed, kept one more horizon,
  so a label arriving after the horizon is told apart from an early one.
* ``P:early:{event_id}`` + ``P:join:early`` - labels that arrived before their event was
  scored, held until the *learner's periodic sweep* finds the served record (the scorer
  is never slowed by label work) or the horizon passes (outcome ``unknown``).

**Learned, without a key per event.** A label message is read once per learner run
(manual assignment); after a crash the learner seeks to its snapshot's labels offsets and
reads again what the lost model state had learned. So: a label message at an offset the
learner already passed (its snapshot's, or this run's) is a ``duplicate`` without a look at
Redis. A learned label marks its served record with ``run:seq`` (a prefix of the record,
:data:`_MARKED`), which :class:`Lineage` reads to learn again what a lost model state had
learned; and negates its pending score. So a second label message for the event (another
offset) is a ``duplicate`` while the record lives (marked by a run the model contains) and
after it was deleted (the negated pending entry, until the event's deadline). After the
deadline it finds nothing: it is held as early and counts ``unknown`` at its own deadline,
never learned.

**Bounded by the horizon, with or without a learner.** Every per-event key has a TTL of
one horizon. The sorted sets are trimmed by whoever writes them: each scorer batch drops
the pending ids whose deadline passed more than a horizon ago (a learner that is down
longer than that does not count their expiries) and the learner's holds and sweeps trim
theirs; each set also expires two horizons after its last write. So with no learner
running, the join holds the served records of the last horizon and at most two horizons
of pending ids; nothing grows with the stream's length.

**Retried calls.** A call that timed out may still have been applied (a paused Redis
runs the queued commands when it resumes). Every write here is idempotent: served records
and holds are ``SET NX`` (a retried hold that finds its own body counts as ``early``, not
``duplicate``), a record is marked again with the same marker, sorted-set adds are ``NX``
and a pending score is negated only while positive.

**Round trips.** A label batch costs one script call (:data:`_JOIN_LUA`): it writes the
marks of the labels learned before (queued by :meth:`LabelJoiner.mark_learned`) and the
deletions of served records, then reads the batch's state (:func:`read_state`); the
decisions are pure functions of it (:func:`decide_labels`, :func:`held_by_another`,
:func:`decide_held`), tested without Redis (tests/unit/test_join_decisions.py).
Early labels add one script call to hold them (:data:`_HOLD_LUA`). The sweep moves expiries in bounded script
calls (:data:`EXPIRE_CHUNK`) and looks at :data:`SWEEP_HELD_CHUNK` held labels at most.

**Buckets (Redis Cluster stage 2, docs/scaling.md).** With ``spec.redis.buckets`` B > 1 an
event's keys are under ``JP = weir:{<name>#j<b>}``, ``b = crc32(event_id) mod B``
(:func:`weir.slots.bucket_of`; the scorer and the learner compute it from the event id
alone): ``JP:served:<event>``, ``JP:early:<event>``, and each bucket has its own
``JP:join:pending``, ``JP:join:expired`` and ``JP:join:early``. Every call above becomes
one call per node (the nodes owning the buckets the batch touches; redis-py's slot map,
:func:`weir.slots.group_by_node`): the same stage-1 script run once per bucket inside one
``EVAL`` (:func:`per_bucket`: it declares one key, names the other buckets' in ARGV and
starts with ``#!lua flags=allow-cross-slot-keys``, Redis >= 7.0; see :data:`_CROSS_SLOT`
for what Redis 7.0.15 requires). Round trips: the scorer's served records, one call per
node, in parallel (:meth:`ServedStore.awrite`); a label batch, one join call per node,
plus one hold call per node its early labels touch; the sweep, per node: the expiries
(:data:`EXPIRE_CHUNK` shared by the node's buckets, at most :data:`EXPIRE_CALLS` calls), a
look at each bucket's share of :data:`SWEEP_HELD_CHUNK` held labels (``SWEEP_HELD_CHUNK //
B``, at least 1, each bucket its own cursor, so none starves), their state (the join call)
and the deletion of the holds done with. With more buckets than :data:`EXPIRE_CHUNK` (or
:data:`SWEEP_HELD_CHUNK`) a sweep walks that many of them, the next ones at the next sweep
(:class:`BucketWindow`). The learner's calls go to the nodes in turn. A call some of whose
slots are no longer on its node (a ``MOVED``, a "non local key": a failover, a resharding)
reloads the slot map and raises a transient error: the whole step is retried, regrouped;
what was applied (other nodes, or a script's buckets before the failing one) is applied
again with no effect (above). B == 1 is stage 1: the same scripts, keys and calls as
without buckets.

Outcomes, counted in ``weir_label_joins_total{outcome}``, one per label on arrival:
``hit`` (learned now), ``early`` (held), ``duplicate`` (its message already read, its event
already learned, or a label already held),
``expired`` (its served record is gone: the horizon passed), ``invalid`` (dead-lettered);
and later, for held labels, ``resolved`` (learned by a sweep) or ``unknown`` (never served),
exactly one of them: a resolved label's hold stays until a published snapshot has it, and
one whose horizon passed first (no registry, or a horizon shorter than the snapshot
interval) leaves without an ``unknown`` (the joiner remembers what it resolved).
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import uuid
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from models.steps import Io, Step, arun_step, run_step
from weir.contracts import Example, prediction_from_dict
from weir.slots import (
    acall_checked,
    bucket_of,
    bucket_prefix,
    call_checked,
    ensure_slot_map,
    group_by_node,
)
from weir.spec import PipelineSpec
from weir.types import DeadLetter, Label, Prediction

Outcome = Literal["hit", "early", "duplicate", "expired", "invalid", "resolved", "unknown"]
OUTCOMES: tuple[str, ...] = (
    "hit",
    "early",
    "duplicate",
    "expired",
    "invalid",
    "resolved",
    "unknown",
)
#: Held (early) labels looked at per sweep: a backlog of them is walked in chunks,
#: round robin, over several sweeps (three GETs each; a chunk is ~1,500 pipelined ops).
SWEEP_HELD_CHUNK = 500


def _px(spec: PipelineSpec) -> int:
    return max(1, int(spec.labels.horizon * 1000))


class Keys:
    """Key names of the join, in one place.

    With ``spec.redis.buckets`` B == 1 every key is under ``spec.redis_prefix``
    (``weir:{<name>}``, one hash slot). With B > 1 an event's keys and the sets that hold
    its id are under its bucket's prefix ``weir:{<name>#j<b>}``, ``b = bucket_of(event_id,
    B)`` (:mod:`weir.slots`): the scorer and the learner find them from the event id alone.
    ``pending``, ``expired`` and ``early_index`` are bucket 0's (the only one when B == 1).
    """

    def __init__(self, spec: PipelineSpec) -> None:
        p = spec.redis_prefix
        self.prefix = p
        self.buckets = spec.redis.buckets
        #: the prefix of each bucket; ``[prefix]`` when B == 1
        self.prefixes = (
            [p]
            if self.buckets == 1
            else [bucket_prefix(spec.name, "j", b, self.buckets) for b in range(self.buckets)]
        )
        self.pending = self.pending_of(0)
        self.expired = self.expired_of(0)
        self.early_index = self.early_index_of(0)

    def bucket(self, event_id: str) -> int:
        return bucket_of(event_id, self.buckets)

    def served(self, event_id: str) -> str:
        return f"{self.prefixes[bucket_of(event_id, self.buckets)]}:served:{event_id}"

    def early(self, event_id: str) -> str:
        return f"{self.prefixes[bucket_of(event_id, self.buckets)]}:early:{event_id}"

    def pending_of(self, bucket: int) -> str:
        return f"{self.prefixes[bucket]}:join:pending"

    def expired_of(self, bucket: int) -> str:
        return f"{self.prefixes[bucket]}:join:expired"

    def early_index_of(self, bucket: int) -> str:
        return f"{self.prefixes[bucket]}:join:early"


# -- buckets and nodes (B > 1): one call per node per batch ---------------------------

#: The first line of a script touching keys of several slots of the node it runs on (one
#: declared, the others named in ARGV). Checked on Redis 7.0.15: a script with flags needs
#: it for that ("Script attempted to access keys that do not hash to the same slot"); a
#: key of another node fails ("non local key") and declared keys of several slots fail
#: (``CROSSSLOT``) with or without it.
_CROSS_SLOT = "#!lua flags=allow-cross-slot-keys\n"

#: The rest of :func:`per_bucket`'s script: ARGV is one group per bucket, ``n`` then the
#: ``n`` arguments the stage-1 script takes for that bucket; the replies are concatenated.
_PER_BUCKET = r"""
local out, o = {}, 0
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local a = {}
  for j = 1, n do a[j] = ARGV[i + j] end
  local r = one(a)
  if type(r) == 'table' then
    for j = 1, #r do o = o + 1; out[o] = r[j] end
  else
    o = o + 1; out[o] = r
  end
  i = i + n + 1
end
return out
"""


def per_bucket(script: str) -> str:
    """The script that runs a stage-1 (one prefix) ``script`` once per bucket, in one call.

    The stage-1 body becomes ``one(ARGV)``, a local function of its own arguments, so
    B == 1 and B > 1 run the very same Lua per bucket; the call's ARGV is
    :func:`per_bucket_args`, its KEYS one key (:func:`bucket_calls`).
    """
    return f"{_CROSS_SLOT}local function one(ARGV){script}end\n{_PER_BUCKET}"


def per_bucket_args(groups: Iterable[Sequence[Any]]) -> list[Any]:
    """ARGV of a :func:`per_bucket` script: each bucket's stage-1 arguments, counted.

    >>> per_bucket_args([["p1", 1, "a"], ["p2", 2]])
    [3, 'p1', 1, 'a', 2, 'p2', 2]
    """
    out: list[Any] = []
    for g in groups:
        out.append(len(g))
        out += g
    return out


def by_bucket(buckets: int, event_ids: Sequence[str]) -> dict[int, list[int]]:
    """Indices of ``event_ids`` by bucket (:func:`weir.slots.bucket_of`), in first-seen order.

    >>> by_bucket(1, ["a", "b", "c"])
    {0: [0, 1, 2]}
    >>> sum(len(v) for v in by_bucket(64, [f"e{i}" for i in range(100)]).values())
    100
    """
    if buckets == 1:
        return {0: list(range(len(event_ids)))} if event_ids else {}
    out: dict[int, list[int]] = {}
    for i, eid in enumerate(event_ids):
        b = bucket_of(eid, buckets)
        idx = out.get(b)
        if idx is None:
            out[b] = [i]
        else:
            idx.append(i)
    return out


def nodes_of(client: Any, keys: Keys, buckets: Iterable[int]) -> list[tuple[Any, list[int]]]:
    """``buckets`` grouped by the node owning each bucket's slot: ``[(node, buckets)]``
    (one group, node None, for a single Redis)."""
    bs = list(buckets)
    groups = group_by_node(client, [keys.pending_of(b) for b in bs])
    return [(node, [bs[i] for i in idx]) for node, idx in groups]


def _eval_args(text: str, declared: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
    return ("EVAL", text, len(declared), *declared, *args)


def node_call(client: Any, node: Any, text: str, declared: Sequence[str], args: Sequence[Any]) -> Any:
    """One ``EVAL`` of ``text`` (a :func:`per_bucket` script) on ``node`` (sync client).

    ``EVAL``, not ``EVALSHA``: the text rides with the call (a few KB), so a node that lost
    its script cache (a failover, a restart) needs no ``NOSCRIPT`` round trip.

    Some of the call's slots no longer on ``node`` (a failover, a resharding since the
    grouping): a ``MOVED`` of its declared key is followed by redis-py (the script then
    runs on the new owner, or fails there as below); Redis's "non local key" for another
    bucket reloads the slot map and raises a transient ``ClusterError``
    (:func:`weir.slots.moved`): Weir's retry regroups the step.
    """
    return call_checked(client, node, *_eval_args(text, declared, args))


async def anode_call(client: Any, node: Any, text: str, declared: Sequence[str], args: Sequence[Any]) -> Any:
    """:func:`node_call` for the asyncio client."""
    return await acall_checked(client, node, *_eval_args(text, declared, args))


def bucket_calls(
    client: Any,
    keys: Keys,
    groups: Mapping[int, Sequence[Any]],
    declared: Any,
) -> list[tuple[Any, list[str], list[Any], list[int]]]:
    """The calls of a :func:`per_bucket` script: ``groups`` maps a bucket to its stage-1
    ARGV; returns ``(node, KEYS, ARGV, buckets)`` per node, ``buckets`` in the order their
    replies come. KEYS is one key, ``declared(first bucket)``: Redis refuses declared keys
    of several slots (``CROSSSLOT``, flags or not); the other buckets' keys are named in
    ARGV, which the ``allow-cross-slot-keys`` flag allows on the node's own slots."""
    out = []
    for node, buckets in nodes_of(client, keys, groups):
        out.append((node, [declared(buckets[0])], per_bucket_args(groups[b] for b in buckets), buckets))
    return out


#: The served records of a batch, one command instead of one ``SET`` per prediction (the
#: largest client-side cost of a scorer's batch, docs/performance.md): each record
#: ``SET PX NX``, its id added to the pending set (``ZADD NX``, deadline ARGV[3]), the
#: pending ids whose deadline passed a horizon ago (before ARGV[4]; learned ones too) dropped, and the set's
#: TTL renewed (ARGV[5] ms). ARGV: prefix, record TTL (ms), deadline, cutoff, set TTL, then
#: (event id, record) pairs.
_SERVED_LUA = r"""
local p, px, deadline = ARGV[1], ARGV[2], ARGV[3]
local pending = p .. ':join:pending'
local adds = {}
for i = 6, #ARGV, 2 do
  redis.call('SET', p .. ':served:' .. ARGV[i], ARGV[i + 1], 'PX', px, 'NX')
  adds[#adds + 1] = deadline
  adds[#adds + 1] = ARGV[i]
  if #adds == 1000 then redis.call('ZADD', pending, 'NX', unpack(adds)); adds = {} end
end
if #adds > 0 then redis.call('ZADD', pending, 'NX', unpack(adds)) end
redis.call('ZREMRANGEBYSCORE', pending, 0, ARGV[4])
redis.call('ZREMRANGEBYSCORE', pending, '(' .. string.format('%.17g', -tonumber(ARGV[4])), '(0')
redis.call('PEXPIRE', pending, ARGV[5])
return 0
"""
_SERVED_LUA_X = per_bucket(_SERVED_LUA)

#: First byte of a compact served record (an older record is an orjson object, ``{``).
_COMPACT = b"\x01"
#: First byte of a served record whose label was learned: ``\x02``, the marker's length
#: (1 byte), the marker ``run:seq``, then the record as it was.
_MARKED = b"\x02"
_HEADER_LEN = struct.Struct("<H")
_BINARY_CLASSES = ("False", "True")
_NAN = math.nan


class ServedStore:
    """Where scorers record what they served, for the label join.

    One record per event, compact: ``\\x01``, the header's length (2 bytes), the header
    (orjson array: entity, ts, model version, prediction, proba, scored_at, and the
    features when they are not all numbers), then the features as little-endian doubles
    in ``spec.feature_names`` order (NaN for None). Feature names, the model's name and
    a binary task's class names are kept once, here, not per event. The learner deletes a
    record once the label joined to it is in a published snapshot (see
    :meth:`LabelJoiner.published`).

    Args:
        spec: the pipeline spec (prefix, ``labels.horizon``, feature names, model name).
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.keys = Keys(spec)
        self.px = _px(spec)
        self.names = tuple(spec.feature_names)
        self.model_name = spec.model.name
        self._doubles = struct.Struct(f"<{len(self.names)}d")

    def encode(self, p: Prediction) -> bytes:
        """The compact record of ``p`` (its event id is in the key, not the record).

        Numbers are stored as doubles (the feature engine serves floats, or None).
        """
        feats: Any = p.features
        packed = b""
        if tuple(feats) == self.names:
            values = tuple(feats.values())
            try:
                packed = self._doubles.pack(*values)
                feats = 0
            except struct.error:  # a None, or a string
                if all(v is None or type(v) is float for v in values):
                    packed = self._doubles.pack(*[_NAN if v is None else v for v in values])
                    feats = 0
                else:
                    feats = values
        proba: Any = p.proba
        if proba is not None and tuple(proba) == _BINARY_CLASSES:
            proba = tuple(proba.values())
        model = "" if p.model == self.model_name else p.model
        head = orjson.dumps(
            (p.entity_id, p.ts, p.model_version, p.prediction, proba, p.scored_at, feats, model)
        )
        return _COMPACT + _HEADER_LEN.pack(len(head)) + head + packed

    def decode(self, event_id: str, raw: bytes) -> Prediction:
        """The Prediction of a stored record (compact, or an older orjson object)."""
        if raw[:1] == _MARKED:
            raw = raw[2 + raw[1] :]
        if raw[:1] != _COMPACT:
            return prediction_from_dict(orjson.loads(raw))
        (n,) = _HEADER_LEN.unpack_from(raw, 1)
        entity, ts, version, prediction, proba, scored_at, feats, model = orjson.loads(raw[3 : 3 + n])
        if feats == 0:
            values = self._doubles.unpack_from(raw, 3 + n)
            total = sum(values)
            if total != total:  # a NaN somewhere: None as served
                values = tuple(None if v != v else v for v in values)
            features = dict(zip(self.names, values, strict=True))
        elif isinstance(feats, list):
            features = dict(zip(self.names, feats, strict=True))
        else:
            features = feats
        if proba is not None and type(proba) is list:
            proba = {"False": proba[0], "True": proba[1]}
        return Prediction(
            event_id, entity, ts, model or self.model_name, version, prediction, proba, features, scored_at
        )

    def _groups(self, predictions: Sequence[Prediction], now: float | None) -> dict[int, list[Any]]:
        """Each bucket's :data:`_SERVED_LUA` arguments (one bucket when B == 1)."""
        now = time.time() if now is None else now
        horizon = self.spec.labels.horizon
        k = self.keys
        # Bounded without a learner: deadlines more than a horizon ago are dropped here.
        head = (self.px, repr(now + horizon), repr(now - horizon), 2 * self.px)
        encode = self.encode
        groups: dict[int, list[Any]] = {}
        for b, idx in by_bucket(k.buckets, [p.event_id for p in predictions]).items():
            args: list[Any] = [k.prefixes[b], *head]
            for i in idx:
                p = predictions[i]
                args += (p.event_id, encode(p))
            groups[b] = args
        return groups

    def add_to_pipeline(self, pipe: Any, predictions: Sequence[Prediction], now: float | None = None) -> None:
        """Queue the served records on ``pipe`` (the caller executes it): one command,
        :data:`_SERVED_LUA`, for the whole batch. ``spec.redis.buckets`` == 1 only (with
        buckets the records go to several nodes: :meth:`write`, :meth:`awrite`).

        A redelivered event keeps its first served record (``SET NX``): that is what
        was published first and what its label must be joined with.
        """
        if not predictions:
            return
        if self.keys.buckets != 1:
            raise ValueError(
                f"ServedStore.add_to_pipeline: spec.redis.buckets is {self.keys.buckets}, so the "
                "served records go to one call per node; use ServedStore.write() or awrite()"
            )
        # EVAL, not EVALSHA: the script's text (under 1 KB) rides with the batch, so a Redis
        # that lost its script cache (restart, SCRIPT FLUSH) needs no NOSCRIPT round trip.
        # One declared key (the rest share its hash slot): a Redis Cluster routes by it.
        # execute_command, since redis-py's cluster pipeline has no eval().
        pipe.execute_command("EVAL", _SERVED_LUA, 1, self.keys.pending, *self._groups(predictions, now)[0])

    def write(self, client: Any, predictions: Sequence[Prediction], now: float | None = None) -> None:
        """Store the served records (sync client): B == 1, one pipeline of one command
        (:meth:`add_to_pipeline`); with buckets, one script call per node."""
        if not predictions:
            return
        if self.keys.buckets == 1:
            pipe = client.pipeline(transaction=False)
            self.add_to_pipeline(pipe, predictions, now)
            pipe.execute()
            return
        for node, declared, args, _ in bucket_calls(
            client, self.keys, self._groups(predictions, now), self.keys.pending_of
        ):
            node_call(client, node, _SERVED_LUA_X, declared, args)

    async def awrite(self, client: Any, predictions: Sequence[Prediction], now: float | None = None) -> None:
        """:meth:`write` for the asyncio client (the scorer's): the nodes' calls in parallel.

        A retry after some nodes' calls succeeded and another's failed (a ``MOVED``, a node
        down) sends them all again: ``SET NX`` and ``ZADD NX`` change nothing stored.
        """
        if not predictions:
            return
        if self.keys.buckets == 1:
            pipe = client.pipeline(transaction=False)
            self.add_to_pipeline(pipe, predictions, now)
            await pipe.execute()
            return
        await ensure_slot_map(client)  # loaded lazily by the asyncio client
        calls = bucket_calls(client, self.keys, self._groups(predictions, now), self.keys.pending_of)
        done = await asyncio.gather(
            *(anode_call(client, node, _SERVED_LUA_X, declared, args) for node, declared, args, _ in calls),
            return_exceptions=True,
        )
        for res in done:
            if isinstance(res, BaseException):
                raise res


@dataclass(slots=True)
class JoinResult:
    outcome: Outcome
    event_id: str
    example: Example | None = None
    detail: str = ""


#: The marker the join reads for a learned event whose served record is gone (its pending
#: score is negated): in a published snapshot, which every later run starts from.
PUBLISHED = "*"


@dataclass
class Lineage:
    """Which learned markers the live model really contains.

    A marker is ``run_id:seq``, kept in the served record of the event whose label was
    learned (:data:`_MARKED`): the learner run that learned the label and its count of
    labels learned. The model contains a marker's label if the marker is from this run,
    or from an earlier run up to the ``seq`` that run had reached when the snapshot this
    run started from was taken. A marker past that cutoff was learned by a model state
    lost in a crash: the label is learned again instead of being dropped as a duplicate.
    :data:`PUBLISHED` stands for a learned event whose record is gone: records are deleted
    only once a published snapshot contains their label.
    """

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    #: earlier runs -> [cutoff seq, time of the snapshot recording it]
    ancestors: dict[str, list[float]] = field(default_factory=dict)

    def marker(self, seq: int) -> bytes:
        return f"{self.run_id}:{seq}".encode()

    def contains(self, marker: bytes | str | None) -> bool:
        if marker is None:
            return False
        text = marker.decode() if isinstance(marker, bytes) else marker
        if text == PUBLISHED:
            return True
        run, _, seq = text.partition(":")
        if run == self.run_id:
            return True
        cut = self.ancestors.get(run)
        return cut is not None and seq.isdigit() and int(seq) <= cut[0]

    def for_snapshot(self, seq: int, now: float, horizon: float) -> dict[str, list[float]]:
        """The lineage to store with a snapshot taken at ``seq`` (old runs pruned)."""
        out = {r: c for r, c in self.ancestors.items() if c[1] >= now - 2 * horizon}
        out[self.run_id] = [seq, now]
        return out


# -- decisions: pure functions of the state one script call read ----------------------


@dataclass(frozen=True, slots=True)
class Found:
    """What the batch's script call (:data:`_JOIN_LUA`) read for one event id.

    Attributes:
        marker: its learned marker (``run:seq`` from its record, or ``*`` for a learned
            event whose record is gone), None if not learned.
        record: its served record (without the marker), None if absent.
        expired: (labels) its horizon passed: it is in the expired set.
        held: (held labels, in the sweep) the body of the label held for it, None once the
            hold expired.
    """

    marker: bytes | str | None = None
    record: bytes | None = None
    expired: bool = False
    held: bytes | None = None


def read_state(raw: Sequence[Any], mode: Literal["expired", "early"] = "expired") -> list[Found]:
    """The script's reply (three values per id) as one :class:`Found` per id.

    Examples:
        >>> served, expired = read_state([None, b"rec", None, b"r:1", None, b"17.0"])
        >>> served.record, served.expired, expired.marker, expired.expired
        (b'rec', False, b'r:1', True)
        >>> read_state([None, None, b"body"], mode="early")[0].held
        b'body'
    """
    if mode == "early":
        return [Found(raw[i], raw[i + 1], False, raw[i + 2]) for i in range(0, len(raw), 3)]
    return [Found(raw[i], raw[i + 1], raw[i + 2] is not None) for i in range(0, len(raw), 3)]


def example_of(label: Label, served: Prediction) -> Example:
    """The training example of a label joined with what was served for its event."""
    return Example(
        event_id=label.event_id,
        entity_id=served.entity_id,
        event_ts=served.ts,
        label_ts=label.ts,
        features=served.features,
        label=label.label,
        prediction=served.prediction,
        proba=served.proba,
        model_version=served.model_version,
    )


def decide_labels(
    labels: Sequence[Label],
    found: Sequence[Found],
    lineage: Lineage,
    served: ServedStore,
    read: Sequence[bool] | None = None,
) -> list[JoinResult]:
    """Each label's outcome on arrival, from the state of its event; no I/O.

    In order: a label whose message was read already (``read``) is a ``duplicate``
    whatever the state; so is a second label for an event of this batch, or for an event
    whose marker the model contains (:meth:`Lineage.contains`; a marker the model lost
    is learned again). A served record gives a ``hit`` (its example); an id in the expired
    set is ``expired``; anything else is ``early``, to be held (:func:`hold_body`), which
    may still turn out a ``duplicate`` (:func:`held_by_another`).
    """
    if len(found) != len(labels):
        raise ValueError(f"decide_labels: {len(found)} states for {len(labels)} labels")
    results: list[JoinResult] = []
    seen: set[str] = set()
    contains, decode = lineage.contains, served.decode
    for i, (lab, f) in enumerate(zip(labels, found, strict=True)):
        eid = lab.event_id
        if read is not None and read[i]:
            results.append(JoinResult("duplicate", eid, detail="label message already read"))
        elif eid in seen or (f.marker is not None and contains(f.marker)):
            results.append(JoinResult("duplicate", eid, detail="label already learned"))
        elif f.record is not None:
            seen.add(eid)
            results.append(JoinResult("hit", eid, example_of(lab, decode(eid, f.record))))
        elif f.expired:
            results.append(JoinResult("expired", eid, detail="label came after the horizon; not learned"))
        else:
            seen.add(eid)
            results.append(JoinResult("early", eid, detail="event not served yet; label held"))
    return results


def hold_body(label: Label, source: str) -> bytes:
    """What an early label's hold (``P:early:{event_id}``) stores: the label and its
    message (``partition:offset``, or ``""`` when unknown)."""
    return orjson.dumps({"event_id": label.event_id, "label": label.label, "ts": label.ts, "src": source})


def held_by_another(was_set: Any, held: bytes | None, body: bytes, source: str) -> bool:
    """Whether a hold (``SET NX``) found another label's: then this label is a ``duplicate``.

    Not set, and what is held is another body: a second label for the event. The same body
    (same source message) is this label's own hold, from an earlier try of the call that
    timed out but was applied. Without a source the bodies cannot tell: not set is a duplicate.

    Examples:
        >>> held_by_another(True, b"x", b"x", "0:5")  # held now
        False
        >>> held_by_another(None, b"x", b"x", "0:5"), held_by_another(None, b"y", b"x", "0:5")
        (False, True)
        >>> held_by_another(None, b"x", b"x", "")
        True
    """
    return not was_set and (not source or held != body)


def in_snapshot(marker: bytes | str, run_id: str, published_seq: int) -> bool:
    """Whether the label of a marker the lineage contains is in a published snapshot.

    Examples:
        >>> in_snapshot(b"*", "r2", -1), in_snapshot(b"r1:9", "r2", -1)  # published; an ancestor's
        (True, True)
        >>> in_snapshot(b"r2:4", "r2", 4), in_snapshot(b"r2:5", "r2", 4)  # this run's
        (True, False)
    """
    text = marker.decode() if isinstance(marker, bytes) else marker
    run, _, seq = text.partition(":")
    if run == PUBLISHED:
        return True
    if run != run_id:
        return True  # an ancestor's marker the lineage contains is in the snapshot
    return int(seq) <= published_seq


def decide_held(
    ids: Sequence[str],
    deadlines: Sequence[float],
    found: Sequence[Found],
    lineage: Lineage,
    served: ServedStore,
    published_seq: int,
    now: float,
    resolved: Container[str] = (),
) -> tuple[list[JoinResult], list[str]]:
    """The sweep's decisions on held (early) labels; no I/O.

    Returns ``(results, done)``: ``resolved`` (its event was served: learn it) or
    ``unknown`` (its hold expired unlearned, or its deadline passed unserved), and the ids
    whose holds go. A held label the model contains stays until a published snapshot has
    it; one learned by a lost model state (see :class:`Lineage`) is resolved again.
    ``resolved``: the ids this learner resolved and still holds. When no snapshot
    published one before its horizon (no registry, or a horizon shorter than the snapshot
    interval), its marker goes with its served record and pending entry; it then leaves
    with no second outcome (it was counted ``resolved``), never ``unknown``.
    """
    if not len(ids) == len(deadlines) == len(found):
        raise ValueError(f"decide_held: {len(ids)} ids, {len(deadlines)} deadlines, {len(found)} states")
    results: list[JoinResult] = []
    done: list[str] = []
    for eid, deadline, f in zip(ids, deadlines, found, strict=True):
        if f.held is None:  # its hold expired
            done.append(eid)
            if f.marker is None and eid not in resolved:
                results.append(JoinResult("unknown", eid, detail="event never served"))
        elif f.marker is not None and lineage.contains(f.marker):
            if in_snapshot(f.marker, lineage.run_id, published_seq):
                done.append(eid)
        elif f.record is not None:
            lab = orjson.loads(f.held)
            label = Label(event_id=eid, label=lab["label"], ts=float(lab["ts"]))
            results.append(JoinResult("resolved", eid, example_of(label, served.decode(eid, f.record))))
        elif deadline <= now:
            done.append(eid)
            if eid not in resolved:  # else learned, its marker gone with the horizon
                results.append(JoinResult("unknown", eid, detail="event not served within the horizon"))
    return results, done


def next_cursor(start: int, looked_at: int, done: int, chunk: int | None = None) -> int:
    """Where the sweep looks next in the early index: past the ids it kept, or back to the
    start when it saw the end (ids not done keep their ranks; done ones leave). ``chunk``:
    how many it asked for (default :data:`SWEEP_HELD_CHUNK`; a bucket's share with buckets).

    Examples:
        >>> next_cursor(0, SWEEP_HELD_CHUNK, 100), next_cursor(400, 7, 2)
        (400, 0)
        >>> next_cursor(6, 2, 1, chunk=2), next_cursor(6, 1, 0, chunk=2)
        (7, 0)
    """
    full = SWEEP_HELD_CHUNK if chunk is None else chunk
    return start + looked_at - done if looked_at == full else 0


#: The join's one call per batch: first the writes the learner queued (marks of learned
#: labels, served records to delete), then the state of each label's event, three values
#: per id: its learned marker (from its record's prefix, else ``*`` when its pending score
#: is negated: learned, its record deleted or written again since), its served record
#: (without the marker), and (mode ``expired``) its score in the expired set or (mode
#: ``early``) its held label. A mark prefixes the record with the marker (keeping its TTL)
#: and negates the pending score. ARGV: prefix, mode, number of marks, number of
#: deletions, the marks as (id, marker) pairs, the ids to delete, then the ids to read.
_JOIN_LUA = r"""
local p, mode = ARGV[1], ARGV[2]
local nm, nd = tonumber(ARGV[3]), tonumber(ARGV[4])
local pending = p .. ':join:pending'
local i = 5
for _ = 1, nm do
  local eid, m = ARGV[i], ARGV[i + 1]
  local k = p .. ':served:' .. eid
  local rec = redis.call('GET', k)
  if rec then
    if string.byte(rec, 1) == 2 then rec = string.sub(rec, 3 + string.byte(rec, 2)) end
    redis.call('SET', k, '\2' .. string.char(#m) .. m .. rec, 'KEEPTTL')
  end
  local d = tonumber(redis.call('ZSCORE', pending, eid))
  if d and d > 0 then redis.call('ZADD', pending, 'XX', string.format('%.17g', -d), eid) end
  i = i + 2
end
local rem = {}
for _ = 1, nd do
  rem[#rem + 1] = p .. ':served:' .. ARGV[i]
  if #rem == 500 then redis.call('DEL', unpack(rem)); rem = {} end
  i = i + 1
end
if #rem > 0 then redis.call('DEL', unpack(rem)) end
local out = {}
local expired = p .. ':join:expired'
local last = #ARGV
while i <= last do
  local stop = math.min(last, i + 499)
  local sk, ek = {}, {}
  for j = i, stop do
    sk[#sk + 1] = p .. ':served:' .. ARGV[j]
    if mode == 'early' then ek[#ek + 1] = p .. ':early:' .. ARGV[j] end
  end
  local ss = redis.call('MGET', unpack(sk))
  local es = ss
  if mode == 'early' then es = redis.call('MGET', unpack(ek)) end
  for q = 1, #sk do
    local eid, s, m, x = ARGV[i + q - 1], ss[q], false, false
    if s and string.byte(s, 1) == 2 then
      local n = string.byte(s, 2)
      m = string.sub(s, 3, 2 + n)
      s = string.sub(s, 3 + n)
    end
    if mode == 'early' then x = es[q] end
    if not m then
      -- learned with its record gone (or written again by a redelivered event)
      local d = tonumber(redis.call('ZSCORE', pending, eid))
      if d and d < 0 then
        m = '*'
      elseif not s and mode ~= 'early' then
        x = redis.call('ZSCORE', expired, eid)
      end
    end
    out[#out + 1] = m
    out[#out + 1] = s
    out[#out + 1] = x
  end
  i = stop + 1
end
return out
"""
_JOIN_LUA_X = per_bucket(_JOIN_LUA)

#: The holds of a batch's early labels, one command instead of three per label (a pipeline of
#: them was the largest client-side cost of the label path under a backlog,
#: docs/performance.md): each hold ``SET PX NX`` then read back (``GET``: the body held, this
#: label's or another's, :func:`held_by_another`), its id added to the early index
#: (``ZADD NX``, deadline ARGV[3]); the index's ids whose deadline passed before ARGV[4]
#: dropped and its TTL renewed (ARGV[5] ms). ARGV: prefix, hold TTL (ms), deadline, cutoff,
#: index TTL, then (event id, body) pairs. Returns two values per hold: 1 if set now (else
#: nil), the body held.
_HOLD_LUA = r"""
local p, px, deadline = ARGV[1], ARGV[2], ARGV[3]
local index = p .. ':join:early'
local out, adds = {}, {}
for i = 6, #ARGV, 2 do
  local k = p .. ':early:' .. ARGV[i]
  local set = redis.call('SET', k, ARGV[i + 1], 'PX', px, 'NX')
  out[#out + 1] = set and 1 or false
  out[#out + 1] = redis.call('GET', k)
  adds[#adds + 1] = deadline
  adds[#adds + 1] = ARGV[i]
  if #adds == 1000 then redis.call('ZADD', index, 'NX', unpack(adds)); adds = {} end
end
if #adds > 0 then redis.call('ZADD', index, 'NX', unpack(adds)) end
redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[4])
redis.call('PEXPIRE', index, ARGV[5])
return out
"""
_HOLD_LUA_X = per_bucket(_HOLD_LUA)

#: The sweep's expiries: up to ARGV[3] pending ids whose deadline (ARGV[2]) passed move to
#: the expired set (kept one more horizon, ARGV[4] seconds), learned ones whose deadline
#: passed go; returns how many moved.
_EXPIRE_LUA = r"""
local p, now, limit, horizon, px2 = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local pending, expired = p .. ':join:pending', p .. ':join:expired'
local ids = redis.call('ZRANGEBYSCORE', pending, 0, now, 'LIMIT', 0, limit)
local n = #ids
local j = 1
while j <= n do
  local chunk, adds = {}, {}
  for k = j, math.min(n, j + 499) do
    chunk[#chunk + 1] = ids[k]
    adds[#adds + 1] = now + horizon
    adds[#adds + 1] = ids[k]
  end
  redis.call('ZREM', pending, unpack(chunk))
  redis.call('ZADD', expired, unpack(adds))
  j = j + 500
end
if n > 0 then redis.call('PEXPIRE', expired, px2) end
redis.call('ZREMRANGEBYSCORE', expired, '-inf', now)
-- learned events (negated scores) are kept until their deadline
redis.call('ZREMRANGEBYSCORE', pending, '(' .. string.format('%.17g', -now), '(0')
return n
"""
_EXPIRE_LUA_X = per_bucket(_EXPIRE_LUA)

#: (buckets) The sweep's look at a bucket's held labels, ARGV: prefix, first and last
#: rank: the ids and deadlines of its early index (one reply per bucket).
_HELD_RANGE_LUA_X = per_bucket(
    r"""
return {redis.call('ZRANGE', ARGV[1] .. ':join:early', ARGV[2], ARGV[3], 'WITHSCORES')}
"""
)

#: (buckets) The held labels the sweep is done with, ARGV: prefix, then their ids: they
#: leave the early index and their holds are deleted (what :meth:`LabelJoiner.resolve_held`
#: pipelines when B == 1).
_UNHOLD_LUA_X = per_bucket(
    r"""
local index = ARGV[1] .. ':join:early'
local i = 2
while i <= #ARGV do
  local ids, ks = {}, {}
  for q = i, math.min(#ARGV, i + 499) do
    ids[#ids + 1] = ARGV[q]
    ks[#ks + 1] = ARGV[1] .. ':early:' .. ARGV[q]
  end
  redis.call('ZREM', index, unpack(ids))
  redis.call('DEL', unpack(ks))
  i = i + 500
end
return 0
"""
)

#: Served records deleted per call at most (the rest go with the next calls).
DROP_CHUNK = 2_000
#: Learned event ids remembered until a snapshot lets their served records go; past
#: this (a learner that never snapshots) the oldest are left to their TTL.
UNPUBLISHED_CAP = 200_000
#: Expiries moved per script call, and script calls per sweep (so at most 20,000 a sweep,
#: in slices short enough not to hold Redis up for the scorers).
EXPIRE_CHUNK = 2_000
EXPIRE_CALLS = 10


@dataclass
class BucketWindow:
    """The buckets a sweep looks at: all of them while there are at most ``most``, else the
    next ``most`` of them round robin (a pipeline with thousands of buckets: each sweep a
    bounded number of calls' worth of Redis work, every bucket in turn).

    >>> w = BucketWindow()
    >>> w.next(4, 500), w.next(5, 2), w.next(5, 2), w.next(5, 2)
    ([0, 1, 2, 3], [0, 1], [2, 3], [4, 0])
    """

    start: int = 0

    def next(self, buckets: int, most: int) -> list[int]:
        if buckets <= most:
            return list(range(buckets))
        first, self.start = self.start, (self.start + most) % buckets
        return [(first + i) % buckets for i in range(most)]


def _unhold(client: Any, keys: Keys, done: Sequence[str]) -> Any:
    """Delete the holds of ``done`` and their index entries (B == 1): one pipeline, its
    ``execute()`` (an awaitable for an asyncio client)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(keys.early_index, *done)
    # DEL through execute_command: redis-py's cluster pipeline refuses a delete() of
    # several keys even when they share a slot (they do: the pipeline's hash tag).
    pipe.execute_command("DEL", *[keys.early(e) for e in done])
    return pipe.execute()


class LabelJoiner:
    """Joins labels with served records in Redis; pure decisions, one round trip per batch.

    One joiner per learner (one writer per model). The caller learns every example of
    a ``hit``/``resolved`` result, then calls :meth:`mark_learned`, which only queues the
    marks: they are written at the start of the next call to Redis (the next batch's
    join, the sweep, or :meth:`flush` before a snapshot), in the same script, before that
    call reads anything. So a batch costs one round trip (plus one to hold early labels,
    if any), and a later label for an event learned earlier still finds it learned.
    A crash that loses queued marks also loses the model state that learned their
    labels (no snapshot is taken before :meth:`flush`): they are learned again.

    With ``spec.redis.buckets`` > 1 each of these calls is one call per node (the node's
    buckets in one script), sent in turn; a mark, a deletion and a read of an event go to
    its bucket's node, so an event's mark is still written before its next read.

    Served records are deleted once their label is in a published snapshot
    (:meth:`published`): before that, a crash would need them to learn the label again.
    """

    def __init__(self, spec: PipelineSpec, client: Any, lineage: Lineage | None = None) -> None:
        self.spec = spec
        self.client = client
        self.keys = Keys(spec)
        self.px = _px(spec)
        self.lineage = lineage or Lineage()
        self.served = ServedStore(spec)
        self._held_cursor = 0  # rank in the early index where the next sweep looks
        #: (B > 1) that rank per bucket
        self._held_cursors: dict[int, int] = {}
        #: (B > 1) the buckets the sweep looks at next (all of them up to the chunk sizes)
        self._held_window = BucketWindow()
        self._expire_window = BucketWindow()
        #: markers learned, not yet written: (event id, seq)
        self._marks: list[tuple[str, int]] = []
        #: event ids learned since the last snapshot (their records are still needed)
        self._unpublished: list[str] = []
        #: event ids whose served records may go (their label is in a snapshot)
        self._droppable: list[str] = []
        #: held labels this joiner resolved, whose holds are still kept -> their deadline
        #: (:func:`decide_held`: never counted ``unknown`` after ``resolved``)
        self._resolved: dict[str, float] = {}
        self._resolved_pruned = 0.0
        self._scripts: dict[str, Any] = {}
        #: the same for an asyncio client (each call names its client)
        self._ascripts: dict[str, Any] = {}

    def _script(self, text: str) -> Any:
        s = self._scripts.get(text)
        if s is None:
            s = self._scripts[text] = self.client.register_script(text)
        return s

    def _ascript(self, client: Any, text: str) -> Any:
        s = self._ascripts.get(text)
        if s is None:
            s = self._ascripts[text] = client.register_script(text)
        return s

    def _script_io(
        self,
        text: str | None,
        text_x: str,
        groups: Mapping[int, Sequence[Any]],
        declared: Callable[[int], str],
        what: str,
    ) -> Io:
        """One script of the join on the nodes ``groups`` (bucket -> its ARGV) need, as an
        :class:`~models.steps.Io` with a blocking and an asyncio variant. Its result is
        ``[(buckets, reply)]``, one per call, ``buckets`` in the order of the reply's parts.

        B == 1: ``EVALSHA`` of ``text`` (``declared(0)`` its key); B > 1: one ``EVAL`` of
        ``text_x`` per node (:func:`bucket_calls`), sent in turn by the blocking client, at
        once by the asyncio one (each idempotent: a retry of all after one failed changes
        nothing the first did).
        """
        k = self.keys
        if k.buckets == 1:
            assert text is not None, "a script of the join without its single-Redis text"
            key, args = [declared(0)], groups[0]

            def call() -> list[tuple[list[int], Any]]:
                return [([0], self._script(text)(keys=key, args=args))]

            async def acall(client: Any) -> list[tuple[list[int], Any]]:
                return [([0], await self._ascript(client, text)(keys=key, args=args, client=client))]

            return Io(call, what, acall)

        def call_nodes() -> list[tuple[list[int], Any]]:
            return [
                (buckets, node_call(self.client, node, text_x, keys, args))
                for node, keys, args, buckets in bucket_calls(self.client, k, groups, declared)
            ]

        async def acall_nodes(client: Any) -> list[tuple[list[int], Any]]:
            await ensure_slot_map(client)  # loaded lazily by the asyncio client
            calls = bucket_calls(client, k, groups, declared)
            done = await asyncio.gather(
                *(anode_call(client, node, text_x, keys, args) for node, keys, args, _ in calls),
                return_exceptions=True,
            )
            for res in done:
                if isinstance(res, BaseException):
                    raise res
            return [(c[3], res) for c, res in zip(calls, done, strict=True)]

        return Io(call_nodes, what, acall_nodes)

    # -- the writes queued, sent with the next call ------------------------------------

    @property
    def unwritten(self) -> int:
        """Marks queued and not yet written."""
        return len(self._marks)

    def _call(self, ids: Sequence[str], mode: str = "expired") -> list[Any]:
        """:meth:`_call_step` run here (blocking client)."""
        return run_step(self._call_step(ids, mode))

    def _call_step(self, ids: Sequence[str], mode: str = "expired") -> Step[list[Any]]:
        """Write the queued marks and deletions, then read ``ids``; one script call (one
        per node with buckets): three values per id, in the order of ``ids``.

        The queues are emptied only once the call succeeded: a retried call sends them
        again (marking a record with the same marker, deleting a deleted key: no-ops).
        """
        marks, drops = self._marks, self._droppable[:DROP_CHUNK]
        marker = self.lineage.marker
        k = self.keys
        parts: dict[int, tuple[list[Any], list[str], list[int]]] = {}
        groups: dict[int, list[Any]]
        if k.buckets == 1:
            args: list[Any] = [k.prefix, mode, len(marks), len(drops)]
            for eid, seq in marks:
                args += (eid, marker(seq))
            args += drops
            args += ids
            groups = {0: args}
        else:
            # Each bucket's marks, deletions and reads (the stage-1 script's arguments for
            # its prefix), one call per node; the reads put back in the order of ``ids``.
            n = k.buckets

            def part(eid: str) -> tuple[list[Any], list[str], list[int]]:
                b = bucket_of(eid, n)
                g = parts.get(b)
                if g is None:
                    g = parts[b] = ([], [], [])
                return g

            for eid, seq in marks:
                part(eid)[0].extend((eid, marker(seq)))
            for eid in drops:
                part(eid)[1].append(eid)
            for i, eid in enumerate(ids):
                part(eid)[2].append(i)
            groups = {
                b: [k.prefixes[b], mode, len(m) // 2, len(d), *m, *d, *(ids[i] for i in r)]
                for b, (m, d, r) in parts.items()
            }
        replies = yield self._script_io(_JOIN_LUA, _JOIN_LUA_X, groups, k.pending_of, "label join")
        raw: list[Any]
        if k.buckets == 1:
            raw = list(replies[0][1])
        else:
            raw = [None] * (3 * len(ids))
            for buckets, out in replies:
                j = 0
                for b in buckets:
                    for i in parts[b][2]:
                        raw[3 * i : 3 * i + 3] = out[j : j + 3]
                        j += 3
        self._marks = []
        del self._droppable[: len(drops)]
        return raw

    def flush(self) -> None:
        """Write the queued marks (and deletions) now; a snapshot waits for this."""
        if self._marks or self._droppable:
            self._call([])

    def mark_learned(self, learned: Iterable[tuple[str, int]]) -> None:
        """Queue the marks of learned labels ``(event_id, seq)``; no I/O (see the class)."""
        items = list(learned)
        self._marks.extend(items)
        self._unpublished.extend(eid for eid, _ in items)
        if len(self._unpublished) > UNPUBLISHED_CAP:  # no snapshots (a replay): TTLs do it
            del self._unpublished[: len(self._unpublished) - UNPUBLISHED_CAP]

    def published(self, seq: int) -> None:
        """A snapshot at ``seq`` was published: every label learned so far is in it, so
        their served records are deleted with the next calls."""
        self.published_seq = seq
        self._droppable.extend(self._unpublished)
        self._unpublished = []

    # -- I/O around the decisions ----------------------------------------------------

    def learned(self, event_ids: Sequence[str]) -> list[bool]:
        """Whether each event is known as learned (its record marked, or gone with its
        pending score negated); writes the queued marks first. For tests and tools."""
        return [f.marker is not None for f in read_state(self._call(list(event_ids)))]

    def join(
        self,
        labels: Sequence[Label],
        now: float | None = None,
        sources: Sequence[str] | None = None,
        read: Sequence[bool] | None = None,
    ) -> list[JoinResult]:
        """:meth:`join_step` run here (blocking client)."""
        return run_step(self.join_step(labels, now, sources, read))

    async def ajoin(
        self,
        client: Any,
        labels: Sequence[Label],
        now: float | None = None,
        sources: Sequence[str] | None = None,
        read: Sequence[bool] | None = None,
    ) -> list[JoinResult]:
        """:meth:`join_step` on ``client``, an asyncio Redis client (role ``all``'s learner)."""
        return await arun_step(self.join_step(labels, now, sources, read), client)

    def join_step(
        self,
        labels: Sequence[Label],
        now: float | None = None,
        sources: Sequence[str] | None = None,
        read: Sequence[bool] | None = None,
    ) -> Step[list[JoinResult]]:
        """Decide each label's outcome (labels already validated and coerced).

        One round trip (:meth:`_call_step`) reads the state, :func:`decide_labels` decides,
        and one more round trip holds the early labels, if any. ``sources`` names each
        label's message (``partition:offset``); it goes into the hold, so a retried call
        tells its own hold from a second label for the event (:func:`held_by_another`).
        ``read`` is True for a label whose message the learner had already read (its offset
        is before the learner's): a ``duplicate`` whatever Redis holds.
        """
        if not labels:
            return []
        now = time.time() if now is None else now
        found = read_state((yield from self._call_step([lab.event_id for lab in labels])))
        results = decide_labels(labels, found, self.lineage, self.served, read)
        early = [i for i, res in enumerate(results) if res.outcome == "early"]
        if early:
            bodies = [hold_body(labels[i], sources[i] if sources is not None else "") for i in early]
            held = yield from self._hold_step([labels[i].event_id for i in early], bodies, now)
            for j, i in enumerate(early):
                source = sources[i] if sources is not None else ""
                if held_by_another(held[2 * j], held[2 * j + 1], bodies[j], source):
                    results[i] = JoinResult(
                        "duplicate", labels[i].event_id, detail="a label for this event is already held"
                    )
        return results

    def _hold_step(self, ids: Sequence[str], bodies: Sequence[bytes], now: float) -> Step[list[Any]]:
        """Hold early labels (:data:`_HOLD_LUA`): two values per label, in order."""
        k = self.keys
        horizon = self.spec.labels.horizon
        head = (self.px, repr(now + horizon), repr(now - horizon), 2 * self.px)
        parts = by_bucket(k.buckets, ids)
        groups: dict[int, list[Any]] = {}
        for b, idx in parts.items():
            args: list[Any] = [k.prefixes[b], *head]
            for i in idx:
                args += (ids[i], bodies[i])
            groups[b] = args
        replies = yield self._script_io(_HOLD_LUA, _HOLD_LUA_X, groups, k.early_index_of, "label hold")
        if k.buckets == 1:
            return list(replies[0][1])
        held: list[Any] = [None] * (2 * len(ids))
        for buckets, out in replies:
            j = 0
            for b in buckets:
                for i in parts[b]:
                    held[2 * i : 2 * i + 2] = out[j : j + 2]
                    j += 2
        return held

    def expire(self, now: float) -> int:
        """:meth:`expire_step` run here (blocking client)."""
        return run_step(self.expire_step(now))

    def expire_step(self, now: float) -> Step[int]:
        """Move the pending ids whose deadline passed to the expired set; how many.

        Bounded: at most :data:`EXPIRE_CALLS` script calls (per node, with buckets) of
        :data:`EXPIRE_CHUNK` ids (shared equally by the node's buckets, so none waits for
        another's backlog), each a short slice of Redis time; a larger backlog goes on at
        the next sweep.
        """
        k = self.keys
        now_s, horizon_s, px2 = repr(now), repr(self.spec.labels.horizon), 2 * self.px
        total = 0
        if k.buckets == 1:
            args: list[Any] = [k.prefix, now_s, EXPIRE_CHUNK, horizon_s, px2]
            for _ in range(EXPIRE_CALLS):
                replies = yield self._script_io(
                    _EXPIRE_LUA, _EXPIRE_LUA_X, {0: args}, k.pending_of, "label expiry"
                )
                n = int(replies[0][1])
                total += n
                if n < EXPIRE_CHUNK:
                    break
            return total
        # Each bucket's share of its node's chunk (the slot map as the blocking client has
        # it: no I/O); then rounds of one call per node with buckets left, at most
        # EXPIRE_CALLS, a bucket leaving once it moved less than its share.
        share: dict[int, int] = {}
        for _, buckets in nodes_of(self.client, k, self._expire_window.next(k.buckets, EXPIRE_CHUNK)):
            share.update((b, max(1, EXPIRE_CHUNK // len(buckets))) for b in buckets)
        for _ in range(EXPIRE_CALLS):
            if not share:
                break
            groups = {b: [k.prefixes[b], now_s, n, horizon_s, px2] for b, n in share.items()}
            replies = yield self._script_io(None, _EXPIRE_LUA_X, groups, k.pending_of, "label expiry")
            for buckets, counts in replies:
                for b, c in zip(buckets, counts, strict=True):
                    total += int(c)
                    if int(c) < share[b]:
                        del share[b]
        return total

    def sweep(self, now: float | None = None) -> tuple[int, list[JoinResult]]:
        """:meth:`sweep_step` run here (blocking client)."""
        return run_step(self.sweep_step(now))

    async def asweep(self, client: Any, now: float | None = None) -> tuple[int, list[JoinResult]]:
        """:meth:`sweep_step` on ``client``, an asyncio Redis client (role ``all``'s learner)."""
        return await arun_step(self.sweep_step(now), client)

    def sweep_step(self, now: float | None = None) -> Step[tuple[int, list[JoinResult]]]:
        """Count expiries and resolve held labels (a chunk of them per call, round robin).

        Returns ``(expiries, results)``: results are ``resolved`` (learn them, then
        :meth:`mark_learned`) or ``unknown`` (the held label's event never came), as
        :func:`decide_held` decides them from one script call's state.
        """
        now = time.time() if now is None else now
        if self._marks or self._droppable:  # flush: the marks before anything is read
            yield from self._call_step([])
        expiries = yield from self.expire_step(now)
        return expiries, (yield from self.resolve_held_step(now))

    def resolve_held(self, now: float | None = None) -> list[JoinResult]:
        """:meth:`resolve_held_step` run here (blocking client)."""
        return run_step(self.resolve_held_step(now))

    async def aresolve_held(self, client: Any, now: float | None = None) -> list[JoinResult]:
        """:meth:`resolve_held_step` on ``client``, an asyncio Redis client."""
        return await arun_step(self.resolve_held_step(now), client)

    def resolve_held_step(self, now: float | None = None) -> Step[list[JoinResult]]:
        """The held labels' half of :meth:`sweep`: the next chunk of the early index.

        Sets :attr:`more_held` when the chunk was full and decided some of its labels or
        let some holds go (labels learned and now in a published snapshot): the learner then
        looks at the next chunk without waiting for the next sweep (a backlog of early
        labels is resolved as fast as its events are served, not :data:`SWEEP_HELD_CHUNK` a
        second). Holds that only went did once stop the walk: the labels behind thousands
        of learned ones waited a sweep per chunk (issue #12: split roles learned the last
        4,708 of 60,000 backlog labels 11 s after the others).

        With buckets, the chunk is shared by every bucket's early index (each its own
        cursor, ``SWEEP_HELD_CHUNK // buckets`` ids at least 1), so none starves.
        """
        now = time.time() if now is None else now
        if self.keys.buckets != 1:
            return (yield from self._resolve_held_buckets_step(now))
        k = self.keys
        key, start = k.early_index, self._held_cursor
        stop = start + SWEEP_HELD_CHUNK - 1
        held = yield Io(
            lambda: self.client.zrange(key, start, stop, withscores=True),
            "held labels",
            lambda c: c.zrange(key, start, stop, withscores=True),
        )
        if not held:
            self._held_cursor = 0
            self.more_held = False
            self._walked(False, wrapped=True)
            return []
        ids = [e.decode() for e, _ in held]
        found = read_state((yield from self._call_step(ids, mode="early")), mode="early")
        deadlines = [d for _, d in held]
        results, done = decide_held(
            ids, deadlines, found, self.lineage, self.served, self.published_seq, now, self._resolved
        )
        self._note_resolved(ids, deadlines, results, done, now)
        if done:
            yield Io(lambda: _unhold(self.client, k, done), "held labels", lambda c: _unhold(c, k, done))
        self._held_cursor = next_cursor(start, len(held), len(done))
        self.more_held = len(held) == SWEEP_HELD_CHUNK and bool(results or done)
        self._walked(self._waiting(ids, done), wrapped=self._held_cursor == 0)
        return results

    def _resolve_held_buckets_step(self, now: float) -> Step[list[JoinResult]]:
        """:meth:`resolve_held_step` with buckets: per node one call reading each bucket's
        share of its early index, the join's call (:meth:`_call_step`) for their state, and
        one call deleting the holds done with."""
        k = self.keys
        share = max(1, SWEEP_HELD_CHUNK // k.buckets)
        cursors = self._held_cursors
        ids: list[str] = []
        deadlines: list[float] = []
        looked: dict[int, int] = {}
        window = self._held_window.next(k.buckets, SWEEP_HELD_CHUNK)
        ranges = {b: [k.prefixes[b], cursors.get(b, 0), cursors.get(b, 0) + share - 1] for b in window}
        replies = yield self._script_io(None, _HELD_RANGE_LUA_X, ranges, k.early_index_of, "held labels")
        for buckets, per_bucket_reply in replies:
            for b, flat in zip(buckets, per_bucket_reply, strict=True):
                looked[b] = len(flat) // 2
                ids += (e.decode() for e in flat[0::2])
                deadlines += (float(d) for d in flat[1::2])
        if not ids:
            for b in window:
                cursors.pop(b, None)
            self.more_held = False
            self._walked(False, wrapped=not cursors)
            return []
        found = read_state((yield from self._call_step(ids, mode="early")), mode="early")
        results, done = decide_held(
            ids, deadlines, found, self.lineage, self.served, self.published_seq, now, self._resolved
        )
        self._note_resolved(ids, deadlines, results, done, now)
        gone = by_bucket(k.buckets, done)
        if done:
            groups = {b: [k.prefixes[b], *(done[i] for i in idx)] for b, idx in gone.items()}
            yield self._script_io(None, _UNHOLD_LUA_X, groups, k.early_index_of, "held labels")
        for b, n in looked.items():
            nxt = next_cursor(cursors.get(b, 0), n, len(gone.get(b, ())), share)
            if nxt:
                cursors[b] = nxt
            else:
                cursors.pop(b, None)
        self.more_held = any(n == share for n in looked.values()) and bool(results or done)
        self._walked(self._waiting(ids, done), wrapped=not cursors)
        return results

    def _waiting(self, ids: Sequence[str], done: Sequence[str]) -> bool:
        """Whether a chunk of held labels, once decided, still has some waiting for their
        events (neither resolved by this learner nor gone)."""
        gone = set(done)
        mine = self._resolved
        return any(eid not in mine and eid not in gone for eid in ids)

    def _walked(self, waiting: bool, wrapped: bool) -> None:
        """Set :attr:`held_waiting` after a chunk: True mid-walk (the rest of the index is
        not looked at yet), and at the walk's end whether any chunk of it had labels waiting."""
        self._walk_waiting = self._walk_waiting or waiting
        if wrapped:
            self.held_waiting, self._walk_waiting = self._walk_waiting, False
        else:
            self.held_waiting = True

    def _note_resolved(
        self,
        ids: Sequence[str],
        deadlines: Sequence[float],
        results: Sequence[JoinResult],
        done: Sequence[str],
        now: float,
    ) -> None:
        """Remember the held labels resolved now until their holds go (``done``).

        Bounded: an id the sweep never looks at again (its index entry trimmed by a later
        hold) is forgotten two horizons after its deadline, and past
        :data:`UNPUBLISHED_CAP` ids the oldest are (a learner that never snapshots)."""
        mine = self._resolved
        for eid in done:
            mine.pop(eid, None)
        learned = [r.event_id for r in results if r.outcome == "resolved"]
        if learned:
            at = dict(zip(ids, deadlines, strict=True))
            for eid in learned:
                mine[eid] = at[eid]
        horizon = self.spec.labels.horizon
        if mine and now - self._resolved_pruned >= horizon:
            self._resolved_pruned = now
            for eid in [e for e, d in mine.items() if d < now - 2 * horizon]:
                del mine[eid]
        while len(mine) > UNPUBLISHED_CAP:
            del mine[next(iter(mine))]

    #: the last chunk of held labels was full and decided some: look at the next one soon
    more_held: bool = False
    #: the last walk of the early index found labels still waiting for their events (or is
    #: not at the index's end): look again soon, not a sweep later
    held_waiting: bool = False
    _walk_waiting: bool = False
    #: seq of the newest published snapshot of this run (set by the learner)
    published_seq: int = -1


def dead_letter(
    reason: str,
    detail: str,
    topic: str,
    partition: int | None,
    offset: int | None,
    value: bytes | None,
    key: bytes | None = None,
) -> bytes:
    """A dead-letter record (the contract of :func:`weir.contracts.encode_dead_letter`)."""
    from weir.contracts import encode_dead_letter

    return encode_dead_letter(DeadLetter(reason, detail, topic, partition, offset, value, key, time.time()))
