"""One pipeline's keys over every master of a Redis Cluster (docs/scaling.md, stage 2).

Stage 1 put every key of a pipeline in one hash slot (``weir:{<name>}``), so one master
did all of its Redis work. Stage 2 spreads the per-entity and per-event keys over
``spec.redis.buckets`` hash tags: an entity's keys (its window, its meta, the ``applied``
offsets and ``recent`` ids of its bucket) are under ``weir:{<name>#e<b>}`` with
``b = bucket_of(entity_id, buckets)``, an event's join keys (served record, pending,
expired, held labels) under ``weir:{<name>#j<b>}`` with ``b = bucket_of(event_id, buckets)``.
The registry keeps ``weir:{<name>}``: a few calls a second, one node is enough.

With ``buckets == 1`` (the default, and what a single Redis needs) every prefix is the
stage-1 prefix ``weir:{<name>}``: the same keys as before, one group, one call.

A batch's work is grouped by the node owning each bucket's slot (:func:`group_by_node`)
and each group goes as one call to that node (:func:`call`), all nodes in parallel for
the asyncio client. A script touching keys of several slots on its node declares ONE of
them (Redis refuses declared keys of several slots, ``CROSSSLOT``, whatever the flags),
names the others in its arguments, and carries ``#!lua flags=allow-cross-slot-keys``
(Redis >= 7.0; checked on 7.0.15: without the flag a script with flags fails with "Script
attempted to access keys that do not hash to the same slot"; a script without flags is
allowed it, for compatibility; a key of another node fails with "Script attempted to
access a non local key", with the writes before it kept).

A call sent to a node that no longer owns a slot (a resharding, a failover not yet seen)
fails: ``MOVED`` for its declared key (redis-py follows it), "non local key" for another
(:func:`not_local`; a script checks all of its slots before writing). The slot map is
then reloaded (:func:`refresh_slots`) and a transient error raised (:func:`moved`):
Weir's retry (:func:`weir.resilience.is_transient`) sends the whole batch again, grouped
on the new map; every script is idempotent for a retried batch.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Awaitable, Hashable, Sequence
from typing import Any, Literal

from redis.exceptions import ClusterError, RedisClusterException

Kind = Literal["e", "j"]
"""``e``: entity buckets (features); ``j``: event-id buckets (the label join)."""


def bucket_of(ident: str, buckets: int) -> int:
    """The bucket of an entity or event id: CRC32 of its UTF-8 bytes modulo ``buckets``.

    Stable across processes, Python versions and hosts (unlike ``hash``), so a scorer and
    a learner compute the same bucket from the id alone.

    >>> bucket_of("user-1", 1)
    0
    >>> bucket_of("user-1", 64) == bucket_of("user-1", 64) < 64
    True
    """
    if buckets <= 1:
        return 0
    return zlib.crc32(ident.encode()) % buckets


def bucket_prefix(name: str, kind: Kind, bucket: int, buckets: int) -> str:
    """The key prefix of a bucket of pipeline ``name``.

    >>> bucket_prefix("demo", "e", 0, 1)
    'weir:{demo}'
    >>> bucket_prefix("demo", "e", 7, 64)
    'weir:{demo#e7}'
    >>> bucket_prefix("demo", "j", 7, 64)
    'weir:{demo#j7}'
    """
    if buckets <= 1:
        return f"weir:{{{name}}}"
    return f"weir:{{{name}#{kind}{bucket}}}"


def is_cluster(client: Any) -> bool:
    """True for redis-py's ``RedisCluster`` (sync or asyncio)."""
    return hasattr(client, "nodes_manager") and hasattr(client, "keyslot")


def group_by_node(client: Any, keys: Sequence[str]) -> list[tuple[Any, list[int]]]:
    """Indices of ``keys`` grouped by the node that owns each key's slot, in first-seen order.

    One group ``(None, all indices)`` for a single Redis (or no keys). For a cluster the
    node is redis-py's ``ClusterNode`` from the client's current slot map. Keys repeat in a
    batch (one per event, a bucket's prefix for many events): the slot and node are looked
    up once per distinct key.
    """
    if not keys:
        return []
    if not is_cluster(client):
        return [(None, list(range(len(keys))))]
    by_key: dict[str, Hashable] = {}
    groups: dict[Hashable, tuple[Any, list[int]]] = {}
    manager = client.nodes_manager
    for i, key in enumerate(keys):
        name = by_key.get(key)
        if name is None:
            node = manager.get_node_from_slot(client.keyslot(key))
            name = by_key[key] = node.name
            if name not in groups:
                groups[name] = (node, [])
        groups[name][1].append(i)
    return list(groups.values())


