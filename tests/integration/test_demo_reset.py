"""``weir demo`` starts from nothing: the pipeline's topics and Redis keys are deleted first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from streams.demo import reset_pipeline
from weir.settings import Settings
from weir.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


def test_reset_pipeline_deletes_its_topics_and_keys_only(
    settings: Settings, make_topics: Any, redis_client: Any, unique: str
) -> None:
    spec = make_topics.for_spec(load_spec(REPO / "examples/demo.yaml"), partitions=1)
    other = f"weir:{unique}-other:registry:alias:champion"
    redis_client.set(f"{spec.redis_prefix}:registry:alias:champion", b"v2")
    redis_client.set(other, b"v1")
    try:
        reset_pipeline(spec, settings)
        topics = AdminClient(settings.confluent_config()).list_topics(timeout=10).topics
        assert not set(spec.topics.names().values()) & set(topics)
        assert not list(redis_client.scan_iter(match=f"{spec.redis_prefix}:*"))
        assert redis_client.get(other) == b"v1"  # another pipeline's state is left alone
    finally:
        redis_client.delete(other)
