"""Model integrity against the real Redis and real Weir processes.

* Tampering: for every kind of blob (version, parked state, snapshot, checkpoint) the blob,
  its id, its hash and the key are changed in Redis, alone and together; every load is
  refused with IntegrityError, and nothing is unpickled: the planted blob's unpickling
  would create a directory, which never appears (until the test unpickles it itself, to
  show the payload is live).
* The default key: processes without WEIR_MODEL_KEY sharing a WEIR_DATA_DIR agree on the
  key file it creates (mode 0600); a scorer with another data dir (another key) exits
  with an error naming the key file and WEIR_MODEL_KEY; given the same key through
  WEIR_MODEL_KEY_FILE it serves.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from models.factory import build_model
from models.registry import ModelRegistry, registry_key
from tests.integration.conftest import wait_for
from tests.integration.processes import REPO, Monitor, Worker, assigned_members
from weir.errors import IntegrityError
from weir.settings import load_settings
from weir.spec import PipelineSpec

from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration


class _Plant:
    """A blob whose unpickling creates a directory: the side effect a refusal must prevent."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return (os.makedirs, (self.path,))


# kind: (blob key, meta key, load(registry, id), the meta field naming the id)
KINDS: dict[str, tuple[str, str, Callable[[ModelRegistry, str], Any], str]] = {
    "version": ("blob:{}", "meta:{}", lambda r, i: r.load(i), "id"),
    "parked": ("parkblob:{}", "parkmeta:{}", lambda r, i: r.load_live(i), "version_id"),
    "snapshot": ("snapblob:{}", "snapmeta:{}", lambda r, i: r.load_snapshot(i), "snapshot_id"),
    "checkpoint": ("checkpoint:{}", "checkpointmeta:{}", lambda r, i: r.load_checkpoint(i), "name"),
}


def _store(kind: str, reg: ModelRegistry, plant: _Plant, good: Any) -> tuple[str, str]:
    """A planted blob and a good one of ``kind``, both signed; their ids."""
    if kind == "version":
        return reg.save(plant, parent=None, trigger="t", reason="r").id, reg.save(
            good, parent=None, trigger="t", reason="r"
        ).id
    if kind == "parked":
        a = reg.save(good, parent=None, trigger="t", reason="r").id
        b = reg.save(good, parent=None, trigger="t", reason="r").id
        reg.park(plant, a, labels_learned=1, by="test")
        reg.park(good, b, labels_learned=1, by="test")
        return a, b
    if kind == "snapshot":
        v = reg.save(good, parent=None, trigger="t", reason="r").id
        a = reg.publish_snapshot(plant, version_id=v, labels_learned=1, offsets={0: 1})
        return a, reg.publish_snapshot(good, version_id=v, labels_learned=2, offsets={0: 2})
    reg.save_checkpoint("planted", plant)
    reg.save_checkpoint("monitor", good)
    return "planted", "monitor"


