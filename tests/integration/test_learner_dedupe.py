"""Label dedupe without a key per event, on the real Redis: no ``learned:`` markers; the
labels offsets, the marked served record and the negated pending entry tell a duplicate."""

from __future__ import annotations

import time
from typing import Any

from models.join import Keys
from models.learner import LearnerCore
from models.registry import ModelRegistry

from .test_learner_join import _core, label_msg, serve
from .test_learner_registry import make_spec


def test_a_second_label_after_the_record_went_and_came_back_is_a_duplicate(
    redis_client: Any, unique: Any
) -> None:
    """The event is learned, its record deleted after the snapshot, then the event is
    redelivered and its record written again (SET NX finds nothing): a second label for
    it, under another offset, is still a duplicate (its pending entry says learned)."""
    spec = make_spec(unique, learner={"snapshot_every_labels": 1000, "snapshot_every_seconds": 3600})
    registry = ModelRegistry(redis_client, spec, key=b"k")
    core = LearnerCore.start(spec, registry, redis_client)
    keys = Keys(spec)
    now = time.time()
    serve(redis_client, spec, core, "e0", 1.0, now)
    assert [r.outcome for r in core.process([label_msg("e0", 1, now, offset=0)]).results] == ["hit"]
    assert redis_client.get(keys.served("e0"))[:1] == b"\x02"  # marked with run:seq
    assert redis_client.zscore(keys.pending, "e0") < 0  # learned, kept until its deadline
    core.maybe_snapshot(force=True)
    core.joiner.flush()  # the deletion goes with the next call
    assert not redis_client.exists(keys.served("e0"))
    serve(redis_client, spec, core, "e0", 1.0, now)  # a redelivered event writes it again
    assert redis_client.zscore(keys.pending, "e0") < 0  # ZADD NX: still learned
    out = core.process([label_msg("e0", 0, now, offset=1)])
    assert [r.outcome for r in out.results] == ["duplicate"] and core.labels_learned == 1
    # no key per learned event
    assert not list(redis_client.scan_iter(match=f"{spec.redis_prefix}:learned:*"))


def test_learned_pending_entries_go_at_their_deadline_without_counting_expiries(
    redis_client: Any, unique: Any
) -> None:
    spec = make_spec(unique, labels={"horizon": 0.5})
    core = _core(spec, redis_client)
    keys = Keys(spec)
    now = time.time()
    for i in range(3):
        serve(redis_client, spec, core, f"e{i}", 1.0, now)
    core.process([label_msg(f"e{i}", 1, now, offset=i) for i in range(2)])
    assert redis_client.zcard(keys.pending) == 3
    time.sleep(0.6)
    assert core.sweep().expiries == 1  # e2 only: e0 and e1 were learned
    assert redis_client.zcard(keys.pending) == 0
