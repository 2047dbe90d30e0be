"""Settings for encrypted, authenticated transports reach every client (no servers needed).

The same variables are used against real servers in
tests/integration/test_secure_transport.py (Kafka SASL_SSL + SCRAM, Redis TLS + ACL user).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from faust.types.auth import AuthProtocol, SASLMechanism
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.connection import SSLConnection

from weir.errors import ConfigError
from weir.settings import load_settings


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A self-signed CA certificate (what ``ssl.create_default_context(cafile=)`` loads)."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed: `sudo apt-get install -y openssl`"
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca"),
            *("-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem")),
        ],
        check=True,
        capture_output=True,
    )
    return str(d / "ca.pem")


@pytest.fixture
def secure_env(ca: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "WEIR_KAFKA_BOOTSTRAP": "127.0.0.1:19095",
        "WEIR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "WEIR_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "WEIR_KAFKA_SASL_USERNAME": "weir",
        "WEIR_KAFKA_SASL_PASSWORD": "kafka-pw-7Tq",
        "WEIR_KAFKA_SSL_CAFILE": ca,
        "WEIR_REDIS_URL": "rediss://weir@127.0.0.1:16380/0",
        "WEIR_REDIS_PASSWORD": "redis-pw-4Zx",
        "WEIR_REDIS_SSL_CA_CERTS": ca,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_confluent_config_carries_sasl_ssl_scram_and_ca(secure_env: dict[str, str]) -> None:
    conf = load_settings().confluent_config()
    assert conf == {
        "bootstrap.servers": "127.0.0.1:19095",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "weir",
        "sasl.password": "kafka-pw-7Tq",
        "ssl.ca.location": secure_env["WEIR_KAFKA_SSL_CAFILE"],
    }


def test_faust_gets_scram_credentials_with_a_verifying_tls_context(secure_env: dict[str, str]) -> None:
    creds = load_settings().faust_broker_options()["broker_credentials"]
    assert creds.protocol is AuthProtocol.SASL_SSL and creds.mechanism is SASLMechanism.SCRAM_SHA_512
    assert (creds.username, creds.password) == ("weir", "kafka-pw-7Tq")
    ctx = creds.ssl_context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c["subject"] == ((("commonName", "test-ca"),),) for c in ctx.get_ca_certs())
    assert "kafka-pw-7Tq" not in repr(creds)


@pytest.mark.parametrize("client", ["redis", "redis_async"])
def test_redis_clients_speak_tls_with_the_ca_and_the_acl_user(
    secure_env: dict[str, str], client: str
) -> None:
    r = getattr(load_settings(), client)()
    pool = r.connection_pool
    kw = pool.connection_kwargs
    assert pool.connection_class.__name__ in ("SSLConnection", "HiredisSSLConnection")
    assert issubclass(pool.connection_class, (SSLConnection, AsyncSSLConnection))
    assert (kw["username"], kw["password"]) == ("weir", "redis-pw-4Zx")
    assert kw["ssl_ca_certs"] == secure_env["WEIR_REDIS_SSL_CA_CERTS"]
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 16380)


def test_secrets_are_masked_in_the_dump(secure_env: dict[str, str]) -> None:
    dump = str(load_settings().safe_dump())
    assert "kafka-pw-7Tq" not in dump and "redis-pw-4Zx" not in dump


def test_a_ca_without_tls_is_refused(ca: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEIR_KAFKA_SSL_CAFILE", ca)
    with pytest.raises(ConfigError, match=r"WEIR_KAFKA_SSL_CAFILE: .*PROTOCOL=PLAINTEXT does not use TLS"):
        load_settings()
    monkeypatch.setenv("WEIR_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match=r"WEIR_KAFKA_SSL_CAFILE: .*SASL_PLAINTEXT does not use TLS"):
        load_settings()
    monkeypatch.setenv("WEIR_KAFKA_SECURITY_PROTOCOL", "SSL")
    assert load_settings().confluent_config()["ssl.ca.location"] == ca

    monkeypatch.setenv("WEIR_REDIS_SSL_CA_CERTS", ca)
    monkeypatch.setenv("WEIR_REDIS_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match=r"WEIR_REDIS_SSL_CA_CERTS: .*does not start with rediss://"):
        load_settings()


def test_a_sasl_protocol_without_a_mechanism_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each client would pick its own default (librdkafka GSSAPI, aiokafka PLAIN).
    for proto in ("SASL_SSL", "SASL_PLAINTEXT"):
        monkeypatch.setenv("WEIR_KAFKA_SECURITY_PROTOCOL", proto)
        needs = rf"WEIR_KAFKA_SASL_MECHANISM: .*{proto} needs one.*SCRAM-SHA-512"
        with pytest.raises(ConfigError, match=needs):
            load_settings()
    monkeypatch.setenv("WEIR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    assert load_settings().confluent_config()["sasl.mechanism"] == "SCRAM-SHA-256"
    monkeypatch.setenv("WEIR_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    monkeypatch.delenv("WEIR_KAFKA_SASL_MECHANISM")
    assert "sasl.mechanism" not in load_settings().confluent_config()