@pytest.mark.parametrize("kind", list(KINDS))
def test_tampering_is_refused_and_nothing_is_unpickled(
    kind: str, redis_client: Any, unique: str, tmp_path: Path
) -> None:
    spec = make_spec(unique)
    marker = tmp_path / "unpickled"
    reg = ModelRegistry(redis_client, spec, key=b"key-A")
    evil, good = _store(kind, reg, _Plant(marker), build_model(spec.model))
    blob_fmt, meta_fmt, load, id_field = KINDS[kind]
    keys = {
        name: reg.prefix + fmt.format(i)
        for name, fmt, i in [
            ("blob", blob_fmt, good),
            ("meta", meta_fmt, good),
            ("evil_blob", blob_fmt, evil),
            ("evil_meta", meta_fmt, evil),
        ]
    }
    pristine = {name: redis_client.get(k) for name, k in keys.items()}
    evil_blob, evil_meta = pristine["evil_blob"], orjson.loads(pristine["evil_meta"])
    good_meta = orjson.loads(pristine["meta"])
    load(reg, good)  # untouched: loads

    def meta(**changes: Any) -> bytes:
        return orjson.dumps({**good_meta, **changes})

    # name: (new blob, new meta, what the error says)
    cases: dict[str, tuple[bytes, bytes, str]] = {
        "blob swapped": (evil_blob, pristine["meta"], "sha256 mismatch"),
        "hash changed": (pristine["blob"], meta(blob_sha256="0" * 64), "sha256 mismatch"),
        "blob and hash": (
            evil_blob,
            meta(blob_sha256=hashlib.sha256(evil_blob).hexdigest()),
            "HMAC mismatch",
        ),
        # A valid signed pair moved under the good id (its id field rewritten, or not).
        "id: moved as is": (evil_blob, pristine["evil_meta"], "HMAC mismatch"),
        "id: moved, id rewritten": (
            evil_blob,
            orjson.dumps({**evil_meta, id_field: good_meta[id_field]}),
            "HMAC mismatch",
        ),
        "id: hash and hmac copied": (
            evil_blob,
            meta(blob_sha256=evil_meta["blob_sha256"], blob_hmac=evil_meta["blob_hmac"]),
            "HMAC mismatch",
        ),
        "signature removed": (
            evil_blob,
            meta(blob_sha256=hashlib.sha256(evil_blob).hexdigest(), blob_hmac=None),
            "is not signed",
        ),
        "older scheme": (
            evil_blob,
            orjson.dumps({k: v for k, v in evil_meta.items() if k != "hmac_scheme"}),
            "older Weir",
        ),
    }
    if kind == "snapshot":  # the version a snapshot claims is signed too
        cases["version id changed"] = (pristine["blob"], meta(version_id="v9"), "HMAC mismatch")
    if kind == "version":
        cases["model name changed"] = (pristine["blob"], meta(model="other"), "HMAC mismatch")
    for case, (blob, raw_meta) in ((c, v[:2]) for c, v in cases.items()):
        redis_client.set(keys["blob"], blob)
        redis_client.set(keys["meta"], raw_meta)
        with pytest.raises(IntegrityError, match=cases[case][2]) as info:
            load(reg, good)
        assert "NOT unpickled" in str(info.value), case
        assert not marker.exists(), f"{kind}, {case}: a refused blob was unpickled"
    redis_client.set(keys["blob"], pristine["blob"])
    redis_client.set(keys["meta"], pristine["meta"])

    # The key changed: both blobs, untouched, are refused under another key.
    other = ModelRegistry(redis_client, spec, key=b"key-B")
    for i in (good, evil):
        with pytest.raises(IntegrityError, match=r"signed with another model key.*WEIR_MODEL_KEY"):
            load(other, i)
    assert not marker.exists()

    load(reg, good)  # restored: loads again
    pickle.loads(evil_blob)  # the control: the planted payload is live
    assert marker.is_dir()


def test_a_blob_of_another_pipeline_is_refused(redis_client: Any, unique: str, tmp_path: Path) -> None:
    a, b = make_spec(unique + "a"), make_spec(unique + "b")
    marker = tmp_path / "unpickled"
    ra, rb = ModelRegistry(redis_client, a, key=b"k"), ModelRegistry(redis_client, b, key=b"k")
    ra.save(_Plant(marker), parent=None, trigger="t", reason="r")
    rb.save(build_model(b.model), parent=None, trigger="t", reason="r")
    for k in ("blob:v1", "meta:v1"):
        redis_client.set(rb.prefix + k, redis_client.get(ra.prefix + k))
    with pytest.raises(IntegrityError, match="HMAC mismatch"):
        rb.load("v1")
    assert not marker.exists()


def test_registry_signs_with_the_process_key_by_default(redis_client: Any, unique: str) -> None:
    spec = make_spec(unique)
    reg = ModelRegistry(redis_client, spec)  # the session's WEIR_MODEL_KEY (conftest.py)
    assert reg.key == os.environ["WEIR_MODEL_KEY"].encode()
    reg.save(build_model(spec.model), parent=None, trigger="t", reason="r")
    record = orjson.loads(redis_client.get(reg.prefix + "meta:v1"))
    assert record["blob_hmac"] and record["hmac_scheme"] == 2 and record["key_id"] == reg.key_id


def _file_key_registry(redis_client: Any, spec: PipelineSpec, key_file: Path) -> ModelRegistry:
    settings = load_settings(model_key=None, model_key_file=str(key_file))
    return ModelRegistry(redis_client, spec, key=registry_key(settings))


