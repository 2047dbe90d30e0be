"""Process settings: the one place ``WEIR_*`` environment variables are read.

Every field below is documented with its environment variable and default; the
README's configuration table is generated from the same docstrings
(``weir config --markdown``). Secrets are :class:`~pydantic.SecretStr` and are
never logged or printed (``weir config`` shows them as ``**********``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from weir.errors import ConfigError


class Settings(BaseSettings):
    """Settings of one Weir process, read from ``WEIR_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="WEIR_", extra="forbid", frozen=True)

    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        description="`WEIR_KAFKA_BOOTSTRAP`: Kafka bootstrap servers, comma separated.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="`WEIR_KAFKA_SECURITY_PROTOCOL`: how to talk to the brokers."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None,
        description="`WEIR_KAFKA_SASL_MECHANISM`: SASL mechanism when the protocol is SASL_*.",
        validate_default=True,
    )
    kafka_sasl_username: str | None = Field(None, description="`WEIR_KAFKA_SASL_USERNAME`: SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="`WEIR_KAFKA_SASL_PASSWORD`: SASL password (secret)."
    )
    kafka_ssl_cafile: str | None = Field(
        None, description="`WEIR_KAFKA_SSL_CAFILE`: CA bundle for TLS to the brokers."
    )
    kafka_ssl_certfile: str | None = Field(
        None, description="`WEIR_KAFKA_SSL_CERTFILE`: client certificate for mutual TLS."
    )
    kafka_ssl_keyfile: str | None = Field(
        None, description="`WEIR_KAFKA_SSL_KEYFILE`: client key for mutual TLS."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="`WEIR_REDIS_URL`: Redis URL; `rediss://` for TLS.",
    )
    redis_password: SecretStr | None = Field(
        None, description="`WEIR_REDIS_PASSWORD`: Redis password (secret), if not in the URL."
    )
    redis_ssl_ca_certs: str | None = Field(
        None, description="`WEIR_REDIS_SSL_CA_CERTS`: CA bundle for `rediss://` URLs."
    )
    redis_timeout: float = Field(
        5.0,
        gt=0,
        description="`WEIR_REDIS_TIMEOUT`: seconds a Redis connect or command may take before it "
        "counts as failed and is retried with backoff (a hung Redis must not hang Weir).",
    )
    redis_cluster: bool = Field(
        False,
        description="`WEIR_REDIS_CLUSTER`: true for a Redis Cluster; `WEIR_REDIS_URL` then names "
        "any one node (e.g. `redis://10.0.0.1:7000`, database 0 only) and the client finds the "
        "others. A pipeline's keys share one hash slot, or spread over every master with the "
        "spec's `redis.buckets` (docs/scaling.md).",
    )
    kafka_session_timeout: float = Field(
        45.0,
        ge=6,
        le=300,
        description="`WEIR_KAFKA_SESSION_TIMEOUT`: seconds a worker may go silent before Kafka gives "
        "its partitions to the others. A restarted worker takes its partitions back at once "
        "(static membership, `WEIR_INSTANCE_ID`); this bounds how long the partitions of a "
        "worker that is gone for good (or scaled down) wait. Keep it above the longest broker "
        "pause to ride out (a paused broker expires the sessions it did not hear from).",
    )
    kafka_fetch_min_bytes: int = Field(
        65_536,
        ge=1,
        le=52_428_800,
        description="`WEIR_KAFKA_FETCH_MIN_BYTES`: a scoring worker's fetch from Kafka waits for "
        "this many bytes, or `WEIR_KAFKA_FETCH_MAX_WAIT_MS`. With 1, a stream of a few thousand "
        "events a second comes a few messages per fetch, and each fetch costs the worker's "
        "Python consumer more than the messages (docs/performance.md).",
    )
    kafka_fetch_max_wait_ms: int = Field(
        20,
        ge=0,
        le=60_000,
        description="`WEIR_KAFKA_FETCH_MAX_WAIT_MS`: the longest a scoring worker's fetch waits "
        "for `WEIR_KAFKA_FETCH_MIN_BYTES`: the latency it may add to an event when the stream is "
        "slow, and how often an idle worker asks (20 ms: 50 fetches a second). A live worker "
        "scores a batch per fetch, each with a fixed cost: 50 or 100 cuts its CPU by a third "
        "to a half at 500 events/s for that much more latency (bench/fetch_wait.py).",
    )
    topic_replication_factor: int | None = Field(
        None,
        ge=1,
        le=16,
        description="`WEIR_TOPIC_REPLICATION_FACTOR`: replication factor of the topics Weir creates, "
        "instead of the spec's `topics.replication_factor` (so one spec runs on one broker and on "
        "a cluster). Default: the spec's.",
    )
    topic_min_insync_replicas: int | None = Field(
        None,
        ge=1,
        le=16,
        description="`WEIR_TOPIC_MIN_INSYNC_REPLICAS`: `min.insync.replicas` of the topics Weir "
        "creates, instead of the spec's `topics.min_insync_replicas`. Default: the spec's.",
    )
    instance_id: str | None = Field(
        None,
        description="`WEIR_INSTANCE_ID`: this process's Kafka static-membership id "
        "(`group.instance.id`), stable across its restarts and unique in its consumer group. "
        "Default: host name, pipeline, role and the lowest slot number free on this host.",
    )
    metrics_port: int = Field(
        9300,
        ge=0,
        le=65535,
        description="`WEIR_METRICS_PORT`: port of this process's `/metrics` (0 = pick a free one).",
    )
    metrics_host: str = Field("127.0.0.1", description="`WEIR_METRICS_HOST`: address `/metrics` listens on.")
    model_key: SecretStr | None = Field(
        None,
        description="`WEIR_MODEL_KEY`: HMAC key that signs every model blob (versions, snapshots, "
        "checkpoints) and is checked before one is unpickled (secret). The same in every "
        "process of a pipeline. Unset: `WEIR_MODEL_KEY_FILE`, else `WEIR_DATA_DIR/model.key` "
        "(created on first use, mode 0600).",
    )
    model_key_file: str | None = Field(
        None,
        description="`WEIR_MODEL_KEY_FILE`: a file holding the model key (e.g. a mounted secret); "
        "it must exist. Instead of `WEIR_MODEL_KEY`.",
    )
    model_insecure: bool = Field(
        False,
        description="`WEIR_MODEL_INSECURE`: `1` runs without a model key: blobs are checked by "
        "sha256 only, so a writer to Redis can make Weir unpickle (run) anything. Tests only.",
    )
    model_allow: str = Field(
        "",
        description="`WEIR_MODEL_ALLOW`: extra dotted-path prefixes a spec's model steps may name, "
        "comma separated (e.g. `mypkg.models.,other.`); `river.` is always allowed and nothing "
        "else is imported from a spec.",
    )
    data_dir: str = Field(
        ".weir", description="`WEIR_DATA_DIR`: where Weir keeps local state, logs and reports."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="`WEIR_LOG_LEVEL`: log level."
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, v: str) -> str:
        for part in v.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"each bootstrap server must be host:port, got {part!r}; "
                    "e.g. WEIR_KAFKA_BOOTSTRAP=127.0.0.1:9092"
                )
        return v

    @field_validator("model_allow")
    @classmethod
    def _allow_prefixes(cls, v: str) -> str:
        for part in v.split(","):
            p = part.strip()
            if p and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\.?", p):
                raise ValueError(
                    f"each prefix must be a dotted module path like 'mypkg.models.', got {p!r}; "
                    "separate prefixes with commas"
                )
        return v

    def model_allow_prefixes(self) -> tuple[str, ...]:
        """The dotted-path prefixes a spec's model steps may name: ``river.`` first."""
        extra = [p.strip() for p in self.model_allow.split(",") if p.strip()]
        return tuple(dict.fromkeys(["river.", *extra]))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"must start with redis://, rediss:// or unix://, got {v!r}; "
                "e.g. WEIR_REDIS_URL=redis://127.0.0.1:6379/0"
            )
        return v

    @field_validator("redis_cluster")
    @classmethod
    def _redis_cluster_url(cls, v: bool, info: ValidationInfo) -> bool:
        url = str(info.data.get("redis_url") or "")
        if not v or not url:
            return v
        from weir.redact import redact_url

        if url.startswith("unix://"):
            raise ValueError(
                f"is true but WEIR_REDIS_URL {redact_url(url)!r} is a unix socket; a Redis Cluster is "
                "reached over TCP: name one node, e.g. WEIR_REDIS_URL=redis://127.0.0.1:7000"
            )
        db = _url_db(url)
        if db not in (None, 0):
            raise ValueError(
                f"is true but WEIR_REDIS_URL {redact_url(url)!r} selects database {db}; a Redis Cluster "
                "has database 0 only: drop the database from the URL (redis://host:port) or use /0"
            )
        return v

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _sasl_mechanism_set(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Unset, each client picks its own default (librdkafka GSSAPI, aiokafka PLAIN): the
        # scorer and the learner would then log in differently, or not at all.
        proto = info.data.get("kafka_security_protocol")
        if v is None and proto in ("SASL_PLAINTEXT", "SASL_SSL"):
            raise ValueError(
                f"is not set, but WEIR_KAFKA_SECURITY_PROTOCOL={proto} needs one; set it to the "
                "brokers' mechanism: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN"
            )
        return v

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _kafka_tls_on(cls, v: str | None, info: ValidationInfo) -> str | None:
        # A CA or certificate with a protocol without TLS would be ignored: traffic in clear.
        proto = info.data.get("kafka_security_protocol")
        if v and proto not in ("SSL", "SASL_SSL", None):
            raise ValueError(
                f"is set ({v!r}) but WEIR_KAFKA_SECURITY_PROTOCOL={proto} does not use TLS, so it "
                "would be ignored and the traffic sent in clear; set WEIR_KAFKA_SECURITY_PROTOCOL "
                "to SSL or SASL_SSL, or unset it"
            )
        return v

    @field_validator("redis_ssl_ca_certs")
    @classmethod
    def _redis_tls_on(cls, v: str | None, info: ValidationInfo) -> str | None:
        url = str(info.data.get("redis_url") or "")
        if v and url and not url.startswith("rediss://"):
            raise ValueError(
                f"is set ({v!r}) but WEIR_REDIS_URL does not start with rediss://, so Redis would be "
                "spoken to in clear (and redis-py fails on a CA there); use a rediss:// URL, or unset it"
            )
        return v

    # -- client configurations -------------------------------------------------

    def confluent_config(self) -> dict[str, Any]:
        """librdkafka configuration for confluent-kafka clients (secrets included)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol.lower(),
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        if self.kafka_ssl_certfile:
            conf["ssl.certificate.location"] = self.kafka_ssl_certfile
        if self.kafka_ssl_keyfile:
            conf["ssl.key.location"] = self.kafka_ssl_keyfile
        return conf

    def producer_config(self) -> dict[str, Any]:
        """:meth:`confluent_config` for a producer: ``acks=all`` (a write is acknowledged once
        the topic's ``min.insync.replicas`` have it) and idempotence (a retry writes once)."""
        return {**self.confluent_config(), "acks": "all", "enable.idempotence": True}

    def faust_broker(self) -> str:
        """The broker URL list in faust's ``kafka://host:port;host:port`` form."""
        return ";".join(f"kafka://{s.strip()}" for s in self.kafka_bootstrap.split(","))

    def faust_broker_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`faust.App` carrying the security settings."""
        import ssl

        import faust

        proto = self.kafka_security_protocol
        if proto == "PLAINTEXT":
            return {}
        ctx = None
        if proto in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(cafile=self.kafka_ssl_cafile)
            if self.kafka_ssl_certfile:
                ctx.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if proto == "SSL":
            return {"broker_credentials": faust.SSLCredentials(ctx)}
        password = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
        creds = faust.SASLCredentials(
            username=self.kafka_sasl_username or "",
            password=password,
            ssl_context=ctx,
            mechanism=self.kafka_sasl_mechanism or "PLAIN",
        )
        return {"broker_credentials": creds}

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url`` (secrets included)."""
        kw: dict[str, Any] = {
            "socket_timeout": self.redis_timeout,
            "socket_connect_timeout": self.redis_timeout,
        }
        if self.redis_password:
            kw["password"] = self.redis_password.get_secret_value()
        if self.redis_ssl_ca_certs:
            kw["ssl_ca_certs"] = self.redis_ssl_ca_certs
        return kw

    def redis(self) -> Any:
        """A synchronous Redis client (see :meth:`redis_async` for its retries); a
        ``redis.cluster.RedisCluster`` when ``WEIR_REDIS_CLUSTER`` is true."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # Stale pooled connection (server restarted): reconnect once. A timeout is not
        # retried here: redis-py's default (10 retries) would hide a hung server for
        # 10 x WEIR_REDIS_TIMEOUT; Weir's own retries (weir.resilience) handle it and show it.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        if self.redis_cluster:
            from redis.cluster import RedisCluster

            # The cluster client retries (refreshing its slot map) on its own Retry; the
            # same one reconnect, so a failover reaches Weir's retries as an error.
            return RedisCluster.from_url(self.redis_url, retry=retry, **self.redis_kwargs())
        return redis.Redis.from_url(self.redis_url, retry=retry, **self.redis_kwargs())

    def redis_async(self) -> Any:
        """An asyncio Redis client; a hung server raises ``TimeoutError`` after ``redis_timeout``.
        A ``redis.asyncio.cluster.RedisCluster`` when ``WEIR_REDIS_CLUSTER`` is true.

        redis-py's own retries are cut to one reconnect on a ``ConnectionError``, so a failure
        reaches the caller's :func:`weir.resilience.retry_async` (and ``weir_dependency_up``)
        within ``redis_timeout`` seconds instead of about ten times that. Its connections
        pack commands with hiredis, as the blocking client's do (:mod:`weir.redis_packing`).
        """
        import redis
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from weir.redis_packing import use_hiredis_packing

        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        if self.redis_cluster:
            from redis.asyncio.cluster import RedisCluster

            return use_hiredis_packing(
                RedisCluster.from_url(self.redis_url, retry=retry, **self.redis_kwargs())
            )
        return use_hiredis_packing(
            aioredis.Redis.from_url(self.redis_url, retry=retry, **self.redis_kwargs())
        )

    def safe_dump(self) -> dict[str, Any]:
        """Settings for display: secrets masked, and the password of any URL (``WEIR_REDIS_URL``)."""
        from weir.redact import redact_url

        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if isinstance(v, SecretStr):
                v = "**********"
            elif isinstance(v, str) and "://" in v:
                v = redact_url(v)
            out[name] = v
        return out


def _url_db(url: str) -> int | str | None:
    """The database a Redis URL selects (its path, else ``?db=``), None if it names none.

    Examples:
        >>> _url_db("redis://127.0.0.1:7000"), _url_db("redis://h:1/0"), _url_db("redis://h:1?db=2")
        (None, 0, 2)
    """
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    raw = parts.path.strip("/") or (parse_qs(parts.query).get("db") or [""])[0]
    if not raw:
        return None
    return int(raw) if raw.isdigit() else raw


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, turning pydantic's errors into a :class:`ConfigError`."""
    import difflib
    import os

    known = {f"WEIR_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in os.environ if k.startswith("WEIR_") and k not in known)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise ConfigError(
            "unknown Weir setting(s): "
            + ", ".join(hints)
            + "; unset them or see `weir config` for the known ones"
        )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            env = f"WEIR_{field.upper()}"
            lines.append(f"{env}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid Weir settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def settings_markdown() -> str:
    """The configuration reference as a markdown table (kept in the README)."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for info in Settings.model_fields.values():
        desc = info.description or ""
        env, _, text = desc.partition(": ")
        default = info.default
        rows.append(f"| {env} | `{default!r}` | {text} |")
    return "\n".join(rows)
