"""ModelRegistry against the real Redis: versions, aliases, snapshots and integrity."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from models.factory import build_model, learn, predict
from models.registry import ModelRegistry
from weir.errors import IntegrityError, ModelError
from weir.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def unique_name(unique: Any) -> str:
    """A pipeline name unique to the test (the ``unique`` fixture may be a str or a factory)."""
    raw = unique() if callable(unique) else str(unique)
    return "t" + "".join(c for c in raw.lower() if c.isalnum() or c in "-_")[:40]


def make_spec(unique: Any, **over: Any) -> PipelineSpec:
    data: dict[str, Any] = {
        "name": unique_name(unique),
        "task": "binary",
        "fields": {"a": "numeric"},
        "features": [{"agg": "raw", "field": "a"}],
        "model": {
            "name": "lr",
            "steps": ["river.preprocessing.StandardScaler", "river.linear_model.LogisticRegression"],
        },
    }
    data.update(over)
    return parse_spec(data)


@pytest.fixture
def spec(unique: Any) -> PipelineSpec:
    return make_spec(unique)


@pytest.fixture
def registry(redis_client: Any, spec: PipelineSpec) -> ModelRegistry:
    return ModelRegistry(redis_client, spec, key=b"k1")


def _trained(spec: PipelineSpec) -> Any:
    model = build_model(spec.model)
    for i in range(20):
        learn(model, {"a": float(i)}, i > 10, "binary")
    return model


def test_save_load_roundtrip(registry: ModelRegistry, spec: PipelineSpec) -> None:
    model = _trained(spec)
    v1 = registry.save(model, parent=None, trigger="bootstrap", reason="first", meta={"rows": 20})
    v2 = registry.save(model, parent="v1", trigger="drift", reason="psi", meta={})
    assert (v1.id, v2.id) == ("v1", "v2")
    loaded, meta = registry.load("v1")
    assert meta == v1 and meta.meta == {"rows": 20} and meta.spec_hash == spec.spec_hash()
    assert predict(loaded, {"a": 3.0}, "binary") == predict(model, {"a": 3.0}, "binary")
    assert [v.id for v in registry.list()] == ["v1", "v2"]
    assert registry.get("v2").parent == "v1"
    updated = registry.update_meta("v2", shadow_accuracy=0.9)
    assert updated.meta == {"shadow_accuracy": 0.9}
    assert registry.get("v2").meta["shadow_accuracy"] == 0.9


def test_unknown_version_lists_known(registry: ModelRegistry, spec: PipelineSpec) -> None:
    registry.save(_trained(spec), parent=None, trigger="t", reason="r", meta={})
    with pytest.raises(ModelError, match=r"'v9' is unknown; known versions: v1"):
        registry.load("v9")
    with pytest.raises(ModelError, match="unknown"):
        registry.update_meta("v9", x=1)
    with pytest.raises(ModelError, match="unknown"):
        registry.set_alias("champion", "v9")


class _Boom:
    """Unpickling this runs code: proves the corrupt blob is never unpickled."""

    def __reduce__(self) -> Any:
        return (pytest.fail, ("a refused blob was unpickled",))


def test_corrupt_blob_refused(registry: ModelRegistry, redis_client: Any, spec: PipelineSpec) -> None:
    registry.save(_trained(spec), parent=None, trigger="t", reason="r", meta={})
    redis_client.set(registry.prefix + "blob:v1", pickle.dumps(_Boom()))
    with pytest.raises(IntegrityError, match=r"model version v1: blob sha256 mismatch.*NOT unpickled"):
        registry.load("v1")


def test_hmac_mismatch_refused(redis_client: Any, spec: PipelineSpec) -> None:
    ModelRegistry(redis_client, spec, key=b"k1").save(
        _trained(spec), parent=None, trigger="t", reason="r", meta={}
    )
    other = ModelRegistry(redis_client, spec, key=b"another-key")
    with pytest.raises(IntegrityError, match=r"v1: signed with another model key.*same model key"):
        other.load("v1")


def test_tampered_blob_with_matching_sha_refused_by_hmac(
    registry: ModelRegistry, redis_client: Any, spec: PipelineSpec
) -> None:
    import hashlib

    import orjson

    registry.save(_trained(spec), parent=None, trigger="t", reason="r", meta={})
    evil = pickle.dumps(_Boom())
    record = orjson.loads(redis_client.get(registry.prefix + "meta:v1"))
    record["blob_sha256"] = hashlib.sha256(evil).hexdigest()  # an attacker fixes the sha
    redis_client.set(registry.prefix + "meta:v1", orjson.dumps(record))
    redis_client.set(registry.prefix + "blob:v1", evil)
    with pytest.raises(IntegrityError, match="HMAC mismatch"):
        registry.load("v1")


def test_unsigned_blob_refused_when_key_set(redis_client: Any, spec: PipelineSpec) -> None:
    insecure = ModelRegistry(redis_client, spec, key=None)  # what WEIR_MODEL_INSECURE=1 gives
    insecure.save(_trained(spec), parent=None, trigger="t", reason="r")
    with pytest.raises(IntegrityError, match=r"is not signed .*WEIR_MODEL_INSECURE=1.*NOT unpickled"):
        ModelRegistry(redis_client, spec, key=b"k1").load("v1")
    # Without a key the sha256 alone is checked.
    insecure.load("v1")


def test_aliases_and_rollback(registry: ModelRegistry, spec: PipelineSpec) -> None:
    m = _trained(spec)
    for _ in range(3):
        registry.save(m, parent=None, trigger="t", reason="r", meta={})
    assert registry.alias("champion") is None
    registry.set_alias("champion", "v1")
    registry.set_alias("champion", "v2")
    registry.set_alias("challenger", "v3")
    assert registry.alias("champion") == "v2" and registry.alias("challenger") == "v3"
    assert registry.rollback() == "v1"
    assert registry.alias("champion") == "v1"
    registry.set_alias("challenger", None)
    assert registry.alias("challenger") is None
    with pytest.raises(ModelError, match="alias must be one of"):
        registry.alias("best")


def test_snapshots_publish_load_prune(redis_client: Any, registry: ModelRegistry, spec: PipelineSpec) -> None:
    m = _trained(spec)
    registry.save(m, parent=None, trigger="t", reason="r", meta={})
    assert registry.latest_snapshot() is None
    ids = [
        registry.publish_snapshot(m, version_id="v1", labels_learned=10 * i, offsets={0: i, 3: 7})
        for i in range(1, 9)
    ]
    assert ids[0] == "v1.1" and ids[-1] == "v1.8"
    assert registry.latest_snapshot() == "v1.8"
    model, meta = registry.load_snapshot("v1.8")
    assert meta["version_id"] == "v1" and meta["labels_learned"] == 80
    assert meta["offsets"] == {0: 8, 3: 7} and meta["created"] > 0
    assert predict(model, {"a": 1.0}, "binary") == predict(m, {"a": 1.0}, "binary")
    with pytest.raises(ModelError, match="unknown or pruned"):
        registry.load_snapshot("v1.1")
    assert not redis_client.exists(registry.prefix + "snapblob:v1.1")
    redis_client.set(registry.prefix + "snapblob:v1.8", pickle.dumps(_Boom()))
    with pytest.raises(IntegrityError, match=r"snapshot v1.8: blob sha256 mismatch"):
        registry.load_snapshot("v1.8")


def _blob_ids(redis_client: Any, registry: ModelRegistry, kind: str = "blob") -> set[str]:
    pattern = registry.prefix + f"{kind}:*"
    return {k.decode().rsplit(":", 1)[1] for k in redis_client.scan_iter(match=pattern, count=1000)}


def test_versions_beyond_retention_are_pruned(redis_client: Any, spec: PipelineSpec) -> None:
    registry = ModelRegistry(redis_client, spec, key=b"k1", keep_versions=2)
    m = _trained(spec)
    registry.save(m, parent=None, trigger="initial", reason="r")
    registry.set_alias("champion", "v1")
    registry.save(m, parent="v1", trigger="t", reason="r")
    registry.save(m, parent="v1", trigger="t", reason="r")
    registry.set_alias("champion", "v3")  # v1 becomes the predecessor
    registry.park(m, "v1", labels_learned=5, by="learner")
    registry.park(m, "v2", labels_learned=5, by="learner")
    registry.publish_snapshot(m, version_id="v2", labels_learned=1, offsets={0: 1})
    registry.save(m, parent="v3", trigger="t", reason="r")
    registry.save(m, parent="v3", trigger="t", reason="r")
    registry.set_alias("challenger", "v5")
    for _ in range(3):
        registry.save(m, parent="v3", trigger="t", reason="r")
    # champion v3, its predecessor v1, challenger v5, the newest two v7 and v8.
    assert registry.kept() == ["v1", "v3", "v5", "v7", "v8"]
    assert _blob_ids(redis_client, registry) == {"v1", "v3", "v5", "v7", "v8"}
    assert _blob_ids(redis_client, registry, "parkblob") == {"v1"}
    assert not redis_client.exists(registry.prefix + "snapseq:v2")
    assert registry.load_live("v1")[1] is not None  # the predecessor's parked state is kept
    with pytest.raises(ModelError, match=r"'v2' was pruned at .*keep_versions=2.*promote a kept version"):
        registry.load("v2")
    with pytest.raises(ModelError, match="was pruned"):
        registry.set_alias("champion", "v4")
    # Pruned versions keep their metadata: the audit trail.
    assert registry.get("v2").meta["pruned_at"] > 0 and registry.get("v2").parent == "v1"
    assert [v.id for v in registry.list()] == [f"v{i}" for i in range(1, 9)]
    # A promotion makes the challenger the champion: the old champion stays as predecessor.
    registry.set_alias("champion", "v5")
    registry.set_alias("challenger", None)
    registry.save(m, parent="v5", trigger="t", reason="r")
    assert _blob_ids(redis_client, registry) == {"v3", "v5", "v8", "v9"}
    assert registry.rollback() == "v3"
    assert registry.load("v3")[1].id == "v3"


def test_blob_keys_stay_bounded_over_many_retrains(redis_client: Any, spec: PipelineSpec) -> None:
    registry = ModelRegistry(redis_client, spec, keep_versions=3, keep_snapshots=4)
    m = _trained(spec)
    registry.save(m, parent=None, trigger="initial", reason="r")
    registry.set_alias("champion", "v1")
    for i in range(2, 31):
        registry.save(m, parent=registry.alias("champion"), trigger="t", reason="r")
        registry.set_alias("champion", f"v{i}")
        registry.park(m, f"v{i - 1}", labels_learned=i, by="learner")
        for _ in range(3):
            registry.publish_snapshot(m, version_id=f"v{i}", labels_learned=i, offsets={0: i})
    assert len(_blob_ids(redis_client, registry)) <= 3 + 3
    assert len(_blob_ids(redis_client, registry, "parkblob")) <= 3 + 3
    assert _blob_ids(redis_client, registry, "snapblob") == {"v30.3", "v30.2", "v30.1", "v29.3"}
    assert _blob_ids(redis_client, registry, "snapmeta") == _blob_ids(redis_client, registry, "snapblob")
    assert len(list(redis_client.scan_iter(match=registry.prefix + "snapseq:*", count=1000))) <= 6


def test_checkpoint_roundtrip_and_integrity(
    redis_client: Any, registry: ModelRegistry, spec: PipelineSpec
) -> None:
    assert registry.load_checkpoint("monitor") is None
    size = registry.save_checkpoint("monitor", {"buffer": [1, 2, 3]}, {"offsets": {"t": {"0": 3}}})
    state, meta = registry.load_checkpoint("monitor") or (None, {})
    assert state == {"buffer": [1, 2, 3]} and meta["bytes"] == size and meta["offsets"] == {"t": {"0": 3}}
    redis_client.set(registry.prefix + "checkpoint:monitor", pickle.dumps(_Boom()))
    with pytest.raises(IntegrityError, match=r"checkpoint monitor: blob sha256 mismatch"):
        registry.load_checkpoint("monitor")


def test_save_with_a_token_is_stored_once_however_often_it_is_retried(
    redis_client: Any, registry: ModelRegistry, spec: PipelineSpec
) -> None:
    m = _trained(spec)
    first = registry.save(m, parent=None, trigger="drift", reason="r", token="retrain-7")
    again = registry.save(m, parent=None, trigger="drift", reason="r (retried)", token="retrain-7")
    assert again.id == first.id and again.reason == "r"
    assert registry.ids() == [first.id]
    # A crash after the id was reserved but before the write: the retry completes it.
    registry._reserve_script(keys=[registry._saved_key("retrain-8"), registry.prefix + "seq"])
    assert registry.ids() == [first.id]
    late = registry.save(m, parent=first.id, trigger="drift", reason="r", token="retrain-8")
    assert registry.ids() == [first.id, late.id]
    assert registry.load(late.id)[1].meta["save_token"] == "retrain-8"
    # Another token, or none, is another version.
    other = registry.save(m, parent=None, trigger="drift", reason="r", token="retrain-9")
    plain = registry.save(m, parent=None, trigger="drift", reason="r")
    assert len({first.id, late.id, other.id, plain.id}) == 4


def test_rollback_to_a_pruned_version_changes_nothing(redis_client: Any, spec: PipelineSpec) -> None:
    registry = ModelRegistry(redis_client, spec, key=b"k1", keep_versions=1)
    m = _trained(spec)
    for parent in (None, "v1", "v2"):
        v = registry.save(m, parent=parent, trigger="t", reason="r")
        registry.set_alias("champion", v.id)
    # Champion v3, history v2, v1: v1 is neither kept nor protected any more.
    registry.save(m, parent="v3", trigger="t", reason="r")
    assert registry.get("v1").meta.get("pruned_at") is not None
    assert registry.rollback() == "v2"  # the predecessor is protected
    history = registry.alias_history("champion")
    assert history[0] == "v1"
    with pytest.raises(ModelError, match="was pruned"):
        registry.rollback()
    # The failed rollback left the alias and its history as they were.
    assert registry.alias("champion") == "v2"
    assert registry.alias_history("champion") == history
