"""``check_redis`` with ``redis.buckets`` > 1 on the Redis Cluster reads every master's
version (the refusal of an older one is tested through a relay on one Redis:
tests/integration/test_redis_version.py)."""

from __future__ import annotations

from typing import Any

from streams import admin
from tests.integration.test_redis_version import _spec
from weir.settings import Settings


def test_buckets_pass_on_a_cluster_of_redis_7(redis_cluster_settings: Settings, redis_client: Any) -> None:
    masters = redis_client.get_primaries()
    versions = admin._redis_versions(redis_client, "cluster")
    assert set(versions) == {m.name for m in masters} and len(versions) == 3
    assert all(admin.redis_version(v) >= admin.BUCKETS_MIN_REDIS for v in versions.values()), versions
    admin.check_redis(redis_cluster_settings, timeout=5, spec=_spec(16))
