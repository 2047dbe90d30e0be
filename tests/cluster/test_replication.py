"""Weir's topics on a 3-broker cluster are replicated: RF 3, min.insync.replicas 2, acks=all.

Checked through Kafka's admin API (describe the topics and their configs), for the two ways
to ask: the spec's ``topics`` section, and settings alone over a spec that says nothing
(``WEIR_TOPIC_REPLICATION_FACTOR`` / ``WEIR_TOPIC_MIN_INSYNC_REPLICAS``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import ConfigResource

from streams import admin
from weir.settings import Settings, load_settings
from weir.spec import PipelineSpec, parse_spec

REPO = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())


def demo_spec(name: str, **topics: int) -> PipelineSpec:
    raw = copy.deepcopy(DEMO)
    raw["name"] = name
    raw.setdefault("topics", {}).update(partitions=6, **topics)
    return parse_spec(raw)


@pytest.fixture
def created(cluster_settings: Settings) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    admin.delete_topics(cluster_settings, names)


def replication_of(settings: Settings, names: list[str]) -> dict[str, tuple[set[int], str]]:
    """Topic -> ({replica count of each partition}, its min.insync.replicas)."""
    client = admin.admin_client(settings)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    # Each broker's metadata cache follows the controller's log a moment later: the broker
    # asked may not know a topic just created through another one (missing from its metadata,
    # UNKNOWN_TOPIC_OR_PART from describe_configs). Ask again for up to 15 s.
    deadline = time.monotonic() + 15
    while True:
        try:
            md = client.list_topics(timeout=10)
            configs = {r.name: f.result(timeout=10) for r, f in client.describe_configs(resources).items()}
            return {
                n: (
                    {len(p.replicas) for p in md.topics[n].partitions.values()},
                    configs[n]["min.insync.replicas"].value,
                )
                for n in names
            }
        except (KafkaException, KeyError) as exc:
            err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            unknown = not isinstance(exc, KafkaException) or (
                isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            )
            if not unknown or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_spec_asks_for_rf3_and_min_insync_2(
    cluster_settings: Settings, unique: str, created: list[str]
) -> None:
    spec = demo_spec(f"cl{unique}", replication_factor=3, min_insync_replicas=2)
    names = list(spec.topics.names().values())
    created += names
    assert admin.ensure_topics(cluster_settings, spec) == dict.fromkeys(names, "created")
    got = replication_of(cluster_settings, names)
    assert got == dict.fromkeys(names, ({3}, "2"))
    # Another client may ask another broker, whose metadata can lag the creation for a
    # moment (a CI run saw no partitions yet): ask until it has them, within 30 s.
    client, deadline = admin.admin_client(cluster_settings), time.monotonic() + 30
    while True:
        partitions = client.list_topics(spec.topics.events, timeout=10).topics[spec.topics.events].partitions
        if len(partitions) == 6 and all(p.leader >= 0 for p in partitions.values()):
            break
        assert time.monotonic() < deadline, f"{spec.topics.events}: {len(partitions)} partitions after 30 s"
        time.sleep(0.2)
    # Leaders spread over the three brokers, not all on one.
    assert {p.leader for p in partitions.values()} == {1, 2, 3}


def test_settings_alone_make_a_single_broker_spec_replicated(unique: str, created: list[str]) -> None:
    spec = demo_spec(f"cl{unique}")  # the spec says nothing: replication factor 1
    assert spec.topics.replication_factor == 1 and spec.topics.min_insync_replicas is None
    settings = load_settings(
        kafka_bootstrap=",".join(f"127.0.0.1:{p}" for p in (19092, 19093, 19094)),
        topic_replication_factor=3,
        topic_min_insync_replicas=2,
    )
    names = list(spec.topics.names().values())
    created += names
    admin.ensure_topics(settings, spec)
    assert replication_of(settings, names) == dict.fromkeys(names, ({3}, "2"))


def test_acks_all_write_is_acknowledged_by_the_insync_replicas(
    cluster_settings: Settings, unique: str, created: list[str]
) -> None:
    topic = f"weir.{unique}.acks"
    created.append(topic)
    admin.ensure_topics(cluster_settings, [topic], 1, 3, min_insync_replicas=2)
    producer = Producer(cluster_settings.producer_config())
    results: list[object] = []
    for i in range(20):
        producer.produce(
            topic, str(i).encode(), on_delivery=lambda err, msg: results.append(err or msg.offset())
        )
    assert producer.flush(30) == 0
    assert results == list(range(20))
    md = admin.admin_client(cluster_settings).list_topics(topic, timeout=10)
    (part,) = md.topics[topic].partitions.values()
    assert sorted(part.isrs) == [1, 2, 3], "all three replicas in sync after acks=all writes"
