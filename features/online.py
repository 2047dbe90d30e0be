"""The online feature engine: per-entity windows in Redis, one round trip per batch.

A batch is one ``EVALSHA`` of the spec's generated Lua script (:mod:`features.lua`), which
runs the events in arrival order, so events of the same entity in a batch see each other.
Per event the script: recognises a redelivery (by its Kafka offset, or by its event id
within ``scoring.dedupe_horizon``) and answers it with the features it was first served;
rejects a late event; computes the features from the entity's window ZSET; stores the
event; trims what no acceptable window can reach; and renews every TTL
(docs/features.md). A script runs atomically, so no other client sees a batch half applied.

Keys (prefix = ``spec.redis_prefix``, ``weir:{<name>}``, with ``spec.redis.buckets`` 1;
with more, the prefix of the entity's bucket ``weir:{<name>#e<b>}``, :mod:`weir.slots`),
every one with a TTL; none is per event:

* ``{prefix}:win:{entity_id}`` ZSET of accepted events; TTL max window + lateness + 300 s
  + 60 s, renewed at most once a minute (:func:`features.lua.ttl_renew`), so it outlives the
  entity's last accepted event by more than max window + lateness + 300 s.
* ``{prefix}:meta:{entity_id}`` hash (``wm`` watermark, ``seq`` arrival count, ``p<k>``
  newest time of a present value per stored field for the feature ages, docs/features.md#freshness,
  the time tiles of the value windows, docs/features.md#tiles, ``x`` the last TTL renewal);
  same TTL.
* ``{prefix}:applied`` hash: per ``<events topic>:<partition>`` the highest offset whose
  event the script has decided (accepted, late or duplicate), advanced in the same script
  call as the event's effects; TTL :data:`features.lua.APPLIED_TTL` (a week). With
  buckets, one per bucket: the offsets of that bucket's events (a partition's events are
  run in offset order and a bucket's are a subsequence of them, so an offset at or below
  the bucket's is a redelivery).
* ``{prefix}:recent:{n}`` hash: event id -> first served features of the events accepted
  in the n-th ``scoring.dedupe_horizon`` of wall time (Redis ``TIME``). Two are read, the
  one before is unlinked: an id is remembered at least one dedupe horizon, at most two.
  With buckets, one per bucket (a producer's retry has the same entity, so the same bucket).

**Buckets** (``spec.redis.buckets`` > 1, docs/scaling.md, stage 2). A batch's events are
grouped by the node owning their bucket's slot and each group is one script call to that
node (all nodes at once for the asyncio client), naming the ``applied`` key of every bucket
it touches (the first declared); the results come back in the batch's order. A retried batch after a
partial failure (a node applied its group, another answered ``MOVED``) is safe: the
applied part is then redeliveries, answered with their first served features.

**Guarantee.** An event is never counted twice in a window when it comes again as the
same Kafka message (same topic, partition and offset, given through ``positions``), however
late, nor under another offset or with no position within ``scoring.dedupe_horizon`` of its
first acceptance. The features a redelivered event is answered with are exactly those first
served when it is still in ``recent`` or its served record (``P:served:``, written by the
scorer and deleted once its label is learned) is still there; otherwise they are computed
from the window as it is now, without storing the event again (events that arrived since
are then counted in, and the event itself). A late event is late again. With buckets
the served record is in the event's join bucket, maybe on another node: the script answers
``r`` for such a redelivery and this module reads the records (one call per node), a rare
path (redeliveries older than the dedupe horizon).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from redis.exceptions import NoScriptError, RedisError

from features.base import (
    FeatureResult,
    bad_value,
    check_ts,
    dedupe_seconds,
    missing_value,
    output_type,
    used_fields,
)
from features.freshness import freshness_names
from features.lua import build_script, packs_recent
from weir.errors import FeatureError
from weir.slots import (
    acall_checked,
    bucket_of,
    bucket_prefix,
    call,
    ensure_slot_map,
    group_by_node,
)
from weir.spec import FieldSpec, PipelineSpec
from weir.types import Event, FeatureValue, FeatureVector

if TYPE_CHECKING:
    import redis

_Encoder = Callable[[Any, Any], str]
#: Where an event was read: ``(topic, partition, offset)`` of its Kafka message.
Position = tuple[str, int, int]
_Decoder = Callable[[str], FeatureValue]
T = TypeVar("T")


def _escape(s: str) -> str:
    return s.replace("%", "%25").replace("|", "%7C")


def _unescape(s: str) -> str:
    # Every '%' of an escaped string starts '%25' or '%7C', so this order is exact.
    return s.replace("%7C", "|").replace("%25", "%")


def _encoder(name: str, fs: FieldSpec) -> _Encoder:
    """Field value -> token (see features.lua); raises FeatureError for a bad value."""
    required = fs.required

    def missing(event_id: Any) -> str:
        if required:
            raise missing_value(name, event_id)
        return ""

    if fs.type == "numeric":

        def enc_num(v: Any, event_id: Any) -> str:
            tv = type(v)
            if tv is float:
                if v - v == 0.0:  # finite; NaN and inf give NaN
                    return repr(v + 0.0)  # -0.0 -> 0.0
                if v != v:
                    return missing(event_id)
                raise bad_value(name, "numeric", v, event_id)
            if v is None:
                return missing(event_id)
            if tv is int or tv is bool:
                return repr(float(v))
            if isinstance(v, int | float) and not isinstance(v, str):
                return enc_num(float(v), event_id)
            raise bad_value(name, "numeric", v, event_id)

        return enc_num

    if fs.type == "boolean":

        def enc_bool(v: Any, event_id: Any) -> str:
            if v is True:
                return "1"
            if v is False:
                return "0"
            if v is None or v != v:  # None, or NaN (pandas' missing)
                return missing(event_id)
            raise bad_value(name, "boolean", v, event_id)

        return enc_bool

    def enc_cat(v: Any, event_id: Any) -> str:
        if type(v) is str:
            if "%" in v or "|" in v:
                return "s" + _escape(v)
            return "s" + v
        if v is None or v != v:  # None, or NaN (pandas' missing)
            return missing(event_id)
        raise bad_value(name, "categorical", v, event_id)

    return enc_cat


def _dec_number(p: str) -> FeatureValue:
    return float(p) if p else None


def _dec_string(p: str) -> FeatureValue:
    return _unescape(p[1:]) if p else None


#: The values of the keys in ``ARGV`` in one call (``false`` for a missing key), across
#: slots of the node it runs on (the first also declared, ``KEYS[1]``: it routes the call):
#: the served records of old redeliveries (buckets only, a rare path).
_GET_LUA = """#!lua flags=no-writes,allow-cross-slot-keys
local r = {}
for i = 1, #ARGV do r[i] = redis.call('GET', ARGV[i]) end
return r
"""


class RedisFeatureStore:
    """The online engine for one pipeline spec.

    Args:
        spec: The pipeline spec; its features, fields, lateness, label horizon and
            ``redis_prefix`` define the script, the keys and their TTLs.

    Attributes:
        script: The generated Lua source; ``sha`` its sha1 (the ``EVALSHA`` name).

    Use one instance per process and spec; it holds no connection and no per-entity state,
    so it is safe to share between threads and tasks.
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.script = build_script(spec)
        self.sha = hashlib.sha1(self.script.encode()).hexdigest()
        self._prefix = spec.redis_prefix
        self.buckets = spec.redis.buckets
        #: with buckets, each bucket's applied key (the key a call names its bucket by)
        self._applied_keys = [
            bucket_prefix(spec.name, "e", b, self.buckets) + ":applied" for b in range(self.buckets)
        ]
        self._fields = used_fields(spec)
        self._encoders = [(n, _encoder(n, spec.fields[n])) for n in self._fields]
        self._names = spec.feature_names
        self._nfeat = len(self._names)
        self._fresh = freshness_names(spec)  # the ages the script appends (features.freshness)
        kinds = [output_type(spec, i) for i in range(len(spec.features))]
        self._all_numbers = all(k == "number" for k in kinds)
        self._decoders: list[_Decoder] = [_dec_string if k == "string" else _dec_number for k in kinds]
        self._packed = struct.Struct(f"<{len(kinds)}d") if packs_recent(spec) else None

    def __repr__(self) -> str:
        return f"RedisFeatureStore(spec={self.spec.name!r})"

    # -- keys -------------------------------------------------------------------------

    def prefix_of(self, entity_id: str) -> str:
        """The key prefix of the entity's bucket (``spec.redis_prefix`` with one bucket)."""
        if self.buckets == 1:
            return self._prefix
        return bucket_prefix(self.spec.name, "e", bucket_of(entity_id, self.buckets), self.buckets)

    def window_key(self, entity_id: str) -> str:
        """The ZSET of the entity's accepted events."""
        return f"{self.prefix_of(entity_id)}:win:{entity_id}"

    def meta_key(self, entity_id: str) -> str:
        """The hash of the entity's watermark, arrival count, feature ages and tiles."""
        return f"{self.prefix_of(entity_id)}:meta:{entity_id}"

    def recent_keys(self, now: float | None = None, entity_id: str | None = None) -> tuple[str, str]:
        """The hashes of first served features that are read now (this window, the last);
        with buckets, those of ``entity_id``'s bucket."""
        self._one_bucket_or(entity_id, "recent_keys")
        n = int((time.time() if now is None else now) // dedupe_seconds(self.spec))
        p = self._prefix if entity_id is None else self.prefix_of(entity_id)
        return f"{p}:recent:{n}", f"{p}:recent:{n - 1}"

    @property
    def applied_key(self) -> str:
        """The hash of the highest applied offset per events topic and partition (one
        bucket; with several, :meth:`applied_key_of`)."""
        self._one_bucket_or(None, "applied_key")
        return f"{self._prefix}:applied"

    def applied_key_of(self, entity_id: str) -> str:
        """The applied offsets of ``entity_id``'s bucket (``applied_key`` with one bucket)."""
        return f"{self.prefix_of(entity_id)}:applied"

    def _one_bucket_or(self, entity_id: str | None, what: str) -> None:
        if entity_id is None and self.buckets > 1:
            raise FeatureError(
                f"{what}: with redis.buckets={self.buckets} the key depends on the entity's "
                "bucket; pass entity_id (or use applied_key_of)"
            )

    # -- encoding and decoding ------------------------------------------------------

    def _commands(
        self, events: Sequence[Event], positions: Sequence[Position] | None = None
    ) -> list[tuple[Any, ...]]:
        """The ``EVALSHA`` argument tuple of the batch; validates every event before any runs.

        One command (see :mod:`features.lua` for the layout of its batch argument).
        """
        parts = self._encode(events, positions)
        # One declared key (the script derives the others from the prefix, all in the
        # pipeline's hash slot): a Redis Cluster client sends the call to that slot's node.
        return [("EVALSHA", self.sha, 1, self.applied_key, self._prefix, "".join(parts))]

    def _encode(self, events: Sequence[Event], positions: Sequence[Position] | None) -> list[str]:
        """Four length-prefixed strings per event (:mod:`features.lua`); validates every event."""
        if positions is not None and len(positions) != len(events):
            raise FeatureError(
                f"positions must give one (topic, partition, offset) per event: got {len(positions)} "
                f"for {len(events)} events"
            )
        encoders = self._encoders
        parts: list[str] = []
        add = parts.append
        for i, e in enumerate(events):
            eid, ent, data = e.event_id, e.entity_id, e.data
            ts = e.ts
            if type(ts) is not float or ts - ts != 0.0:
                ts = check_ts(ts, eid)
            rest = repr(ts + 0.0) + "|" + "|".join([enc(data.get(name), eid) for name, enc in encoders])
            # Lengths in bytes (Lua strings are bytes); ids and tokens are mostly ASCII.
            add(f"{len(ent) if ent.isascii() else len(ent.encode())}:{ent}")
            add(f"{len(eid) if eid.isascii() else len(eid.encode())}:{eid}")
            add(f"{len(rest) if rest.isascii() else len(rest.encode())}:{rest}")
            if positions is None:
                add("0:")
            else:
                topic, partition, offset = positions[i]
                where = f"{topic}:{partition}|{int(offset)}"
                add(f"{len(where)}:{where}")
        return parts

    def _bucket_calls(
        self, client: Any, events: Sequence[Event], positions: Sequence[Position] | None
    ) -> list[tuple[Any, list[int], tuple[Any, ...]]]:
        """With buckets: ``(node, event indices, EVALSHA args)`` per node of the batch.

        Each call names the ``applied`` key of every bucket its events are in (``ARGV[2:]``,
        the first also declared: it routes the call) and each event its bucket's place
        there (:data:`features.lua._MANY`). A call's events go bucket by bucket, each
        bucket's in the batch's order: only events of one bucket share keys.
        """
        parts = self._encode(events, positions)
        n = self.buckets
        by_bucket: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            ent = e.entity_id
            b = zlib.crc32(ent.encode()) % n  # weir.slots.bucket_of
            got = by_bucket.get(b)
            if got is None:
                by_bucket[b] = [i]
            else:
                got.append(i)
        buckets = list(by_bucket)
        keys = [self._applied_keys[b] for b in buckets]
        calls = []
        for node, which in group_by_node(client, keys):
            idx: list[int] = []
            body: list[str] = []
            for k, j in enumerate(which, start=1):
                ks = str(k)
                tag = f"{len(ks)}:{ks}"
                for i in by_bucket[buckets[j]]:
                    idx.append(i)
                    body.append(tag)
                    body += parts[4 * i : 4 * i + 4]
            names = [keys[j] for j in which]
            calls.append((node, idx, ("EVALSHA", self.sha, 1, names[0], "".join(body), *names)))
        return calls

    def _features(self, body: str) -> FeatureVector:
        parts = body.split("|")[: self._nfeat]  # the ages, if any, follow the features
        if self._all_numbers:
            return dict(zip(self._names, [float(p) if p else None for p in parts], strict=True))
        return {n: d(p) for n, d, p in zip(self._names, self._decoders, parts, strict=True)}

    def _recent(self, raw: bytes | str) -> FeatureVector:
        """The features of a recent-ids entry (packed doubles, or tokens)."""
        if self._packed is not None:
            # bytes: a client that decodes replies cannot read packed values
            # unpack_from: the ages follow the features in an entry
            values = self._packed.unpack_from(raw if isinstance(raw, bytes) else raw.encode("latin-1"))
            return {n: (None if v != v else v) for n, v in zip(self._names, values, strict=True)}
        return self._features(raw.decode() if isinstance(raw, bytes) else raw)

    def _decode(self, reply: Any) -> FeatureResult:
        s = reply.decode() if isinstance(reply, bytes) else reply
        if s == "l":
            return FeatureResult("late", None)
        parts = s[2:].split("|")
        n = self._nfeat
        # The ages follow the features (none from a script built without them, or from a
        # recent entry written before them: then freshness is None).
        fresh: dict[str, float | None] | None = None
        features: FeatureVector
        if self._all_numbers:
            values = [float(p) if p else None for p in parts]
            if len(values) == n:
                features = dict(zip(self._names, values, strict=True))
            else:
                features = dict(zip(self._names, values[:n], strict=True))
                fresh = dict(zip(self._fresh, values[n:], strict=True))
            return FeatureResult("ok" if s[0] == "o" else "duplicate", features, fresh)
        features = {k: d(p) for k, d, p in zip(self._names, self._decoders, parts[:n], strict=True)}
        if len(parts) > n:
            fresh = dict(zip(self._fresh, [float(a) if a else None for a in parts[n:]], strict=True))
        return FeatureResult("ok" if s[0] == "o" else "duplicate", features, fresh)

    @staticmethod
    def _failed(exc: RedisError) -> FeatureError:
        if isinstance(exc, NoScriptError):
            return FeatureError("Redis lost the feature script twice in a row; retry later")
        return FeatureError(
            f"the feature batch failed in Redis: {exc}; check the Redis server (version >= 6.2, "
            ">= 7.0 with redis.buckets > 1) and that the spec is valid"
        )

    def _check(self, replies: Any, n: int) -> None:
        if not isinstance(replies, list) or len(replies) != n:
            got = len(replies) if isinstance(replies, list) else type(replies).__name__
            raise FeatureError(
                f"the feature script answered {got} result(s) for {n} event(s); is another "
                f"script loaded under sha {self.sha}? Run SCRIPT FLUSH on Redis"
            )

    def _results(self, replies: Any, n: int) -> list[FeatureResult]:
        self._check(replies, n)
        decode = self._decode
        return [decode(r) for r in replies]

    # -- the one path: async; compute_batch drives it for a blocking client ---------

    async def acompute_batch(
        self,
        client: _AsyncClient,
        events: Sequence[Event],
        positions: Sequence[Position] | None = None,
    ) -> list[FeatureResult]:
        """Compute and record the features of a batch in one round trip.

        Args:
            client: A ``redis.asyncio.Redis`` (bytes or decoded responses).
            events: Validated events in arrival order.
            positions: Each event's Kafka message as ``(topic, partition, offset)``, so a
                redelivered message is recognised by its offset (see the module); None
                when the events did not come from Kafka (then by event id only).

        Returns:
            One :class:`FeatureResult` per event, in order.

        Raises:
            FeatureError: an event breaks the spec (nothing of the batch is applied), or
                Redis answered with an error.
        """
        if not events:
            return []
        if self.buckets > 1:
            return await self._acompute_buckets(client, events, positions)
        (cmd,) = self._commands(events, positions)
        try:
            try:
                replies = await client.execute_command(*cmd)
            except NoScriptError:
                # The script cache was empty (restart, SCRIPT FLUSH): load it, run again.
                await client.script_load(self.script)
                replies = await client.execute_command(*cmd)
        except RedisError as exc:
            raise self._failed(exc) from exc
        return self._results(replies, len(events))

    async def _acompute_buckets(
        self, client: Any, events: Sequence[Event], positions: Sequence[Position] | None
    ) -> list[FeatureResult]:
        """:meth:`acompute_batch` with buckets: one call per node, then the served records
        of old redeliveries (``r`` replies)."""
        await ensure_slot_map(client)
        calls = self._bucket_calls(client, events, positions)

        async def run(node: Any, args: tuple[Any, ...]) -> Any:
            # A bucket's slot moved since the grouping (checked before any write): a fresh
            # slot map, then a transient error (acall_checked; the retry regroups).
            try:
                try:
                    return await acall_checked(client, node, *args)
                except NoScriptError:
                    # On every master: redis-py may have followed a MOVED to another node
                    # than ``node`` (after a failover, the promoted replica lacks it too).
                    targets = node if node is None else client.get_primaries()
                    await call(client, targets, "SCRIPT", "LOAD", self.script)
                    return await acall_checked(client, node, *args)
            except RedisError as exc:
                raise self._failed(exc) from exc

        if len(calls) == 1 or isinstance(client, _Blocking):
            # A blocking client (compute_batch) has no event loop to gather on: one by one.
            replies = [await run(node, args) for node, _, args in calls]
        else:
            # Every node's call ended before a failure is raised: a retry never overlaps a
            # call of the attempt before.
            pending = [run(node, args) for node, _, args in calls]
            replies = list(await asyncio.gather(*pending, return_exceptions=True))
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
        raw: list[Any] = [None] * len(events)
        for (_, idx, _), got in zip(calls, replies, strict=True):
            self._check(got, len(idx))
            for i, r in zip(idx, got, strict=True):
                raw[i] = r
        late = FeatureResult("late", None)  # a placeholder for an 'r' until its record is read
        again: list[int] = []
        decode = self._decode
        out: list[FeatureResult] = []
        for i, r in enumerate(raw):
            if r[:1] in (b"r", "r"):
                again.append(i)
                out.append(late)
            else:
                out.append(decode(r))
        if again:
            await self._redelivered(client, events, raw, again, out)
        return out

    async def _redelivered(
        self, client: Any, events: Sequence[Event], raw: list[Any], again: list[int], out: list[FeatureResult]
    ) -> None:
        """The results of redeliveries no longer in ``recent`` (buckets): the features of
        their served record (``models.join``, in the event's join bucket) when it is still
        there, else what the script computed read-only (``r|...``), or late (``r``)."""
        from models.join import ServedStore

        served = ServedStore(self.spec)
        keys = [served.keys.served(events[i].event_id) for i in again]
        found: list[Any] = [None] * len(again)
        await ensure_slot_map(client)
        try:
            for node, idx in group_by_node(client, keys):
                names = [keys[j] for j in idx]
                got = await acall_checked(client, node, "EVAL", _GET_LUA, 1, names[0], *names)
                for j, rec in zip(idx, got, strict=True):
                    found[j] = rec
        except RedisError as exc:
            raise self._failed(exc) from exc
        for j, i in enumerate(again):
            rec = found[j]
            if rec:
                record = rec if isinstance(rec, bytes) else rec.encode("latin-1")
                out[i] = FeatureResult("duplicate", served.decode(events[i].event_id, record).features)
            elif raw[i] in (b"r", "r"):
                out[i] = FeatureResult("late", None)
            else:
                out[i] = self._decode(raw[i])

    def compute_batch(
        self, client: redis.Redis, events: Sequence[Event], positions: Sequence[Position] | None = None
    ) -> list[FeatureResult]:
        """:meth:`acompute_batch` with a blocking ``redis.Redis`` (tests, benchmarks, tools).

        The same coroutine, driven here: its awaits on a blocking client never suspend, so
        it runs to its end on this thread, with no event loop (also inside a running one).
        """
        return _run_blocking(self.acompute_batch(_Blocking(client), events, positions))

    def served_features(
        self, client: redis.Redis, event_id: str, entity_id: str | None = None
    ) -> FeatureVector | None:
        """The features first served for ``event_id`` while the engine remembers it
        (``scoring.dedupe_horizon``); None if unknown or forgotten. With buckets, give its
        ``entity_id`` (the memory is per entity bucket). The label join reads the scorer's
        served record instead (:class:`models.join.ServedStore`)."""
        for key in self.recent_keys(entity_id=entity_id):
            raw = client.hget(key, event_id)
            if raw is not None:
                return self._recent(raw)
        return None


class _AsyncClient(Protocol):
    """What :meth:`RedisFeatureStore.acompute_batch` calls on its client."""

    def execute_command(self, *args: Any) -> Awaitable[Any]: ...

    def script_load(self, script: str) -> Awaitable[Any]: ...


class _Blocking:
    """A blocking ``redis.Redis`` behind the awaitable methods of :class:`_AsyncClient`;
    each returns at once, so a coroutine awaiting only these never suspends."""

    __slots__ = ("client",)

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.execute_command(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # The cluster client's slot map (weir.slots.group_by_node), when it is one.
        return getattr(self.client, name)

    async def script_load(self, script: str) -> Any:
        return self.client.script_load(script)


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that never suspends (it awaits only :class:`_Blocking`).

    Examples:
        >>> async def two() -> int:
        ...     return 2
        >>> _run_blocking(two())
        2
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise FeatureError(
        "compute_batch needs a blocking redis.Redis client, got one whose calls suspend; "
        "with redis.asyncio.Redis, await acompute_batch instead"
    )
