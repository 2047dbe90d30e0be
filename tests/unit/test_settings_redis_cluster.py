"""WEIR_REDIS_CLUSTER: a flag beside WEIR_REDIS_URL (one node's URL), refused where a Redis
Cluster cannot be (a unix socket, a database other than 0), with the fix in the message."""

from __future__ import annotations

import socket

import pytest

from streams import admin
from weir.errors import ConfigError, StackError
from weir.settings import load_settings, settings_markdown


def test_off_by_default_and_documented() -> None:
    assert load_settings().redis_cluster is False
    assert "`WEIR_REDIS_CLUSTER`" in settings_markdown()


@pytest.mark.parametrize("url", ["redis://10.0.0.1:7000", "redis://10.0.0.1:7000/0", "rediss://u:p@h:7000"])
def test_a_node_url_with_database_0_or_none_is_accepted(url: str) -> None:
    assert load_settings(redis_url=url, redis_cluster=True).redis_cluster is True


@pytest.mark.parametrize("url", ["redis://:s3cret@10.0.0.1:7000/2", "redis://10.0.0.1:7000?db=2"])
def test_a_database_other_than_0_is_refused_naming_the_fix(url: str) -> None:
    fix = r"WEIR_REDIS_CLUSTER: .*selects database 2.*drop the database"
    with pytest.raises(ConfigError, match=fix) as exc:
        load_settings(redis_url=url, redis_cluster=True)
    assert "s3cret" not in str(exc.value)
    # Without the flag, database 2 of a single Redis is fine.
    assert load_settings(redis_url=url).redis_url == url


def test_a_unix_socket_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"WEIR_REDIS_CLUSTER: .*unix socket.*redis://"):
        load_settings(redis_url="unix:///tmp/redis.sock", redis_cluster=True)


def test_check_redis_names_an_unreachable_cluster() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = load_settings(redis_url=f"redis://127.0.0.1:{port}", redis_cluster=True)
    with pytest.raises(StackError, match=rf"Redis Cluster at redis://127\.0\.0\.1:{port} is unreachable"):
        admin.check_redis(settings, timeout=0.5)
