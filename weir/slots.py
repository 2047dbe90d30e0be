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
the asyncio client. A script touching keys of several slots on its node declares one key
per slot and carries ``#!lua flags=allow-cross-slot-keys`` (Redis >= 7.0).

A call sent to a node that no longer owns a slot (a resharding, a failover not yet seen)
fails with ``MOVED``: redis-py updates its slot map and raises, Weir's retry
(:func:`weir.resilience.is_transient` counts it transient) sends the whole batch again,
grouped on the new map; every script is idempotent for a retried batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence
from typing import Any, Literal

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
    that node without redis-py's own slot check (which refuses keys of several slots even
    on one node) and without its retries: a ``MOVED`` is raised for Weir's retry to regroup.
    Works for the sync and the asyncio clients (the latter returns an awaitable).
    """
    if node is None:
        return client.execute_command(*args)
    return client.execute_command(*args, target_nodes=node)


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
