"""Model versions, aliases and scorer snapshots, stored in Redis.

Keys, all under ``{spec.redis_prefix}:registry:`` (``weir:{<pipeline>}:registry:``, one hash
slot of a Redis Cluster, so its scripts and ``WATCH``/``MULTI`` transactions run there as on a
single Redis; the transactions are asked for explicitly, ``pipeline(transaction=True)``, since
redis-py's cluster pipeline is not transactional by default):

* ``seq`` - counter behind version ids ``v1``, ``v2``...
* ``saved:{token}`` - the version id a save with an idempotency token reserved (what
  makes a retried :meth:`ModelRegistry.save` return the version it already stored)
* ``versions`` - list of version ids, oldest first
* ``meta:{id}`` / ``blob:{id}`` - a version's metadata (JSON) and pickled model;
  ``parkmeta:{id}`` / ``parkblob:{id}`` - its parked live state (:meth:`ModelRegistry.park`)
* ``alias:{champion|challenger}`` - the version an alias points at;
  ``alias_history:{name}`` - its earlier targets, newest first (for rollback)
* ``snapseq:{version}`` - counter behind snapshot ids ``v1.1``, ``v1.2``...
* ``snapshot:latest`` - the newest snapshot id (the scorers' one cheap GET)
* ``snapshots`` - list of snapshot ids, newest first; only the last ``keep_snapshots`` are kept
* ``snapmeta:{sid}`` / ``snapblob:{sid}`` - a snapshot's metadata and pickled model
* ``checkpoint:{name}`` / ``checkpointmeta:{name}`` - a process's pickled state (the
  monitor's, see ``streams/recovery.py``), signed like the models

Retention (bounded memory): saving a version prunes the blobs, parked states and
snapshot counters of every version that is not the champion, its predecessor, the
challenger or among the newest ``retrain.keep_versions``; a pruned version keeps its
metadata (``meta.pruned_at``) as the audit trail and can no longer be loaded or
aliased. Publishing a snapshot deletes those beyond ``learner.keep_snapshots``, in the
same atomic script.

Integrity (pickle runs code, so an unchecked blob is never loaded): every blob is
stored with its sha256 and an HMAC-SHA256 under the registry's key, computed over what
the blob is (version, parked state, snapshot or checkpoint), the pipeline, its ids (the
version id, the snapshot id and its version, the checkpoint name; a version's model
name) and the blob. Loading checks both *before* unpickling and refuses a mismatch with
:class:`~weir.errors.IntegrityError`, so a valid blob cannot be swapped in under another
id either. The key (:func:`registry_key`) is ``WEIR_MODEL_KEY``, else the file
``WEIR_MODEL_KEY_FILE``, else ``WEIR_DATA_DIR/model.key``, created on first use (mode
0600). Every process of a pipeline needs the same key; a blob signed with another key is
refused with an error that says so and names this process's key source. Only
``WEIR_MODEL_INSECURE=1`` runs without a key (sha256 only, logged loudly).
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import hashlib
import hmac
import logging
import os
import pickle
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from weir.errors import ConfigError, IntegrityError, ModelError, ModelKeyError
from weir.types import ModelVersion

if TYPE_CHECKING:
    import redis

    from weir.settings import Settings
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.registry")

Alias = Literal["champion", "challenger"]
ALIASES: tuple[str, ...] = ("champion", "challenger")


# KEYS: snapshots list, snapshot:latest, snapblob:{sid}, snapmeta:{sid}
# ARGV: sid, keep, key prefix, blob, meta
_PUBLISH_SNAPSHOT = """
redis.call('SET', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5])
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[1])
local keep = tonumber(ARGV[2])
local old = redis.call('LRANGE', KEYS[1], keep, -1)
redis.call('LTRIM', KEYS[1], 0, keep - 1)
for _, s in ipairs(old) do
  redis.call('DEL', ARGV[3] .. 'snapblob:' .. s, ARGV[3] .. 'snapmeta:' .. s)