def call(client: Any, node: Any, *args: Any) -> Any:
    """``execute_command(*args)`` on ``node`` (a group of :func:`group_by_node`).

    For a single Redis (``node`` None) the plain call. For a cluster the command goes to
    that node without redis-py's own slot check (it refuses keys of several slots even on
    one node). Works for the sync and the asyncio clients (the latter returns an awaitable).

    On a ``MOVED`` (the call's declared key's slot moved) redis-py (8.x) updates its slot
    map and sends the command again to the new owner of that slot (which may not hold the
    call's other slots: then :func:`not_local`). A ``RedisClusterException`` (not a
    ``RedisError``: a slot not covered, redirections to keys of several slots) is raised
    here as a ``ClusterError``, which :func:`weir.resilience.is_transient` counts transient:
    the retry regroups the batch on the updated map.
    """
    if node is None:
        return client.execute_command(*args)
    try:
        out = client.execute_command(*args, target_nodes=node)
    except RedisClusterException as exc:
        raise moved(node, exc) from exc
    if inspect.isawaitable(out):
        return _guarded(out, node)
    return out


async def _guarded(pending: Awaitable[Any], node: Any) -> Any:
    try:
        return await pending
    except RedisClusterException as exc:
        raise moved(node, exc) from exc


def call_checked(client: Any, node: Any, *args: Any) -> Any:
    """:func:`call` with a sync client; a script's "non local key" (a slot of the call moved
    since the batch was grouped) reloads the slot map and is raised as :func:`moved`."""
    try:
        return call(client, node, *args)
    except Exception as exc:
        if node is None or not not_local(exc):
            raise
        client.nodes_manager.initialize()
        raise moved(node, exc) from exc


async def acall_checked(client: Any, node: Any, *args: Any) -> Any:
    """:func:`call_checked` for the asyncio client (or the blocking one driven as a coroutine)."""
    try:
        return await call(client, node, *args)
    except Exception as exc:
        if node is None or not not_local(exc):
            raise
        await refresh_slots(client)
        raise moved(node, exc) from exc


def moved(node: Any, exc: BaseException) -> ClusterError:
    """The transient error of a call whose slots are not (all) on ``node`` any more."""
    return ClusterError(
        f"a slot of a call to node {getattr(node, 'name', node)} moved or is not served ({exc}); "
        "the slot map is refreshed and the call is retried, grouped anew"
    )


def not_local(exc: BaseException) -> bool:
    """Whether a script failed on a key of a slot its node does not serve (a slot that moved
    after the batch was grouped): Redis 7's "Script attempted to access a non local key".

    >>> not_local(Exception("ERR Script attempted to access a non local key in a cluster node"))
    True
    """
    return "non local key" in str(exc)


async def ensure_slot_map(client: Any) -> None:
    """Load an asyncio cluster client's slot map if it has none yet, or was told to reload
    it (redis-py loads it lazily, at its first command, and after a connection error at the
    next): :func:`group_by_node` reads it. Nothing for a sync cluster client (loaded when
    built) or a single Redis."""
    if not is_cluster(client):
        return
    init = getattr(client, "initialize", None)  # the asyncio client's; the sync one has none
    if init is not None and (not client.nodes_manager.slots_cache or getattr(client, "_initialize", False)):
        done = init()
        if inspect.isawaitable(done):
            await done


async def refresh_slots(client: Any) -> None:
    """Reload a cluster client's slot map (sync or asyncio client; nothing for a single Redis)."""
    manager = getattr(client, "nodes_manager", None)
    if manager is None:
        return
    done = manager.initialize()
    if inspect.isawaitable(done):
        await done


def key_pattern(name: str) -> str:
    """A ``SCAN MATCH`` pattern for every key of pipeline ``name``, whatever its buckets.

    ``weir:{<name>}...`` (stage 1, the registry) and ``weir:{<name>#...}...`` (buckets), not
    another pipeline whose name starts with ``name``:

    >>> import fnmatch
    >>> p = key_pattern("demo")
    >>> [fnmatch.fnmatchcase(k, p) for k in ("weir:{demo}:applied", "weir:{demo#e3}:win:u", "weir:{demo2}:x")]
    [True, True, False]
    """
    return f"weir:{{{name}[}}#]*"


def prefix_pattern(prefix: str) -> str:
    """The ``SCAN MATCH`` pattern of the keys under ``prefix``: for a pipeline's prefix
    (``spec.redis_prefix``, ``weir:{<name>}``) its buckets' keys too (:func:`key_pattern`),
    for any other prefix ``<prefix>:*``.

    >>> prefix_pattern("weir:{demo}"), prefix_pattern("weir:{demo#e3}"), prefix_pattern("x:y")
    ('weir:{demo[}#]*', 'weir:{demo#e3}:*', 'x:y:*')
    """
    if prefix.startswith("weir:{") and prefix.endswith("}") and "#" not in prefix:
        return key_pattern(prefix[6:-1])
    return f"{prefix}:*"