def test_default_key_file_shared_by_processes_and_another_key_refused(
    settings: Any, make_topics: Any, redis_client: Any, unique: str, tmp_path: Path
) -> None:
    spec = make_topics.for_spec(make_spec(unique), partitions=2)
    no_key: dict[str, str | None] = {"WEIR_MODEL_KEY": None}  # the default key file
    shared = tmp_path / "shared"
    # Started together on a fresh data dir: both race to create the key file.
    learner = Worker(spec, shared, role="learner", env=no_key)
    scorer = Worker(spec, shared, role="scorer", env=no_key)
    procs = [learner, scorer]
    try:
        key_file = shared / "data" / "model.key"
        wait_for(key_file.exists, 60, "the key file in the shared data dir")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        reg = _file_key_registry(redis_client, spec, key_file)
        champion = wait_for(lambda: reg.alias("champion"), 90, "the learner to bootstrap the champion")
        reg.load(champion)  # signed with the key file's key
        wait_for(lambda: assigned_members(settings, spec.consumer_group) == 1, 120, "the scorer to serve")
        assert scorer.alive(), scorer.tail()

        # A scorer with a data dir of its own has a key of its own: it must not serve.
        stranger = Worker(spec, tmp_path / "elsewhere", role="scorer", env=no_key)
        procs.append(stranger)
        wait_for(lambda: not stranger.alive(), 120, "the scorer with another key to exit")
        assert stranger.stop() != 0
        log = stranger.tail(80)
        own = tmp_path / "elsewhere" / "data" / "model.key"
        assert "IntegrityError" in log or "weir: error:" in log, log
        assert "signed with another model key" in log and str(own) in log, log
        assert "WEIR_MODEL_KEY" in log and "same model key" in log, log
        assert own.read_bytes() != key_file.read_bytes()

        # The fix the error names: share the key.
        friend = Worker(
            spec,
            tmp_path / "friend",
            role="scorer",
            env={"WEIR_MODEL_KEY": None, "WEIR_MODEL_KEY_FILE": str(key_file)},
        )
        procs.append(friend)
        wait_for(lambda: assigned_members(settings, spec.consumer_group) == 2, 120, "a second scorer")
        assert friend.alive(), friend.tail()
        assert not (tmp_path / "friend" / "data" / "model.key").exists()
    finally:
        for p in procs:
            p.stop()


def test_monitor_with_another_key_stops_rather_than_drop_its_checkpoint(
    make_topics: Any, redis_client: Any, unique: str, tmp_path: Path
) -> None:
    import yaml

    from streams.recovery import CHECKPOINT

    spec = make_topics.for_spec(make_spec(unique))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(by_alias=True, mode="json")))
    reg = ModelRegistry(redis_client, spec)  # the session's key
    reg.save_checkpoint(CHECKPOINT, {"spec_hash": "x"})
    before = redis_client.get(reg.prefix + f"checkpointmeta:{CHECKPOINT}")
    monitor = Monitor(path, tmp_path, env={"WEIR_MODEL_KEY": "a-key-of-its-own"})
    try:
        wait_for(lambda: not monitor.alive(), 120, "the monitor with another key to exit")
    finally:
        code = monitor.stop()
    log = monitor.tail(60)
    assert code != 0, log
    assert f"checkpoint {CHECKPOINT}: signed with another model key" in log, log
    assert "from WEIR_MODEL_KEY" in log and "a-key-of-its-own" not in log, log
    assert redis_client.get(reg.prefix + f"checkpointmeta:{CHECKPOINT}") == before  # not replaced


def test_no_key_to_be_had_refuses_to_run(tmp_path: Path, unique: str) -> None:
    import yaml

    spec = make_spec(unique)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(by_alias=True, mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "WEIR_MODEL_KEY"}
    env["WEIR_MODEL_KEY_FILE"] = str(tmp_path / "missing.key")
    res = subprocess.run(
        [sys.executable, "-m", "weir.cli", "models", str(path), "list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res
    assert "WEIR_MODEL_KEY_FILE=" in res.stderr and "no such file" in res.stderr, res.stderr
