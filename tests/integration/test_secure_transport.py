"""Weir through encrypted, authenticated transports: Kafka SASL_SSL (SCRAM-SHA-512) and Redis TLS.

``deploy/local/secure.py`` starts a broker whose only client listener is SASL_SSL and a
Redis with a TLS port only and an ACL user (the ``default`` user off), both with a CA it
makes, on free ports of their own (not the shared stack). Then ``weir produce`` (events and
labels), a ``weir worker --role scorer`` (Faust/aiokafka, confluent-kafka, asyncio Redis)
and a ``weir worker --role learner`` (confluent-kafka, sync Redis) run with nothing but the
``WEIR_*`` variables the stack prints: every event gets a prediction and every label is
learned. And the servers refuse what they should: plaintext, an unknown CA, a wrong
password, no login, a key outside ``weir:*``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from models.registry import ModelRegistry
from streams import admin
from tests.integration.conftest import TopicFactory, wait_for
from tests.integration.processes import REPO, Worker
from tests.local_scripts import deploy_script
from weir.errors import StackError
from weir.settings import Settings, load_settings
from weir.spec import load_spec

# ~35 s alone, most of it the broker's start: `-m 'not secure'` leaves it out.
pytestmark = pytest.mark.secure

N_EVENTS = 300


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The secure stack, started for this module; a failure to start fails the tests."""
    with deploy_script("secure").secure_stack(tmp_path_factory.mktemp("secure")) as st:
        yield st


def _settings(env: dict[str, str]) -> Settings:
    return load_settings(**{k.removeprefix("WEIR_").lower(): v for k, v in env.items()})


def _kafka_refused(conf: dict[str, Any], codes: set[int], timeout: float = 20.0) -> list[KafkaError]:
    """Connect a librdkafka client with ``conf``; wait for an error with one of ``codes`` and
    check that no metadata request gets through. The client's errors."""
    errors: list[KafkaError] = []
    producer = Producer({**conf, "error_cb": errors.append, "log_level": 0})
    wait_for(
        lambda: producer.poll(0.2) >= 0 and any(e.code() in codes for e in errors),
        timeout,
        f"a refusal {codes} (errors so far: {errors})",
        interval=0,
    )
    with pytest.raises(KafkaException):
        producer.list_topics(timeout=0.5)
    assert not any("Connection refused" in e.str() for e in errors), f"nothing listens: {errors}"
    return errors


def test_servers_refuse_plaintext_untrusted_and_wrong_credentials(secure: Any) -> None:
    good = secure.kafka.client_config()
    assert AdminClient(good).list_topics(timeout=10).brokers, "the weir user over SASL_SSL is let in"
    # A plaintext client on the SASL_SSL listener is disconnected (no other listener exists).
    host, _, port = good["bootstrap.servers"].rpartition(":")
    socket.create_connection((host, int(port)), timeout=5).close()  # it listens
    _kafka_refused(
        {"bootstrap.servers": good["bootstrap.servers"]},
        {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN},
    )
    _kafka_refused({**good, "sasl.password": "wrong"}, {KafkaError._AUTHENTICATION})
    _kafka_refused({k: v for k, v in good.items() if k != "ssl.ca.location"}, {KafkaError._SSL})
    # Weir's own check names the failure and the fix, password hidden.
    wrong = _settings({**secure.env(), "WEIR_KAFKA_SASL_PASSWORD": "wrong-password"})
    with pytest.raises(StackError, match=r"refused the login .*check WEIR_KAFKA_SASL_MECHANISM") as err:
        admin.check_broker(wrong, timeout=3.0)
    assert "wrong-password" not in str(err.value)
    untrusted_ca = _settings({**secure.env(), "WEIR_KAFKA_SSL_CAFILE": secure.tls.cert.as_posix()})
    with pytest.raises(StackError, match=r"over TLS .*check WEIR_KAFKA_SSL_CAFILE"):
        admin.check_broker(untrusted_ca, timeout=3.0)

    r = secure.redis
    assert r.client().ping()
    refusals: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"ssl": False}, redis.ConnectionError, "reset|closed"),  # plaintext to the TLS port
        ({"ssl_ca_certs": None}, redis.ConnectionError, "CERTIFICATE_VERIFY_FAILED"),  # unknown CA
        ({"password": "wrong"}, redis.AuthenticationError, "invalid username-password"),
        ({"username": None, "password": None}, redis.AuthenticationError, "authenticated"),  # default off
    ]
    for overrides, error, match in refusals:
        client = r.client(timeout=3.0, **overrides)
        with pytest.raises(error, match=match):
            client.ping()
        client.close()
    client = r.client()
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("not-weir:key", 1)
    client.close()


