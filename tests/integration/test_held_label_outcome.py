"""A held (early) label gets exactly one final outcome, on the real Redis.

A learner without a registry never publishes a snapshot, so the hold of a label the sweep
resolved stays (models/join.py keeps it until a published snapshot has the label) until its
hold, the served record and the negated pending entry are all gone with the horizon. The
sweep that finds it then must not count it ``unknown`` as well (found by helper s2join).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from models.join import Keys, ServedStore
from weir.metrics import LearnerMetrics
from weir.types import Prediction

from .test_learner_join import _core, _joins, label_msg
from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration

HORIZON = 2.0


@pytest.mark.parametrize("buckets", [1, 4])
def test_a_resolved_held_label_is_not_counted_unknown_when_its_horizon_passes(
    redis_client: Any, unique: Any, buckets: int
) -> None:
    metrics = LearnerMetrics(CollectorRegistry())
    spec = make_spec(unique, labels={"horizon": HORIZON}, redis={"buckets": buckets})
    core = _core(spec, redis_client, metrics)  # no registry: no snapshot is ever published
    keys = Keys(spec)
    t0 = time.time()
    assert [r.outcome for r in core.process([label_msg("e1", 1, t0, 0)]).results] == ["early"]
    served = Prediction("e1", "ent-e1", t0, "lr", "v1.0", True, {"True": 0.6, "False": 0.4}, {"a": 2.0}, t0)
    ServedStore(spec).write(redis_client, [served])  # one call per node with buckets
    assert [r.outcome for r in core.sweep().results] == ["resolved"]
    assert core.labels_learned == 1
    assert redis_client.exists(keys.early("e1"))  # kept: no snapshot has the label
    # The hold, the served record and the learned (negated) pending entry all go with the horizon.
    time.sleep(max(0.0, served.scored_at + HORIZON + 0.5 - time.time()))
    assert not redis_client.exists(keys.early("e1"), keys.served("e1"))
    assert core.sweep().results == []
    assert _joins(metrics, spec, "resolved") == 1
    assert _joins(metrics, spec, "unknown") == 0
    assert core.joins == {"early": 1, "resolved": 1}
    assert not redis_client.zcard(keys.early_index_of(keys.bucket("e1")))  # the hold left the index
