"""kill -9 of one broker mid-stream loses no acknowledged record (RF 3, min ISR 2, acks=all).

A producer built from ``Settings.producer_config()`` writes a numbered stream to a topic
Weir created (3 partitions, one led by each broker); the leader of partition 0 is killed
with SIGKILL midway. Every record the producer saw acknowledged is then read back, once.
The broker is restarted (``cluster.py up``) before the test ends, for the tests after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from streams import admin
from tests.cluster.conftest import kill_broker, read_all, restart_kafka
from weir.settings import Settings

N = 3000
RATE = 300.0  # records/s: the kill lands mid-stream


@pytest.fixture
def topic(cluster_settings: Settings, unique: str) -> Iterator[str]:
    name = f"weir.{unique}.loss"
    admin.ensure_topics(cluster_settings, [name], 3, 3, min_insync_replicas=2)
    yield name
    admin.delete_topics(cluster_settings, [name])


def _leader(settings: Settings, topic: str, partition: int) -> int:
    """The partition's leader, asked again while the broker answering has not heard of the
    new topic yet (each broker's metadata follows the controller a moment later)."""
    client = admin.admin_client(settings)
    deadline = time.monotonic() + 15
    while True:
        md = client.list_topics(topic, timeout=10).topics.get(topic)
        if md is not None and md.error is None and partition in md.partitions:
            leader = md.partitions[partition].leader
            if leader >= 0:
                return int(leader)
        assert time.monotonic() < deadline, f"{topic}[{partition}] has no leader in the metadata after 15 s"
        time.sleep(0.2)


def test_kill_a_broker_mid_stream_loses_no_acknowledged_record(
    cluster_settings: Settings, topic: str
) -> None:
    victim = _leader(cluster_settings, topic, 0)
    producer = Producer({**cluster_settings.producer_config(), "linger.ms": 5, "message.timeout.ms": 120_000})
    acked: list[int] = []
    failed: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            acked.append(int(msg.value()))  # type: ignore[attr-defined]

    killed = threading.Event()
    try:
        t0 = time.monotonic()
        for i in range(N):
            if i == N // 2:
                kill_broker(victim)
                killed.set()
            delay = t0 + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.produce(topic, str(i).encode(), key=str(i % 97).encode(), on_delivery=on_delivery)
            producer.poll(0)
        left = producer.flush(120)
        assert left == 0, f"{left} records still unacknowledged 120 s after the last write"
        assert failed == [], f"writes failed with a broker down (min ISR 2 of 3 should hold): {failed[:3]}"
        assert killed.is_set()
        assert sorted(acked) == list(range(N)), "every record acknowledged, once"

        got = [int(v or b"-1") for v in read_all(cluster_settings, topic, N, timeout=90)]
        assert len(got) == N and sorted(got) == list(range(N)), (
            f"read back {len(got)} records, {len(set(got))} distinct, of {N} acknowledged"
        )
    finally:
        restart_kafka()
