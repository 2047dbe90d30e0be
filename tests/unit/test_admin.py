"""streams.admin without servers: unreachable addresses fail fast with a useful StackError."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from streams import admin
from weir.errors import StackError
from weir.settings import load_settings
from weir.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_weir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("WEIR_"):
            monkeypatch.delenv(key)


def test_check_broker_unreachable_names_address_and_fix(dead_port: int) -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{dead_port}")
    t0 = time.monotonic()
    with pytest.raises(StackError, match=rf"Kafka at 127\.0\.0\.1:{dead_port} .*WEIR_KAFKA_BOOTSTRAP"):
        admin.check_broker(settings, timeout=0.5)
    assert time.monotonic() - t0 < 5, "the timeout must bound the check"


def test_check_broker_message_says_make_up(dead_port: int) -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{dead_port}")
    with pytest.raises(StackError, match=r"make up"):
        admin.check_broker(settings, timeout=0.3)


def test_check_redis_unreachable_names_url(dead_port: int) -> None:
    settings = load_settings(redis_url=f"redis://127.0.0.1:{dead_port}/0")
    with pytest.raises(StackError, match=rf"Redis at redis://127\.0\.0\.1:{dead_port}/0 .*WEIR_REDIS_URL"):
        admin.check_redis(settings, timeout=0.5)


def test_check_redis_hides_password(dead_port: int) -> None:
    settings = load_settings(redis_url=f"redis://:s3cret@127.0.0.1:{dead_port}/0")
    with pytest.raises(StackError) as info:
        admin.check_redis(settings, timeout=0.5)
    assert "s3cret" not in str(info.value)
    assert f":***@127.0.0.1:{dead_port}" in str(info.value)


def test_ensure_topics_unreachable_broker_raises(dead_port: int) -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{dead_port}")
    with pytest.raises(StackError, match=rf"127\.0\.0\.1:{dead_port}"):
        admin.ensure_topics(settings, ["weir.test.x"], 1, 1, timeout=0.5)


@pytest.mark.parametrize(("partitions", "rf", "msg"), [(0, 1, "partitions"), (1, 0, "replication_factor")])
def test_ensure_topics_rejects_bad_counts(partitions: int, rf: int, msg: str) -> None:
    with pytest.raises(StackError, match=rf"{msg} must be >= 1, got 0"):
        admin.ensure_topics(load_settings(), ["t"], partitions, rf)


def test_ensure_topics_with_no_names_needs_no_broker(dead_port: int) -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{dead_port}")
    assert admin.ensure_topics(settings, [], 1, 1) == {}


def test_ensure_topics_refuses_a_bare_string() -> None:
    with pytest.raises(StackError, match=r"wrap it in a list"):
        admin.ensure_topics(load_settings(), "weir.demo.events", 1, 1)


def test_topic_names_from_spec_mapping_and_list() -> None:
    spec = load_spec(REPO / "examples" / "demo.yaml")
    names, partitions, rf, isr = admin._topic_names(spec)
    assert names == list(spec.topics.names().values())
    assert (partitions, rf, isr) == (spec.topics.partitions, spec.topics.replication_factor, None)
    assert admin._topic_names({"events": "a", "labels": "b"}) == (["a", "b"], 1, None, None)
    assert admin._topic_names(iter(["a", "b", "a"])) == (["a", "b"], 1, None, None)


@pytest.mark.parametrize(
    ("settings_kw", "rf", "isr", "match"),
    [
        ({}, 1, 2, r"min\.insync\.replicas 2 .* factor 1"),
        (
            {"topic_replication_factor": 3, "topic_min_insync_replicas": 4},
            None,
            None,
            r"min\.insync\.replicas 4",
        ),
        (
            {"topic_min_insync_replicas": 2},
            None,
            None,
            r"replication factor 1 .*WEIR_TOPIC_REPLICATION_FACTOR",
        ),
    ],
)
def test_ensure_topics_refuses_insync_above_replication(
    dead_port: int, settings_kw: dict[str, int], rf: int | None, isr: int | None, match: str
) -> None:
    # Refused before any broker is asked (the address is dead).
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{dead_port}", **settings_kw)
    with pytest.raises(StackError, match=match):
        admin.ensure_topics(settings, ["weir.test.x"], 1, rf, min_insync_replicas=isr, timeout=0.5)


def test_spec_refuses_insync_above_replication() -> None:
    import yaml

    from weir.errors import SpecError
    from weir.spec import parse_spec

    raw = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    raw.setdefault("topics", {}).update(replication_factor=3, min_insync_replicas=2)
    assert parse_spec(raw).topics.min_insync_replicas == 2
    raw["topics"].update(replication_factor=1)
    with pytest.raises(
        SpecError, match=r"topics\.min_insync_replicas is 2, more than topics\.replication_factor 1"
    ):
        parse_spec(raw)


def test_producer_config_waits_for_all_insync_replicas() -> None:
    conf = load_settings(kafka_bootstrap="b1:9092,b2:9092").producer_config()
    assert conf["acks"] == "all"
    assert conf["enable.idempotence"] is True
    assert conf["bootstrap.servers"] == "b1:9092,b2:9092"


def test_delete_topics_with_no_names_needs_no_broker(dead_port: int) -> None:
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{dead_port}")
    assert admin.delete_topics(settings, []) == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw@h/1", "rediss://user:***@h/1"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert admin.redact_url(url) == shown


def test_every_producer_is_built_from_producer_config() -> None:
    """A new confluent-kafka Producer in Weir's code must take ``settings.producer_config()``
    (acks=all): a plain ``confluent_config()`` would not say so and could drift."""
    import re

    calls = []
    for package in ("weir", "streams", "models", "features"):
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            for m in re.finditer(r"Producer\(", text):
                # The producer's configuration: up to 400 characters before and after the call.
                around = text[max(0, m.start() - 400) : m.end() + 400]
                calls.append((path.relative_to(REPO), "producer_config()" in around))
    assert len(calls) >= 4, f"expected the worker's, learner's, monitor's and produce's producers: {calls}"
    assert [str(p) for p, ok in calls if not ok] == []
