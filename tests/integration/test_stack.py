"""The local stack works end to end: Kafka, Redis, Prometheus and the topic admin."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, start_http_server

from streams import admin
from weir.settings import Settings
from weir.spec import load_spec

from .conftest import ConsumeAll, Stack, TopicFactory, wait_for

REPO = Path(__file__).resolve().parents[2]


def _produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({**settings.confluent_config(), "acks": "all", "enable.idempotence": True})
    errors: list[str] = []

    def report(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err.str())

    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=report)
    assert producer.flush(10) == 0, "messages still queued after 10 s"
    assert errors == []


def test_kafka_round_trip(settings: Settings, make_topics: TopicFactory, consume_all: ConsumeAll) -> None:
    (topic,) = make_topics("roundtrip", partitions=3)
    records = [(f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(30)]
    _produce(settings, topic, records)

    got = consume_all(topic, len(records), timeout=20)
    assert sorted((m.key(), m.value()) for m in got) == sorted(records)
    # Same key, same partition: per-entity ordering holds.
    by_key: dict[bytes | None, set[int | None]] = {}
    for m in got:
        by_key.setdefault(m.key(), set()).add(m.partition())
    assert all(len(parts) == 1 for parts in by_key.values())
    assert len(consume_all(topic, len(records) + 1, timeout=1.0, allow_fewer=True)) == len(records)


def test_consumer_group_commits_offsets(settings: Settings, make_topics: TopicFactory, unique: str) -> None:
    (topic,) = make_topics("group")
    _produce(settings, topic, [(b"k", f"v{i}".encode()) for i in range(5)])
    conf = {
        **settings.confluent_config(),
        "group.id": f"{unique}-group",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    consumer = Consumer(conf)
    try:
        consumer.subscribe([topic])
        got: list[bytes | None] = []
        t0 = time.monotonic()
        while len(got) < 5 and time.monotonic() - t0 < 20:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
        assert got == [f"v{i}".encode() for i in range(5)]
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    # A new member of the same group starts after the committed offset.
    again = Consumer(conf)
    try:
        (tp,) = again.committed([TopicPartition(topic, 0)], timeout=10)
        assert tp.offset == 5
    finally:
        again.close()


def test_redis_read_write(redis_client: redis.Redis, unique: str) -> None:
    key = f"weir:test:{unique}"
    try:
        assert redis_client.set(key, b"hello", ex=60)
        assert redis_client.get(key) == b"hello"
        pipe = redis_client.pipeline()
        pipe.hset(f"{key}:h", mapping={"a": 1, "b": 2.5})
        pipe.hgetall(f"{key}:h")
        _, fields = pipe.execute()
        assert fields == {b"a": b"1", b"b": b"2.5"}
    finally:
        redis_client.delete(key, f"{key}:h")


def test_prometheus_ready_and_scraping_itself(stack: Stack) -> None:
    def self_up() -> bool:
        res = stack.query('up{job="prometheus"}')
        return bool(res) and res[0]["value"][1] == "1"

    wait_for(self_up, 20, 'up{job="prometheus"} == 1')


def test_add_scrape_target_is_scraped(stack: Stack, unique: str) -> None:
    registry = CollectorRegistry()
    Counter("weir_stack_test_events", "a counter for the stack test", registry=registry).inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    host_port = f"127.0.0.1:{server.server_port}"
    try:
        target = stack.add_scrape_target(unique, host_port, labels={"test": unique}, wait_up=True)
        assert target["health"] == "up"

        def scraped() -> bool:
            res = stack.query(f'weir_stack_test_events_total{{test="{unique}"}}')
            return bool(res) and res[0]["value"][1] == "3"

        wait_for(scraped, 20, f"weir_stack_test_events_total from {host_port}")
    finally:
        stack.remove_scrape_target(unique)
        server.shutdown()
        thread.join(5)


def test_check_broker_and_redis(settings: Settings) -> None:
    md = admin.check_broker(settings, timeout=5)
    assert md.brokers
    admin.check_redis(settings, timeout=5)


def test_ensure_topics_is_idempotent(
    settings: Settings, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    names = [f"weir.test.{unique}.a", f"weir.test.{unique}.b"]
    try:
        assert admin.ensure_topics(settings, names, 3, 1) == dict.fromkeys(names, "created")
        assert admin.ensure_topics(settings, names, 3, 1) == dict.fromkeys(names, "exists")
        md = admin.check_broker(settings)
        assert [len(md.topics[n].partitions) for n in names] == [3, 3]

        with caplog.at_level(logging.WARNING, logger="streams.admin"):
            assert admin.ensure_topics(settings, names[:1], 5, 1) == {names[0]: "exists"}
        assert "exists with 3 partitions, asked for 5" in caplog.text
        assert len(admin.check_broker(settings).topics[names[0]].partitions) == 3
    finally:
        assert sorted(admin.delete_topics(settings, names)) == sorted(names)
    assert admin.delete_topics(settings, names) == []


def test_make_topics_for_spec(settings: Settings, make_topics: TopicFactory, unique: str) -> None:
    spec = make_topics.for_spec(load_spec(REPO / "examples" / "demo.yaml"), partitions=2)
    assert unique in spec.name
    names = list(spec.topics.names().values())
    assert all(n.startswith(f"weir.{spec.name}.") for n in names)
    md = admin.check_broker(settings)
    assert all(len(md.topics[n].partitions) == 2 for n in names)