def _consume_ids(settings: Settings, topic: str, n: int, timeout: float) -> list[str]:
    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"secure-check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        ids: list[str] = []

        def more() -> bool:
            for msg in consumer.consume(500, timeout=0.5):
                assert msg.error() is None, msg.error()
                ids.append(orjson.loads(msg.value() or b"{}")["event_id"])
            return len(ids) >= n

        wait_for(more, timeout, f"{n} predictions on {topic}", interval=0)
        return ids
    finally:
        consumer.close()


def test_produce_score_learn_through_sasl_ssl_and_redis_tls(secure: Any, tmp_path: Path) -> None:
    env = secure.env()
    settings = _settings(env)
    base = load_spec(REPO / "examples/demo.yaml")
    base = base.model_copy(update={"learner": base.learner.model_copy(update={"snapshot_every_labels": 100})})
    topics = TopicFactory(settings, f"s{uuid.uuid4().hex[:8]}")
    spec = topics.for_spec(base, partitions=1)  # created through SASL_SSL
    # Nothing of the shared stack reaches the processes: only the secure stack's variables.
    penv: dict[str, str | None] = {
        k: None for k in os.environ if k.startswith("WEIR_") and k != "WEIR_MODEL_KEY"
    }
    penv.update(env)
    learner = Worker(spec, tmp_path / "learner", role="learner", env=penv)
    scorer = Worker(spec, tmp_path / "scorer", role="scorer", env=penv)
    redis_client = settings.redis()
    try:
        registry = ModelRegistry(redis_client, spec)
        wait_for(lambda: registry.alias("champion"), 60, f"the learner's champion\n{learner.tail()}")
        res = subprocess.run(
            [
                *(
                    sys.executable,
                    "-m",
                    "weir.cli",
                    "produce",
                    str(scorer.spec_path),
                    "river:synth.Agrawal?seed=3",
                ),
                *("--limit", str(N_EVENTS), "--label-delay", "0.5", "--entities", "50", "--no-progress"),
            ],
            env={
                **{k: v for k, v in os.environ.items() if k not in penv},
                **env,
                "WEIR_DATA_DIR": str(tmp_path),
            },
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        summary = orjson.loads(res.stdout.strip().splitlines()[-1])
        assert summary["events"] == N_EVENTS and summary["labels"] == N_EVENTS, summary

        ids = _consume_ids(settings, spec.topics.predictions, N_EVENTS, timeout=90)
        assert len(set(ids)) == N_EVENTS, "every event predicted"

        def learned() -> int:
            raw = redis_client.get(f"{spec.redis_prefix}:status")
            return int(orjson.loads(raw)["labels_learned"]) if raw else -1

        wait_for(lambda: learned() == N_EVENTS, 90, f"{N_EVENTS} labels learned (got {learned()})")
        assert scorer.alive(), scorer.tail()
        assert learner.alive(), learner.tail()
        for secret in (env["WEIR_KAFKA_SASL_PASSWORD"], env["WEIR_REDIS_PASSWORD"]):
            for log in (scorer.log_path, learner.log_path):
                assert secret not in log.read_text(errors="replace"), f"a password in {log}"
            assert secret not in res.stdout + res.stderr
    finally:
        scorer.stop()
        learner.stop()
        redis_client.close()
        topics.cleanup()
