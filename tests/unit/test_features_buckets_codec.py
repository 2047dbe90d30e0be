"""The online engine's call layout with ``redis.buckets`` > 1, without Redis."""

from __future__ import annotations

from features.lua import CROSS_SLOT, build_script
from features.online import RedisFeatureStore
from tests.unit.test_features_online_codec import _lp, _spec
from weir.slots import bucket_of, bucket_prefix
from weir.types import Event


def _bucketed(buckets: int) -> RedisFeatureStore:
    spec = _spec()
    return RedisFeatureStore(
        spec.model_copy(update={"redis": spec.redis.model_copy(update={"buckets": buckets})})
    )


def test_one_bucket_is_the_stage_one_script_and_keys() -> None:
    one = _bucketed(1)
    assert one.script == build_script(_spec()) == build_script(_spec(), buckets=1)
    assert not one.script.startswith("#!")
    assert one.window_key("u") == "weir:{codec}:win:u" and one.applied_key == "weir:{codec}:applied"


def test_buckets_group_a_batch_in_one_call_per_node_naming_each_bucket() -> None:
    store = _bucketed(8)
    assert store.script.startswith(CROSS_SLOT + "\n")
    ents = ["u1", "u2", "u3", "u1", "u9"]
    events = [Event(f"e{i}", ent, 10.0 + i, {"x": 1.0, "c": None, "b": None}) for i, ent in enumerate(ents)]
    # A single Redis (no slot map): one group, one call, whatever the buckets; its events
    # bucket by bucket (first seen first), each bucket's in the batch's order.
    ((node, idx, args),) = store._bucket_calls(object(), events, None)
    keys = list(dict.fromkeys(f"{bucket_prefix('codec', 'e', bucket_of(e, 8), 8)}:applied" for e in ents))
    assert len(keys) >= 2
    k = [keys.index(f"{store.prefix_of(e)}:applied") + 1 for e in ents]
    assert node is None and idx == sorted(range(5), key=lambda i: (k[i], i))
    # One declared key (routes the call), the batch, then every bucket's applied key.
    assert args[:4] == ("EVALSHA", store.sha, 1, keys[0]) and list(args[5:]) == keys
    rest = [f"{10.0 + i!r}|1.0||" for i in range(5)]
    assert args[4] == "".join(_lp(str(k[i]), ents[i], f"e{i}", rest[i], "") for i in idx)
    assert store.window_key("u1") == f"{store.prefix_of('u1')}:win:u1"
    assert store.prefix_of("u1").startswith("weir:{codec#e")