end
return #old
"""

# KEYS: saved:{token}, seq. The version id this save is (or is being) stored under:
# reserved once, so a save() retried after a reply was lost stores no second version.
_RESERVE_VERSION = """
local vid = redis.call('GET', KEYS[1])
if vid then return vid end
vid = 'v' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], vid)
return vid
"""


def _river_version() -> str:
    import river

    return str(river.__version__)


#: The HMAC's format: stored as ``hmac_scheme`` with every signed blob. Scheme 2 covers
#: the blob's kind, pipeline and ids; a blob without it (signed by an older Weir, over the
#: blob alone) is refused.
HMAC_SCHEME = 2
KEY_FILE_NAME = "model.key"


class ModelKey(bytes):
    """An HMAC key that knows where it came from (for error messages; never the value)."""

    source: str

    def __new__(cls, value: bytes, source: str) -> ModelKey:
        obj = super().__new__(cls, value)
        obj.source = source
        return obj

    def __repr__(self) -> str:  # never the key itself
        return f"ModelKey(source={self.source!r})"

    __str__ = __repr__


class _FromSettings(enum.Enum):
    TOKEN = 0


#: ``ModelRegistry(key=FROM_SETTINGS)`` (the default): the key :func:`registry_key` gives.
FROM_SETTINGS = _FromSettings.TOKEN


def key_id(key: bytes) -> str:
    """A short fingerprint of a key, stored with each blob so a key mismatch can be told
    from tampering. It is an HMAC under the key itself: it tells nothing a signed blob
    does not already."""
    return hmac.new(key, b"weir model key id", hashlib.sha256).hexdigest()[:12]


def _read_key_file(path: Path, what: str, timeout: float = 5.0) -> bytes:
    """The key in ``path``; waits a little for a file another process is creating."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"{what} {path} cannot be read ({exc.strerror or exc}); fix its permissions "
                "(the Weir user must read it, mode 0600), or set WEIR_MODEL_KEY"
            ) from None
        if raw or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not raw:
        raise ConfigError(
            f"{what} {path} is empty; write a key into it (`openssl rand -hex 32 > {path}; "
            f"chmod 600 {path}`), or delete it to have Weir create one"
        )
    from weir import redact

    redact.register_secret(raw.decode(errors="replace"))  # masked in logs like WEIR_MODEL_KEY
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s %s is readable by other users (mode %o): chmod 600 %s", what, path, mode, path)
    return raw


