"""A pipeline's Redis memory, sampled on a timer: never per event.

:class:`RedisFootprint` walks the keyspace with ``SCAN MATCH {prefix}:*`` (``COUNT``
:data:`SCAN_COUNT`, short calls that hold Redis ~2 ms; up to :data:`SCANS_PER_STEP` calls a
step until it holds :data:`STEP_KEYS` of the pipeline's keys: a Redis shared with other keys
is walked as fast as a private one), counts
the pipeline's keys by kind (the segment after the prefix: ``win``, ``meta``, ``recent``,
``applied``, ``served``, ``early``, ``join``, ...) and takes ``MEMORY USAGE`` of the first
:data:`SAMPLE_EVERY` keys of every kind (so a kind of a few large keys, such as ``recent`` or
``join``, is measured whole) and of one key in :data:`SAMPLE_EVERY` after that, in one script
call per step (a pipeline on a cluster).
When a pass ends (the cursor is back at 0) it sets ``weir_redis_keys{pipeline,kind}``,
``weir_redis_memory_bytes{pipeline,kind}`` (keys x mean sampled size) and
``weir_redis_maxmemory_bytes{pipeline}`` (``INFO memory``).

A step's client work is per step, not per key in Python (:meth:`RedisFootprint._count`):
the one-in-N picked by a slice, the kinds by one bytes split per key and ``Counter``. No
key is decoded.
Measured 2026-12-01 (client CPU, ``time.thread_time``; 4-8 passes of each version in
alternation; load 1-5 on 2 shared cores) on a private Redis holding two pipelines of ~124k
keys each (70k served records, 27k entities' windows and meta hashes), one with one
bucket, one with 16, 25 steps a pass: one bucket 308 ms a pass before (12.3 ms a step),
114 ms with the split per key and the MEMORY USAGE script (4.6 ms a step); 16 buckets
344 -> 117 ms a pass. (Counting the kinds as substrings of the step's keys joined into one
bytes took a pass of one bucket to 78 ms: 1.4 ms a step every 2 s, 0.07% of a core, not
worth its second code path; it was taken out.) Before, the per-key
``kind_of``, decode and counter updates were ~60% of a step and the pipeline of ~200
MEMORY USAGE ~15%; what is left is mostly the SCAN reply (receiving and parsing the keys).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from weir.slots import prefix_pattern

#: Slots a SCAN call walks (its ``COUNT``). Redis runs one call at a time, so a call blocks
#: the scorers' feature calls for its length: measured 2026-12-02 on a Redis of 214,000 keys
#: (104,000 the pipeline's), a whole pass in 22 calls of 10,000 took ~12 ms a call (up to 19),
#: in 108 calls of 2,000 ~2.3 ms a call (up to 3.5), the pass ~250 ms either way.
SCAN_COUNT = 2_000
#: The pipeline's keys a step collects before it stops.
STEP_KEYS = 10_000
#: SCAN calls a step makes at most (each a separate command: other clients run between).
SCANS_PER_STEP = 50
#: One key in this many gets a MEMORY USAGE (SAMPLES 5: nested values are sampled too).
SAMPLE_EVERY = 50
#: Seconds between two steps (the learner's sweep decides when).
STEP_EVERY = 2.0


#: MEMORY USAGE (SAMPLES 5) of every key in ARGV, -1 for a key that is gone. The keys are
#: arguments, not declared: a single Redis only (a cluster's step uses a pipeline).
_USAGE_LUA = """
local out = {}
for i = 1, #ARGV do out[i] = redis.call('MEMORY', 'USAGE', ARGV[i], 'SAMPLES', '5') or -1 end
return out
"""


def kind_of(key: bytes | str, prefix: str) -> str:
    """The kind of a pipeline key: its first segment after the prefix.

    Examples:
        >>> kind_of(b"weir:{demo}:win:user:1", "weir:{demo}")
        'win'
        >>> kind_of("weir:{demo}:status", "weir:{demo}")
        'status'
        >>> kind_of("weir:{demo#e3}:win:user:1", "weir:{demo}")  # a bucket's key
        'win'
    """
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    # A bucket's key (weir:{<name>#e<b>}:...): what follows its hash tag.
    rest = text[len(prefix) + 1 :] if text.startswith(prefix + ":") else text.split("}:", 1)[-1]
    return rest.split(":", 1)[0] or "other"


class RedisFootprint:
    """Counts and sizes one pipeline's keys, one SCAN step per :meth:`step`.

    Args:
        prefix: the pipeline's key prefix (``spec.redis_prefix``).
        pipeline: the pipeline's name (the ``pipeline`` label).
        metrics: a :class:`weir.metrics.LearnerMetrics` (its ``redis_*`` gauges), or None.
        sample_every: keys of a kind measured whole, and then one in this many.
    """

    def __init__(
        self, prefix: str, pipeline: str, metrics: Any = None, sample_every: int = SAMPLE_EVERY
    ) -> None:
        self.prefix = prefix
        self.match = prefix_pattern(prefix)  # a pipeline's: its buckets' keys too
        # A key's kind is its segment after the prefix's: a bucket's prefix (weir:{<name>#e<b>})
        # has as many colons as the pipeline's, so one bytes split finds it (no decoding).
        self._at = prefix.count(":") + 1
        self.sample_every = max(1, sample_every)
        self.pipeline = pipeline
        self.metrics = metrics
        self._cursor = 0
        self._node = 0  # on a Redis Cluster: the index of the master being scanned
        self._holders: set[str] = set()  # ... and the masters where this pass found keys
        # kind (bytes, decoded once at the end of a pass) -> keys, sampled keys, sampled bytes
        self._keys: Counter[bytes] = Counter()
        self._sampled: Counter[bytes] = Counter()
        self._bytes: Counter[bytes] = Counter()
        self._seen = 0
        self._script: tuple[Any, Any] | None = None  # (client, its MEMORY USAGE script)
        #: the last full pass: kind -> (keys, estimated bytes)
        self.last: dict[str, tuple[int, int]] = {}

    def step(self, client: Any) -> bool:
        """One step (SCAN calls and their samples); True when it ended a pass (gauges set).

        A step scans until it has :data:`STEP_KEYS` of the pipeline's keys, at most
        :data:`SCANS_PER_STEP` calls: on a Redis shared with other keys most of a call's
        slots are someone else's, and one call per step took a pass over 660,000 keys two
        minutes, the gauges having no series until then.
        """
        masters = _masters(client)
        keys: list[Any] = []
        ended = False
        for _ in range(SCANS_PER_STEP):
            got, ended = self._scan(client, masters)
            keys += got
            if ended or len(keys) >= STEP_KEYS:
                break
        sample = self._count(keys)
        if sample:
            for (kind, _), used in zip(sample, self._usage(client, masters, sample), strict=True):
                if used is None or used < 0:  # gone between SCAN and MEMORY USAGE
                    self._sampled[kind] -= 1
                else:
                    self._bytes[kind] += int(used)
        if not ended:
            return False
        self._publish(client, masters)
        self._node, self._holders = 0, set()
        return True

    def _scan(self, client: Any, masters: list[Any] | None) -> tuple[list[Any], bool]:
        """One SCAN call from the cursor: the pipeline's keys it found, and whether the pass
        is over (the cursor back at 0; on a cluster, on its last master)."""
        if masters is None:
            cursor, keys = client.scan(self._cursor, match=self.match, count=SCAN_COUNT)
            self._cursor = int(cursor)
            return keys, self._cursor == 0
        # A cluster's SCAN is per node: walk the masters one after the other; the pass
        # ends with the last one's cursor back at 0.
        node = masters[min(self._node, len(masters) - 1)]
        cursors, keys = client.scan(self._cursor, match=self.match, count=SCAN_COUNT, target_nodes=node)
        self._cursor = int(cursors[node.name])
        if keys:
            self._holders.add(node.name)
        more = self._node < len(masters) - 1
        if self._cursor == 0 and more:
            self._node += 1  # the next master, from its start
        return keys, self._cursor == 0 and not more

    def _usage(self, client: Any, masters: list[Any] | None, sample: list[tuple[bytes, Any]]) -> list[Any]:
        """``MEMORY USAGE key SAMPLES 5`` of the sampled keys (-1 or None: gone). On a single
        Redis one script call (:data:`_USAGE_LUA`; a pipeline of ~200 commands cost ~6 times
        its client CPU in redis-py's packing and parsing); on a cluster a pipeline (split by
        node by redis-py: the keys of a step are on the master scanned, in many slots)."""
        keys = [key for _, key in sample]
        if masters is None:
            if self._script is None or self._script[0] is not client:
                self._script = (client, client.register_script(_USAGE_LUA))
            return list(self._script[1](args=keys))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=5)
        return list(pipe.execute())

    def _kinds(self, keys: list[Any]) -> list[bytes]:
        """Each key's kind, as bytes; one list comprehension, no call per key."""
        at, split = self._at, self._at + 1
        try:
            kinds = [k.split(b":", split)[at] for k in keys]
        except (IndexError, TypeError):  # a key without a kind (or str keys): one at a time
            return [kind_of(k, self.prefix).encode() for k in keys]
        if b"" in kinds:  # an empty segment reads "other", as kind_of says
            kinds = [k or b"other" for k in kinds]
        return kinds

    def _count(self, keys: list[Any]) -> list[tuple[bytes, Any]]:
        """Count a step's keys by kind and pick the ones to measure: the first
        ``sample_every`` keys of every kind in the pass (a few large hashes and sorted sets:
        recent, join, applied, measured whole) and one in ``sample_every`` keys seen (a
        large kind: a key per entity or event). Done in bulk: the one-in-N by a slice, the
        kinds by one bytes split per key and ``Counter``; never a Python function call, a
        decode and two counter updates per key."""
        if not keys:
            return []
        every = self.sample_every
        # the seen-th key of the pass (1-based) is measured when seen % every == 0
        picked = set(range((-self._seen - 1) % every, len(keys), every))
        kinds = self._kinds(keys)
        counts = Counter(kinds)
        for kind, n in counts.items():
            at = -1
            for _ in range(min(every - self._keys[kind], n)):  # still to measure whole
                at = kinds.index(kind, at + 1)
                picked.add(at)
        sample = [(kinds[i], keys[i]) for i in sorted(picked)]
        self._keys.update(counts)
        self._seen += len(keys)
        self._sampled.update(kind for kind, _ in sample)
        return sample

    def _publish(self, client: Any, masters: list[Any] | None = None) -> None:
        last: dict[str, tuple[int, int]] = {}
        for raw, n in self._keys.items():
            mean = self._bytes[raw] / self._sampled[raw] if self._sampled[raw] else 0.0
            last[raw.decode(errors="replace")] = (n, int(n * mean))
        m = self.metrics
        if m is not None:
            for kind in set(self.last) - set(last):  # a kind that is gone reads 0
                m.redis_keys.labels(self.pipeline, kind).set(0)
                m.redis_memory.labels(self.pipeline, kind).set(0)
            for kind, (n, size) in last.items():
                m.redis_keys.labels(self.pipeline, kind).set(n)
                m.redis_memory.labels(self.pipeline, kind).set(size)
            m.redis_maxmemory.labels(self.pipeline).set(self._maxmemory(client, masters))
        self.last = last
        self._keys, self._sampled, self._bytes, self._seen = Counter(), Counter(), Counter(), 0

    def _maxmemory(self, client: Any, masters: list[Any] | None) -> float:
        """``maxmemory`` of the Redis; on a cluster, summed over the masters holding the
        pipeline's keys (all masters before any key exists). 0 (no limit) if one has none."""
        if masters is None:
            return float(client.info("memory").get("maxmemory", 0) or 0)
        nodes = [n for n in masters if n.name in self._holders] or masters
        infos = client.info("memory", target_nodes=nodes)
        if len(nodes) == 1 and "maxmemory" in infos:  # one node: redis-py answers its dict
            infos = {nodes[0].name: infos}
        limits = [float(i.get("maxmemory", 0) or 0) for i in infos.values()]
        return 0.0 if not limits or 0.0 in limits else sum(limits)


def _masters(client: Any) -> list[Any] | None:
    """A Redis Cluster client's masters in a stable order; None for a single Redis."""
    get = getattr(client, "get_primaries", None)
    if get is None:
        return None
    return sorted(get(), key=lambda n: n.name)
