"""The local stack's Redis is durable: append-only file, fsync every second.

The registry, the scorers' snapshots and the monitor's checkpoint live in Redis, so the
local stack runs it with ``appendonly yes`` / ``appendfsync everysec`` (production
settings: docs/production.md). Tested on a private redis-server started with the exact
configuration ``deploy/local/stack.py`` writes; the shared one is never restarted.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.private_redis import PrivateRedis, stack_module


def test_stack_redis_config_is_append_only_everysec(tmp_path: Path) -> None:
    conf = stack_module().redis_config(6379, tmp_path, tmp_path / "redis.log", tmp_path / "redis.pid")
    assert "\nappendonly yes\n" in conf and "\nappendfsync everysec\n" in conf
    assert f"\ndir {tmp_path}\n" in conf and "\ndaemonize yes\n" in conf


def test_acknowledged_writes_survive_a_kill_9(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis")
    try:
        client = server.client()
        cfg = client.config_get("append*")
        assert cfg["appendonly"] == "yes" and cfg["appendfsync"] == "everysec"
        assert client.config_get("dir")["dir"] == str(server.dir)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.set("weir:test:registry:alias:champion", "v7")
        client.rpush("weir:test:registry:versions", "v1", "v7")
        time.sleep(1.5)  # everysec: at most a second of writes may be lost
        client.close()
        server.kill()
        assert (server.dir / "appendonlydir").is_dir()
        server.start()
        client = server.client()
        assert client.get("weir:test:registry:alias:champion") == b"v7"
        assert client.lrange("weir:test:registry:versions", 0, -1) == [b"v1", b"v7"]
        client.close()
    finally:
        server.stop()