def _create_key_file(path: Path) -> bool:
    """Create ``path`` with a new random key, atomically; False if it already existed.

    The key is written to a private temporary file first and then hard-linked into place,
    which fails if ``path`` exists: two processes starting together never see a half-written
    key, and both end up with the one that won (each reads ``path`` back).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: O_EXCL create (readers wait for it)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def registry_key(settings: Settings) -> ModelKey | None:
    """The registry's HMAC key: ``WEIR_MODEL_KEY``, else ``WEIR_MODEL_KEY_FILE``, else
    ``WEIR_DATA_DIR/model.key`` (created on first use, mode 0600).

    None only with ``WEIR_MODEL_INSECURE=1`` and no key given (logged as an error).
    Raises :class:`~weir.errors.ConfigError` when no key can be had.
    """
    if settings.model_key is not None and settings.model_key_file is not None:
        raise ConfigError("both WEIR_MODEL_KEY and WEIR_MODEL_KEY_FILE are set; set only one of them")
    if settings.model_key is not None:
        value = settings.model_key.get_secret_value().strip().encode()
        if not value:
            raise ConfigError(
                "WEIR_MODEL_KEY is set but empty; give it a random secret (`openssl rand -hex 32`), "
                "the same in every process of the pipeline, or unset it to use the key file "
                "WEIR_DATA_DIR/model.key"
            )
        key = ModelKey(value, "WEIR_MODEL_KEY")
    elif settings.model_key_file is not None:
        path = Path(settings.model_key_file).expanduser()
        if not path.exists():
            raise ConfigError(
                f"WEIR_MODEL_KEY_FILE={settings.model_key_file!r}: no such file; create it with "
                f"`openssl rand -hex 32 > {path}; chmod 600 {path}` (the same key for every "
                "process of the pipeline), or unset WEIR_MODEL_KEY_FILE"
            )
        key = ModelKey(_read_key_file(path, "WEIR_MODEL_KEY_FILE"), f"WEIR_MODEL_KEY_FILE {path}")
    elif settings.model_insecure:
        log.error(
            "WEIR_MODEL_INSECURE=1: model blobs are NOT signed and are checked by sha256 only. "
            "Anyone who can write to Redis can make this process unpickle (run) anything. "
            "Unset WEIR_MODEL_INSECURE to sign them with a key"
        )
        return None
    else:
        path = (Path(settings.data_dir) / KEY_FILE_NAME).expanduser().absolute()
        try:
            created = _create_key_file(path) if not path.exists() else False
        except OSError as exc:
            raise ConfigError(
                f"cannot create the model key file {path} ({exc.strerror or exc}); make "
                "WEIR_DATA_DIR writable, or set WEIR_MODEL_KEY or WEIR_MODEL_KEY_FILE "
                "(WEIR_MODEL_INSECURE=1 runs without a key, unsafely)"
            ) from None
        if created:
            log.warning(
                "created a new model key in %s (mode 0600). Every process of this pipeline "
                "must use the same key: give them the same WEIR_DATA_DIR, or copy this file, "
                "or set WEIR_MODEL_KEY (or WEIR_MODEL_KEY_FILE) for all of them",
                path,
            )
        key = ModelKey(_read_key_file(path, "the model key file"), f"key file {path}")
    if settings.model_insecure:
        log.warning("WEIR_MODEL_INSECURE=1 is ignored: a model key is set (%s)", key.source)
    return key


class ModelRegistry:
    """Model versions and snapshots of one pipeline.

    Args:
        client: a synchronous Redis client.
        spec: the pipeline spec (its ``redis_prefix`` and ``spec_hash()`` are used).
        key: HMAC key: every blob is signed with it and checked against it. Default: the
            key of the process's settings (:func:`registry_key`); None signs nothing and
            checks the sha256 only (what ``WEIR_MODEL_INSECURE=1`` gives).
        keep_snapshots: snapshots to keep (default the spec's ``learner.keep_snapshots``).
        keep_versions: newest version blobs to keep besides the champion, its predecessor
            and the challenger (default the spec's ``retrain.keep_versions``).
    """

    def __init__(
        self,
        client: redis.Redis,
        spec: PipelineSpec,
        key: bytes | _FromSettings | None = FROM_SETTINGS,
        keep_snapshots: int | None = None,
        keep_versions: int | None = None,
    ) -> None:
        self.client: Any = client  # redis-py's stubs type replies as bytes | str
        self.spec = spec
        if isinstance(key, _FromSettings):
            from weir.settings import load_settings

            key = registry_key(load_settings())
        self.key: bytes | None = key
        self.key_source = getattr(key, "source", "the key given to ModelRegistry")
        self.key_id = key_id(key) if key is not None else None
        ks = spec.learner.keep_snapshots if keep_snapshots is None else keep_snapshots
        kv = spec.retrain.keep_versions if keep_versions is None else keep_versions
        self.keep_snapshots = max(1, ks)
        self.keep_versions = max(1, kv)
        self.prefix = f"{spec.redis_prefix}:registry:"
        self._publish_script: Any = None
        self._reserve_script: Any = None

    # -- blobs -------------------------------------------------------------------

    def _mac(self, blob: bytes, kind: str, ids: tuple[str, ...]) -> str:
        assert self.key is not None
        # What the blob is, whose and under which ids, then the blob: a valid blob moved
        # under another id, kind or pipeline no longer matches. JSON keeps the parts apart.
        head = orjson.dumps(["weir-blob", HMAC_SCHEME, kind, self.spec.name, *ids])
        return hmac.new(self.key, head + b"\n" + blob, hashlib.sha256).hexdigest()

    def _sign(self, blob: bytes, kind: str, ids: tuple[str, ...]) -> dict[str, Any]:
        """The integrity fields stored with a blob: sha256, and with a key the HMAC."""
        out: dict[str, Any] = {"blob_sha256": hashlib.sha256(blob).hexdigest(), "blob_hmac": None}
        if self.key is not None:
            out.update(blob_hmac=self._mac(blob, kind, ids), hmac_scheme=HMAC_SCHEME, key_id=self.key_id)
        return out

    def _share_hint(self) -> str:
        return (
            f"Every process of pipeline {self.spec.name!r} must use the same model key: set the "
            "same WEIR_MODEL_KEY (or WEIR_MODEL_KEY_FILE) for all of them, or give them one "
            "WEIR_DATA_DIR (or a copy of its model.key)"
        )

    def _verify(
        self, what: str, blob: bytes | None, meta: dict[str, Any], kind: str, ids: tuple[str, ...]
    ) -> Any:
        """Unpickle ``blob`` only after its sha256 and (with a key) HMAC check."""
        if blob is None:
            raise IntegrityError(f"{what}: the model blob is missing from Redis; it cannot load")
        sha = str(meta.get("blob_sha256") or "")
        got = hashlib.sha256(blob).hexdigest()
        if not hmac.compare_digest(got, sha):
            raise IntegrityError(
                f"{what}: blob sha256 mismatch (stored {sha[:12]}..., computed {got[:12]}...); "
                "the blob was altered or corrupted and was NOT unpickled"
            )
        if self.key is not None:
            mac = meta.get("blob_hmac")
            if not mac:
                raise IntegrityError(
                    f"{what}: the blob is not signed (saved by a process with "
                    f"WEIR_MODEL_INSECURE=1, or by an older Weir) but this process has a model "
                    f"key ({self.key_source}); it was NOT unpickled. Re-create it from a process "
                    f"with the key, or delete the pipeline's registry (Redis keys "
                    f"{self.prefix}*) to start afresh. {self._share_hint()}"
                )
            if meta.get("hmac_scheme") != HMAC_SCHEME:
                raise IntegrityError(
                    f"{what}: signed by an older Weir (hmac_scheme={meta.get('hmac_scheme')!r}, "
                    f"want {HMAC_SCHEME}: an HMAC of the blob alone, not bound to its id); it was "
                    "NOT unpickled. Re-create it with this Weir, or delete the pipeline's registry "
                    f"(Redis keys {self.prefix}*) to start afresh"
                )
            if not isinstance(mac, str) or not hmac.compare_digest(self._mac(blob, kind, ids), mac):
                theirs = meta.get("key_id")
                if theirs and theirs != self.key_id:
                    raise ModelKeyError(
                        f"{what}: signed with another model key (key id {theirs}; this process's "
                        f"key, from {self.key_source}, has key id {self.key_id}); it was NOT "
                        f"unpickled. {self._share_hint()}"
                    )
                raise IntegrityError(
                    f"{what}: blob HMAC mismatch under this process's key ({self.key_source}, "
                    f"key id {self.key_id}): the blob, its id or its metadata was changed after "
                    "it was signed; it was NOT unpickled"
                )
        return pickle.loads(blob)

    # -- versions ----------------------------------------------------------------

    def save(
        self,
        model: Any,
        *,
        parent: str | None,
        trigger: str,
        reason: str,
        meta: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> ModelVersion:
        """Store a new version; returns its metadata (id ``v<N>``).

        Args:
            token: an idempotency token naming this save (e.g. the retrain that made the
                model). The id is reserved for it before anything is written, so a save
                retried after a lost reply, or repeated after a crash, with the same token
                returns the version already stored instead of a second copy; a crash
                between the reservation and the write leaves the id to the next call.
                Without a token every call stores a new version.

        The version (blob, metadata, list entry) is written in one transaction.
        """
        blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        if token is None:
            vid = f"v{int(self.client.incr(self.prefix + 'seq'))}"
        else:
            if self._reserve_script is None:
                self._reserve_script = self.client.register_script(_RESERVE_VERSION)
            raw = self._reserve_script(keys=[self._saved_key(token), self.prefix + "seq"])
            vid = raw.decode() if isinstance(raw, bytes) else str(raw)
        meta_key = self.prefix + f"meta:{vid}"
        existing = self.client.get(meta_key)
        if existing is not None:
            log.info("save %r was already stored as %s", token, vid)
            return self._version(dict(orjson.loads(existing)))
        signed = self._sign(blob, "version", (vid, self.spec.model.name))
        version = ModelVersion(
            id=vid,
            model=self.spec.model.name,
            parent=parent,
            created=time.time(),
            trigger=trigger,
            reason=reason,
            blob_sha256=signed["blob_sha256"],
            river_version=_river_version(),
            spec_hash=self.spec.spec_hash(),
            meta=dict(meta or {}, **({"save_token": token} if token is not None else {})),
        )
        record = {**dataclasses.asdict(version), **signed}

        def write(pipe: Any) -> bytes | None:
            raced = pipe.get(meta_key)  # a concurrent save of the same model got there first
            if raced is not None:
                return raced  # type: ignore[no-any-return]
            pipe.multi()
            pipe.set(self.prefix + f"blob:{vid}", blob)
            pipe.set(meta_key, orjson.dumps(record, default=str))
            pipe.rpush(self.prefix + "versions", vid)
            return None

        raced = self.client.transaction(write, meta_key, value_from_callable=True)
        if raced is not None:
            return self._version(dict(orjson.loads(raced)))
        try:
            self.prune()
        except Exception as exc:  # the version is saved; the next save prunes
            log.warning("saved %s but could not prune old versions (next save will): %s", version.id, exc)
        return version

    def _saved_key(self, token: str) -> str:
        return self.prefix + f"saved:{hashlib.sha256(token.encode()).hexdigest()[:32]}"

    def ids(self) -> list[str]:
        return [v.decode() for v in self.client.lrange(self.prefix + "versions", 0, -1)]

    def _record(self, version_id: str) -> dict[str, Any]:
        raw = self.client.get(self.prefix + f"meta:{version_id}")
        if raw is None:
            known = self.ids()
            raise ModelError(
                f"model version {version_id!r} is unknown; known versions: "
                f"{', '.join(known) if known else '(none yet)'}"
            )
        return dict(orjson.loads(raw))

    @staticmethod
    def _version(record: dict[str, Any]) -> ModelVersion:
        fields = {f.name for f in dataclasses.fields(ModelVersion)}
        return ModelVersion(**{k: v for k, v in record.items() if k in fields})

    def get(self, version_id: str) -> ModelVersion:
        return self._version(self._record(version_id))

    def list(self) -> list[ModelVersion]:
        ids = self.ids()
        if not ids:
            return []
        raws = self.client.mget([self.prefix + f"meta:{i}" for i in ids])
        return [self._version(orjson.loads(r)) for r in raws if r is not None]

    def load(self, version_id: str) -> tuple[Any, ModelVersion]:
        """The model of a version, after its sha256/HMAC check."""
        record = self._record(version_id)
        self._check_not_pruned(version_id, record)
        blob = self.client.get(self.prefix + f"blob:{version_id}")
        ids = (version_id, str(record.get("model")))
        model = self._verify(f"model version {version_id}", blob, record, "version", ids)
        return model, self._version(record)

    def update_meta(self, version_id: str, **meta: Any) -> ModelVersion:
        """Merge ``meta`` into a version's ``meta`` (e.g. shadow metrics)."""
        key = self.prefix + f"meta:{version_id}"
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.reset()
                        self._record(version_id)  # raises with the known ids
                    record = dict(orjson.loads(raw))  # type: ignore[arg-type]
                    record["meta"] = {**record.get("meta", {}), **meta}
                    pipe.multi()
                    pipe.set(key, orjson.dumps(record, default=str))
                    pipe.execute()
                    return self._version(record)
                except Exception as exc:
                    import redis as _redis

                    if isinstance(exc, _redis.WatchError):
                        continue
                    raise

    # -- retention ---------------------------------------------------------------

    def _check_not_pruned(self, version_id: str, record: dict[str, Any]) -> None:
        pruned = (record.get("meta") or {}).get("pruned_at")
        if pruned is not None:
            raise ModelError(
                f"model version {version_id!r} was pruned at {pruned} (retrain.keep_versions="
                f"{self.keep_versions} keeps the champion, its predecessor, the challenger and the "
                f"newest {self.keep_versions}); its blob is gone: promote a kept version "
                f"({', '.join(self.kept()) or 'none'}) or raise keep_versions"
            )

    def protected(self) -> set[str]:
        """Versions never pruned: champion, its predecessor (its previous alias target and
        its parent) and the challenger."""
        champ, chall = self.client.mget(self.prefix + "alias:champion", self.prefix + "alias:challenger")
        out = {v.decode() for v in (champ, chall) if v is not None}
        head = self.client.lindex(self.prefix + "alias_history:champion", 0)
        if head is not None:
            out.add(head.decode())
        if champ is not None:
            raw = self.client.get(self.prefix + f"meta:{champ.decode()}")
            parent = dict(orjson.loads(raw)).get("parent") if raw is not None else None
            if parent:
                out.add(str(parent))
        return out

    def _retained(self, ids: builtins.list[str]) -> set[str]:
        """The retention rule: of ``ids`` (oldest first), the protected and the newest."""
        return self.protected() | set(ids[-self.keep_versions :])

    def kept(self) -> builtins.list[str]:
        """Version ids whose blobs are kept now (protected or among the newest), oldest first."""
        ids = self.ids()
        keep = self._retained(ids)
        return [i for i in ids if i in keep]

    def prune(self) -> builtins.list[str]:
        """Delete the blobs of versions beyond the retention; returns the ids pruned now.

        Runs under WATCH of the aliases, so a promotion or rollback racing with it makes it
        start over rather than prune the version just aliased.
        """
        import redis as _redis

        watched = [
            self.prefix + "alias:champion",
            self.prefix + "alias:challenger",
            self.prefix + "alias_history:champion",
            self.prefix + "versions",
        ]
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    ids = self.ids()
                    keep = self._retained(ids)
                    candidates = [i for i in ids if i not in keep]
                    if candidates:  # an update_meta racing with us restarts the prune
                        pipe.watch(*watched, *(self.prefix + f"meta:{i}" for i in candidates))
                    # MGET through execute_command: redis-py's cluster pipeline blocks mget().
                    metas = [self.prefix + f"meta:{i}" for i in candidates]
                    raws = pipe.execute_command("MGET", *metas) if candidates else []
                    gone: list[tuple[str, dict[str, Any]]] = []
                    for vid, raw in zip(candidates, raws, strict=True):
                        if raw is None:
                            continue
                        record = dict(orjson.loads(raw))
                        if (record.get("meta") or {}).get("pruned_at") is None:
                            gone.append((vid, record))
                    if not gone:
                        pipe.reset()
                        return []
                    now = time.time()
                    pipe.multi()
                    for vid, record in gone:
                        record["meta"] = {**(record.get("meta") or {}), "pruned_at": now}
                        pipe.set(self.prefix + f"meta:{vid}", orjson.dumps(record, default=str))
                        token = (record.get("meta") or {}).get("save_token")
                        saved = [self._saved_key(str(token))] if token is not None else []
                        pipe.delete(
                            self.prefix + f"blob:{vid}",
                            self.prefix + f"parkblob:{vid}",
                            self.prefix + f"parkmeta:{vid}",
                            self.prefix + f"snapseq:{vid}",
                            *saved,
                        )
                    pipe.execute()
                    return [vid for vid, _ in gone]
                except _redis.WatchError:
                    continue

    # -- aliases -----------------------------------------------------------------

    def _check_alias(self, name: str) -> None:
        if name not in ALIASES:
            raise ModelError(f"alias must be one of {list(ALIASES)}, got {name!r}")

    def set_alias(self, alias: Alias, version_id: str | None) -> None:
        """Point ``alias`` at a version (None removes it); the old target goes to history.

        One transaction under WATCH of the alias: a racing move makes it start over, so
        the history never records a target the alias did not have.
        """
        self._check_alias(alias)
        if version_id is not None:
            self._check_not_pruned(version_id, self._record(version_id))  # unknown -> ModelError
        key = self.prefix + f"alias:{alias}"
        hist = self.prefix + f"alias_history:{alias}"

        def move(pipe: Any) -> None:
            old = pipe.get(key)
            pipe.multi()
            if old is not None and old.decode() != version_id:
                pipe.lpush(hist, old)
                pipe.ltrim(hist, 0, 99)
            if version_id is None:
                pipe.delete(key)
            else:
                pipe.set(key, version_id)

        self.client.transaction(move, key)

    def alias(self, name: str) -> str | None:
        self._check_alias(name)
        raw = self.client.get(self.prefix + f"alias:{name}")
        return None if raw is None else raw.decode()

    def alias_history(self, name: str) -> builtins.list[str]:
        """Earlier targets of an alias, newest first."""
        self._check_alias(name)
        return [v.decode() for v in self.client.lrange(self.prefix + f"alias_history:{name}", 0, -1)]

    def rollback(self, alias: Alias = "champion") -> str:
        """Point ``alias`` back at its previous target; returns that version id.

        Atomic: the history's head is popped and the alias moved in one transaction
        under WATCH of both, and only after the target is checked, so a failure (a pruned
        target, a lost connection) leaves alias and history as they were.
        """
        self._check_alias(alias)
        key = self.prefix + f"alias:{alias}"
        hist = self.prefix + f"alias_history:{alias}"

        def back(pipe: Any) -> str:
            prev = pipe.lindex(hist, 0)
            if prev is None:
                current = pipe.get(key)
                parent = self.get(current.decode()).parent if current is not None else None
                if parent is None:
                    raise ModelError(f"cannot roll back {alias!r}: it has no previous version")
                target = parent
            else:
                target = prev.decode()
            self._check_not_pruned(target, self._record(target))
            pipe.multi()
            if prev is not None:
                pipe.lpop(hist)
            pipe.set(key, target)
            return target

        return str(self.client.transaction(back, key, hist, value_from_callable=True))

    # -- parked state: where a version resumes when it serves again ----------------

    def park(self, model: Any, version_id: str, *, labels_learned: int, by: str) -> None:
        """Keep ``version_id``'s live model as it is now, for when it serves again.

        A learner parks the version it stops serving (a promotion or a rollback moved
        the champion alias), and the monitor parks a promoted challenger as it learned in
        shadow. :meth:`load_live` picks the parked state up, so a rollback returns the
        predecessor with everything it had learned, not the blob it was first saved as.
        One parked state per version; the newest wins. Signed like every blob.
        """
        self._record(version_id)  # unknown versions are an error
        blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        meta = {
            "version_id": version_id,
            "labels_learned": int(labels_learned),
            "parked_by": by,
            "created": time.time(),
            **self._sign(blob, "parked", (version_id,)),
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.prefix + f"parkblob:{version_id}", blob)
        pipe.set(self.prefix + f"parkmeta:{version_id}", orjson.dumps(meta))
        pipe.execute()

    def load_live(self, version_id: str) -> tuple[Any, dict[str, Any] | None]:
        """``(model, parked meta)``: the version's parked state, else its saved blob and None."""
        raw, blob = self.client.mget(
            self.prefix + f"parkmeta:{version_id}", self.prefix + f"parkblob:{version_id}"
        )
        if raw is None:
            model, _ = self.load(version_id)
            return model, None
        meta = dict(orjson.loads(raw))
        what = f"parked state of {version_id}"
        return self._verify(what, blob, meta, "parked", (version_id,)), meta

    # -- snapshots ---------------------------------------------------------------

    def publish_snapshot(
        self,
        model: Any,
        *,
        version_id: str,
        labels_learned: int,
        offsets: dict[int, int],
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Store the live model for the scorers; returns the snapshot id ``<version>.<n>``.

        ``offsets`` are the labels topic's next offsets to read, per partition: a learner
        restarting from this snapshot seeks there. ``extra`` is stored with the metadata.
        """
        blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        n = int(self.client.incr(self.prefix + f"snapseq:{version_id}"))
        sid = f"{version_id}.{n}"
        meta = {
            "snapshot_id": sid,
            "version_id": version_id,
            "labels_learned": labels_learned,
            "offsets": {str(p): int(o) for p, o in offsets.items()},
            "created": time.time(),
            **(extra or {}),
            **self._sign(blob, "snapshot", (sid, version_id)),
        }
        if self._publish_script is None:
            self._publish_script = self.client.register_script(_PUBLISH_SNAPSHOT)
        # One script: the new snapshot, the list trimmed and the pruned blobs deleted
        # together, so a crash never leaves a blob that no list points at.
        self._publish_script(
            keys=[
                self.prefix + "snapshots",
                self.prefix + "snapshot:latest",
                self.prefix + f"snapblob:{sid}",
                self.prefix + f"snapmeta:{sid}",
            ],
            args=[sid, self.keep_snapshots, self.prefix, blob, orjson.dumps(meta, default=str)],
        )
        return sid

    def latest_snapshot(self) -> str | None:
        """The newest snapshot id (one GET), or None before the first snapshot."""
        raw = self.client.get(self.prefix + "snapshot:latest")
        return None if raw is None else raw.decode()

    def snapshot_meta(self, snapshot_id: str) -> dict[str, Any]:
        raw = self.client.get(self.prefix + f"snapmeta:{snapshot_id}")
        if raw is None:
            known = [s.decode() for s in self.client.lrange(self.prefix + "snapshots", 0, -1)]
            raise ModelError(
                f"snapshot {snapshot_id!r} is unknown or pruned; kept snapshots: "
                f"{', '.join(known) if known else '(none)'}"
            )
        meta = dict(orjson.loads(raw))
        meta["offsets"] = {int(p): int(o) for p, o in meta.get("offsets", {}).items()}
        return meta

    def load_snapshot(self, snapshot_id: str) -> tuple[Any, dict[str, Any]]:
        """``(model, meta)``; meta has version_id, labels_learned, offsets, created."""
        meta = self.snapshot_meta(snapshot_id)
        blob = self.client.get(self.prefix + f"snapblob:{snapshot_id}")
        ids = (snapshot_id, str(meta.get("version_id")))
        model = self._verify(f"snapshot {snapshot_id}", blob, meta, "snapshot", ids)
        return model, meta

    # -- process checkpoints -------------------------------------------------------

    def save_checkpoint(self, name: str, state: Any, info: dict[str, Any] | None = None) -> int:
        """Store a process's state (pickled, signed like a model); returns its size in bytes.

        One checkpoint per ``name``, replaced atomically: blob and metadata together.
        """
        blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        meta = {
            "name": name,
            "created": time.time(),
            "bytes": len(blob),
            **(info or {}),
            **self._sign(blob, "checkpoint", (name,)),
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.prefix + f"checkpoint:{name}", blob)
        pipe.set(self.prefix + f"checkpointmeta:{name}", orjson.dumps(meta, default=str))
        pipe.execute()
        return len(blob)

    def load_checkpoint(self, name: str) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the checkpoint ``name`` after its sha256/HMAC check, or None."""
        raw, blob = self.client.mget(
            self.prefix + f"checkpointmeta:{name}", self.prefix + f"checkpoint:{name}"
        )
        if raw is None:
            return None
        meta = dict(orjson.loads(raw))
        state = self._verify(f"checkpoint {name}", blob, meta, "checkpoint", (name,))
        return state, meta
