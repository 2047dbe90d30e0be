"""Topic administration and server checks, with confluent-kafka's AdminClient.

``check_broker`` and ``check_redis`` fail fast with a :class:`~weir.errors.StackError`
that names the address tried and the fix, instead of a worker hanging on a dead
bootstrap address. ``ensure_topics`` creates a pipeline's topics idempotently;
``delete_topics`` removes topics (tests clean up after themselves with it).

Examples:
    >>> from weir.settings import load_settings
    >>> ensure_topics(load_settings(), spec)            # doctest: +SKIP
    {'weir.demo.events': 'created', ...}
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from weir.errors import StackError
from weir.redact import redact_url
from weir.spec import PipelineSpec

if TYPE_CHECKING:
    from weir.settings import Settings

log = logging.getLogger(__name__)

TopicStatus = Literal["created", "exists"]

_KAFKA_FIX = (
    "start the local stack with `make up`, or set WEIR_KAFKA_BOOTSTRAP to reachable "
    "brokers (host:port[,host:port])"
)
_REDIS_FIX = "start the local stack with `make up`, or set WEIR_REDIS_URL to a reachable Redis"
#: The oldest Redis that runs a pipeline with ``redis.buckets`` > 1: its feature and join
#: scripts start with ``#!lua flags=allow-cross-slot-keys`` (script flags came with 7.0).
BUCKETS_MIN_REDIS = (7, 0)


def admin_client(settings: Settings, error_cb: Callable[[KafkaError], None] | None = None) -> AdminClient:
    """An AdminClient for the settings' brokers (security settings included).

    librdkafka's own log lines (one per failed connection attempt) go to the
    ``streams.admin.librdkafka`` logger instead of stderr; its errors to ``error_cb``
    (served by the client's ``poll``).
    """
    conf: dict[str, Any] = dict(settings.confluent_config())
    conf["logger"] = logging.getLogger(f"{__name__}.librdkafka")
    if error_cb is not None:
        conf["error_cb"] = error_cb
    return AdminClient(conf)


def check_broker(settings: Settings, timeout: float = 10.0) -> ClusterMetadata:
    """Ask the brokers for cluster metadata; raise StackError if none answers in time.

    Returns:
        The cluster metadata (``.brokers``, ``.topics``, ``.cluster_id``).
    """
    errors: list[KafkaError] = []
    client = admin_client(settings, errors.append)
    try:
        md = client.list_topics(timeout=timeout)
    except KafkaException as exc:
        client.poll(0)  # serve the client's errors: a refused login or TLS says why
        refused = _refusal(errors)
        if refused:
            raise StackError(f"Kafka at {settings.kafka_bootstrap} {refused}") from None
        raise StackError(
            f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout:g}s "
            f"({_kafka_reason(exc)}); {_KAFKA_FIX}"
        ) from None
    if not md.brokers:
        raise StackError(f"Kafka at {settings.kafka_bootstrap} answered with no brokers; {_KAFKA_FIX}")
    return md


def check_redis(settings: Settings, timeout: float = 5.0, spec: PipelineSpec | None = None) -> None:
    """PING Redis; raise StackError naming the URL (password hidden) if it does not answer.

    With ``WEIR_REDIS_CLUSTER`` the client is a ``RedisCluster`` (it reads the cluster's slot
    map from the node named); a single-Redis client that finds a cluster node, or a cluster
    client that finds no cluster, is refused with the setting to change. With a ``spec``
    whose ``redis.buckets`` > 1, a Redis (or any cluster master) older than
    :data:`BUCKETS_MIN_REDIS` is refused too: its scripts' flags would fail at the first
    batch with a script error that does not say why.
    """
    import redis

    url = redact_url(settings.redis_url)
    try:
        # The process's own client (Settings.redis: single or cluster), with this timeout.
        client = settings.model_copy(update={"redis_timeout": timeout}).redis()
    except ValueError as exc:
        raise StackError(f"WEIR_REDIS_URL {url!r} is not a valid Redis URL ({exc})") from None
    except redis.exceptions.RedisClusterException as exc:
        if "not enabled" not in str(exc):  # refused, timed out: no node answered
            raise StackError(f"Redis Cluster at {url} is unreachable ({exc}); {_REDIS_FIX}") from None
        raise StackError(
            f"WEIR_REDIS_CLUSTER is true but Redis at {url} gave no cluster ({exc}); name a node of "
            "a Redis Cluster in WEIR_REDIS_URL, or set WEIR_REDIS_CLUSTER=false for a single Redis"
        ) from None
    except (redis.RedisError, OSError) as exc:
        raise StackError(f"Redis at {url} is unreachable ({exc}); {_REDIS_FIX}") from None
    try:
        client.ping()
        if not settings.redis_cluster and _cluster_enabled(client):
            raise StackError(
                f"Redis at {url} is a Redis Cluster node: a single-Redis client would get MOVED "
                "errors for most keys; set WEIR_REDIS_CLUSTER=true"
            )
        if spec is not None and spec.redis.buckets > 1:
            _check_buckets_redis(client, spec, url)
    except redis.AuthenticationError as exc:
        raise StackError(
            f"Redis at {url} refused the credentials ({exc}); check WEIR_REDIS_PASSWORD "
            "or the password in WEIR_REDIS_URL"
        ) from None
    except (redis.RedisError, OSError) as exc:
        raise StackError(f"Redis at {url} is unreachable ({exc}); {_REDIS_FIX}") from None
    finally:
        client.close()


def ensure_topics(
    settings: Settings,
    spec_or_names: PipelineSpec | Iterable[str] | Mapping[str, str],
    partitions: int | None = None,
    replication_factor: int | None = None,
    *,
    min_insync_replicas: int | None = None,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> dict[str, TopicStatus]:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Args:
        settings: where the brokers are.
        spec_or_names: a pipeline spec (all of ``spec.topics.names()``), a role -> name
            mapping, or topic names.
        partitions: partitions of each new topic; default: the spec's
            ``topics.partitions``, or 1 for plain names.
        replication_factor: default: ``WEIR_TOPIC_REPLICATION_FACTOR``, else the spec's
            ``topics.replication_factor``, else 1.
        min_insync_replicas: each new topic's ``min.insync.replicas``; default:
            ``WEIR_TOPIC_MIN_INSYNC_REPLICAS``, else the spec's ``topics.min_insync_replicas``,
            else the broker's default (not set on the topic).
        config: topic configs for new topics (e.g. ``{"retention.ms": "3600000"}``).
        timeout: seconds to wait for the creation and for the new topics' leaders.

    Returns:
        Topic name -> ``"created"`` or ``"exists"``. An existing topic whose partition
        count differs from ``partitions`` is logged as a warning, not changed
        (Kafka cannot shrink a topic, and growing it re-keys partitioned state), and so
        is one whose replication factor differs.
    """
    names, spec_partitions, spec_rf, spec_isr = _topic_names(spec_or_names)
    partitions = partitions if partitions is not None else spec_partitions
    replication_factor = _first(replication_factor, settings.topic_replication_factor, spec_rf, 1)
    min_insync_replicas = _first(min_insync_replicas, settings.topic_min_insync_replicas, spec_isr)
    if partitions < 1:
        raise StackError(f"partitions must be >= 1, got {partitions!r}")
    if replication_factor < 1:
        raise StackError(f"replication_factor must be >= 1, got {replication_factor!r}")
    topic_config = dict(config or {})
    if min_insync_replicas is not None:
        if not 1 <= min_insync_replicas <= replication_factor:
            raise StackError(
                f"min.insync.replicas {min_insync_replicas!r} does not fit replication factor "
                f"{replication_factor} (WEIR_TOPIC_MIN_INSYNC_REPLICAS / topics.min_insync_replicas, "
                "WEIR_TOPIC_REPLICATION_FACTOR / topics.replication_factor): it must be between 1 and "
                "the replication factor (2 with a factor of 3)"
            )
        topic_config.setdefault("min.insync.replicas", str(min_insync_replicas))
    if not names:
        return {}

    check_broker(settings, timeout=min(timeout, 10.0))
    admin = admin_client(settings)
    new = [
        NewTopic(n, num_partitions=partitions, replication_factor=replication_factor, config=topic_config)
        for n in names
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    status: dict[str, TopicStatus] = {}
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout + 5)
            status[name] = "created"
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                status[name] = "exists"
                continue
            raise StackError(
                f"could not create topic {name!r} ({partitions} partitions, replication factor "
                f"{replication_factor}) on {settings.kafka_bootstrap}: {_kafka_reason(exc)}"
            ) from None
        except TimeoutError:
            raise StackError(
                f"creating topic {name!r} on {settings.kafka_bootstrap} took over {timeout:g}s; "
                "check the broker's log (`make logs`)"
            ) from None
    md = _wait_for_leaders(admin, settings, names, timeout)
    for name, state in status.items():
        have = len(md.topics[name].partitions)
        if state == "exists" and have != partitions:
            log.warning(
                "topic %r exists with %d partitions, asked for %d; left unchanged "
                "(delete it or choose the spec's topics.partitions to match)",
                name,
                have,
                partitions,
            )
        rf = min((len(p.replicas) for p in md.topics[name].partitions.values()), default=0)
        if state == "exists" and rf != replication_factor:
            log.warning(
                "topic %r exists with replication factor %d, asked for %d; left unchanged "
                "(raise it with kafka-reassign-partitions, or delete the topic)",
                name,
                rf,
                replication_factor,
            )
    return {n: status[n] for n in names}


def delete_topics(settings: Settings, names: Iterable[str], timeout: float = 30.0) -> list[str]:
    """Delete topics; unknown ones are ignored. Waits until the metadata no longer lists them.

    Returns:
        The topics that existed and were deleted.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return []
    admin = admin_client(settings)
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    deleted = []
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout + 5)
            deleted.append(name)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise StackError(
                f"could not delete topic {name!r} on {settings.kafka_bootstrap}: {_kafka_reason(exc)}"
            ) from None
        except TimeoutError:
            raise StackError(
                f"deleting topic {name!r} on {settings.kafka_bootstrap} took over {timeout:g}s"
            ) from None
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        still = [n for n in deleted if n in md.topics]
        if not still:
            return sorted(deleted)
        if time.monotonic() >= deadline:
            raise StackError(f"topics {still} still listed {timeout:g}s after deletion")
        time.sleep(0.1)


def _cluster_enabled(client: Any) -> bool:
    """Whether the Redis behind ``client`` runs in cluster mode (False if INFO is refused)."""
    import redis

    try:
        return bool(int(client.info("cluster").get("cluster_enabled", 0) or 0))
    except redis.ResponseError:  # INFO not allowed to this user: let the first command tell
        return False


def _check_buckets_redis(client: Any, spec: PipelineSpec, url: str) -> None:
    """Refuse ``redis.buckets`` > 1 on a Redis, or a cluster master, older than 7.0."""
    import redis

    try:
        versions = _redis_versions(client, url)
    except redis.ResponseError:  # INFO not allowed to this user: the first script will tell
        log.warning("could not read the Redis version at %s (INFO refused); redis.buckets > 1 needs 7.0", url)
        return
    low = ".".join(map(str, BUCKETS_MIN_REDIS))
    old = {node: v for node, v in versions.items() if redis_version(v) < BUCKETS_MIN_REDIS}
    if old:
        found = ", ".join(f"{v} at {node}" for node, v in sorted(old.items()))
        raise StackError(
            f"redis.buckets is {spec.redis.buckets} in pipeline {spec.name!r}, which needs Redis >= {low} "
            f"(its scripts use `#!lua flags=allow-cross-slot-keys`), but found Redis {found}; upgrade "
            f"Redis to {low} or later, or set `redis.buckets: 1` in the spec (a new value names other "
            "keys: start the pipeline afresh)"
        )


def _redis_versions(client: Any, url: str) -> dict[str, str]:
    """``redis_version`` of the Redis behind ``client``, by node: every master of a cluster."""
    get = getattr(client, "get_primaries", None)
    if get is None:
        return {url: str(client.info("server").get("redis_version", ""))}
    out = {}
    for node in get():
        info = client.info("server", target_nodes=node)
        if "redis_version" not in info:  # redis-py answers {node name: info} for some targets
            info = next(iter(info.values()), {})
        out[node.name] = str(info.get("redis_version", ""))
    return out


def redis_version(text: str) -> tuple[int, ...]:
    """A ``redis_version`` as numbers, to compare (what does not parse counts as 0).

    Examples:
        >>> redis_version("7.0.15"), redis_version("6.2.14") < (7, 0), redis_version("7.2.4") >= (7, 0)
        ((7, 0, 15), True, True)
        >>> redis_version("255.255.255"), redis_version("7.0.0-rc1"), redis_version("")
        ((255, 255, 255), (7, 0, 0), (0,))
    """
    parts = []
    for part in text.strip().split("."):
        digits = re.match(r"\d+", part)  # 7.0.0-rc1: 7, 0, 0
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def delete_keys(client: Any, prefix: str, chunk: int = 1000) -> int:
    """Delete every Redis key under ``prefix:`` (a pipeline's ``spec.redis_prefix``).

    A pipeline's prefix (``weir:{<name>}``) deletes the keys of its buckets too
    (``weir:{<name>#e<b>}:...``, ``redis.buckets`` > 1, :func:`weir.slots.key_pattern`).
    SCAN, then DEL in chunks, so a pipeline with millions of keys never sends one huge
    command. Returns how many keys were deleted. With a ``RedisCluster`` client the same
    calls scan every master (redis-py's cluster ``scan_iter``) and split each ``DEL`` by
    hash slot (tests/cluster/test_redis_weir.py).
    """
    from weir.slots import prefix_pattern

    keys = list(client.scan_iter(match=prefix_pattern(prefix), count=chunk))
    for i in range(0, len(keys), chunk):
        client.delete(*keys[i : i + chunk])
    return len(keys)


def _first(*values: int | None) -> Any:
    """The first value that is not None (None if all are)."""
    return next((v for v in values if v is not None), None)


def _topic_names(
    spec_or_names: PipelineSpec | Iterable[str] | Mapping[str, str],
) -> tuple[list[str], int, int | None, int | None]:
    if isinstance(spec_or_names, PipelineSpec):
        t = spec_or_names.topics
        names = list(dict.fromkeys(t.names().values()))
        return names, t.partitions, t.replication_factor, t.min_insync_replicas
    if isinstance(spec_or_names, str):
        raise StackError(
            f"ensure_topics wants a spec or a list of topic names, got the string "
            f"{spec_or_names!r}; wrap it in a list: [{spec_or_names!r}]"
        )
    if isinstance(spec_or_names, Mapping):
        return list(dict.fromkeys(spec_or_names.values())), 1, None, None
    return list(dict.fromkeys(spec_or_names)), 1, None, None


def _wait_for_leaders(
    admin: AdminClient, settings: Settings, names: list[str], timeout: float
) -> ClusterMetadata:
    # A topic is usable once every partition has a leader; right after creation the
    # metadata can still lack it and a producer would get UNKNOWN_TOPIC_OR_PART.
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        missing = [
            n
            for n in names
            if n not in md.topics
            or md.topics[n].error is not None
            or not md.topics[n].partitions
            or any(p.leader < 0 for p in md.topics[n].partitions.values())
        ]
        if not missing:
            return md
        if time.monotonic() >= deadline:
            raise StackError(
                f"topics {missing} have no leader {timeout:g}s after creation on "
                f"{settings.kafka_bootstrap}; check the broker's log (`make logs`)"
            )
        time.sleep(0.1)


def _refusal(errors: list[KafkaError]) -> str | None:
    """What to fix when a broker answered but refused the client (its login or TLS)."""
    for e in errors:
        if e.code() == KafkaError._AUTHENTICATION:
            return (
                f"refused the login ({e.str()}); check WEIR_KAFKA_SASL_MECHANISM, "
                "WEIR_KAFKA_SASL_USERNAME and WEIR_KAFKA_SASL_PASSWORD"
            )
        if e.code() == KafkaError._SSL:
            return (
                f"could not be reached over TLS ({e.str()}); check WEIR_KAFKA_SSL_CAFILE (the CA "
                "that signed the brokers' certificates) and WEIR_KAFKA_SECURITY_PROTOCOL"
            )
    return None


def _kafka_reason(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        return err.str()
    return str(exc)
