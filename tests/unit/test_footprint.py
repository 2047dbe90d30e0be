"""The footprint's count of a SCAN step against the rule it implements, key by key.

The rule (docs: weir/footprint.py): a key's kind is :func:`kind_of`; a key is measured when
it is one of the first ``sample_every`` keys of its kind in the pass, or the n-th key seen
with n % ``sample_every`` == 0. :meth:`RedisFootprint._count` does it in bulk (bytes split,
``Counter``, a slice); the Redis side is tests/integration/test_footprint.py.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from weir.footprint import RedisFootprint, kind_of


def _rule(steps: list[list[bytes]], prefix: str, every: int) -> tuple[Counter[str], list[list[bytes]]]:
    """The per-key loop the footprint ran before its counting was done in bulk."""
    counts: Counter[str] = Counter()
    seen = 0
    picked = []
    for keys in steps:
        mine = []
        for key in keys:
            kind = kind_of(key, prefix)
            counts[kind] += 1
            seen += 1
            if counts[kind] <= every or seen % every == 0:
                mine.append(key)
        picked.append(mine)
    return counts, picked


def _keys(rng: random.Random, name: str, n: int, buckets: bool, kinds: list[str]) -> list[bytes]:
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.5:
            tag = f"{name}#j{rng.randrange(16)}" if buckets else name
            out.append(f"weir:{{{tag}}}:served:ev-{i}".encode())
        elif r < 0.8:
            tag = f"{name}#e{rng.randrange(16)}" if buckets else name
            out.append(f"weir:{{{tag}}}:win:user:{i}".encode())
        elif r < 0.95:
            out.append(f"weir:{{{name}}}:meta:user:{i}".encode())
        else:
            out.append(f"weir:{{{name}}}:{rng.choice(kinds)}".encode())
    return out


SMALL = ["recent:1", "applied", "join:pending", "join:early", "status", "models:v1"]
ODD = [":odd", "win", "served:x\0y", "", "applied:", "win\0x:1"]  # empty kinds, NUL bytes, bare keys


@pytest.mark.parametrize("every", [1, 3, 50])
@pytest.mark.parametrize("buckets", [False, True])
def test_bulk_count_is_the_per_key_rule(every: int, buckets: bool) -> None:
    """Steps of one bucket's keys and of several buckets, kinds new in the middle of a
    pass, odd keys."""
    rng = random.Random(every)
    steps = [_keys(rng, "demo", n, buckets, SMALL[:3]) for n in (0, 7, 400, 1, 1000, 53)]
    steps += [_keys(rng, "demo", n, buckets, SMALL) for n in (300, 2, 700)]  # new kinds
    steps += [_keys(rng, "demo", 200, buckets, SMALL + ODD), _keys(rng, "demo", 600, buckets, SMALL)]
    fp = RedisFootprint("weir:{demo}", "demo", sample_every=every)
    counts, picked = _rule(steps, "weir:{demo}", every)
    for keys, want in zip(steps, picked, strict=True):
        got = fp._count(keys)
        assert [k for _, k in got] == want
        assert all(kind == kind_of(k, "weir:{demo}").encode() for kind, k in got)
    assert {k.decode(): n for k, n in fp._keys.items()} == counts
    assert fp._seen == sum(map(len, steps))


def test_keys_without_a_kind_and_str_keys_fall_back_to_kind_of() -> None:
    fp = RedisFootprint("x:y", "p", sample_every=2)
    keys = [b"x:y:served:1", b"x:y::odd", b"x:y", b"x:y:win:a:b"]
    assert fp._kinds(keys) == [kind_of(k, "x:y").encode() for k in keys]
    assert fp._kinds(["x:y:served:1", "x:y:win:2"]) == [b"served", b"win"]  # decode_responses
    assert fp._kinds([b"x:y:served:1", b"x:y::odd"]) == [b"served", b"other"]
