"""``check_redis`` refuses ``redis.buckets`` > 1 on a Redis older than 7.0 (its scripts carry
``#!lua flags=allow-cross-slot-keys``), on the real Redis.

No Redis older than 7.0 is installed here (the shared one and the only ``redis-server`` are
7.0.15), so the refusal is tested through a small TCP relay in front of the shared Redis that
rewrites the major of ``redis_version`` in the replies (``7.0.15`` reads ``6.0.15``, same
length, so the reply's length prefix still holds); every other byte is the real server's.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

from streams.admin import check_redis
from weir.errors import StackError
from weir.settings import Settings
from weir.spec import PipelineSpec, parse_spec


def _spec(buckets: int) -> PipelineSpec:
    return parse_spec(
        {
            "name": "version-check",
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}],
            "model": {"steps": ["river.linear_model.LogisticRegression"]},
            "redis": {"buckets": buckets},
        }
    )


class OlderRedis:
    """A relay on a free port to ``host:port`` that reports ``redis_version`` 6.x."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rewrite: bool) -> None:
        try:
            while data := src.recv(65536):
                if rewrite:
                    data = re.sub(rb"redis_version:\d", b"redis_version:6", data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        for s in self.conns:
            s.close()


@pytest.fixture
def older(settings: Settings) -> Iterator[Settings]:
    url = urlparse(settings.redis_url)
    relay = OlderRedis(url.hostname or "127.0.0.1", url.port or 6379)
    try:
        yield settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{relay.port}/0"})
    finally:
        relay.close()


def test_buckets_pass_on_redis_7(settings: Settings, redis_client: Any) -> None:
    version = redis_client.info("server")["redis_version"]
    assert int(version.split(".")[0]) >= 7, version
    check_redis(settings, timeout=5, spec=_spec(16))
    check_redis(settings, timeout=5, spec=_spec(1))


def test_buckets_refused_on_redis_6_naming_the_field_version_and_fix(older: Settings) -> None:
    check_redis(older, timeout=5)  # no spec: reachable, nothing to refuse
    check_redis(older, timeout=5, spec=_spec(1))  # one bucket: no script flags needed
    with pytest.raises(StackError) as info:
        check_redis(older, timeout=5, spec=_spec(4))
    text = str(info.value)
    assert "redis.buckets is 4" in text, text
    assert re.search(r"found Redis 6\.\d+\.\d+ at redis://127\.0\.0\.1:\d+/0", text), text
    assert "upgrade Redis to 7.0" in text and "`redis.buckets: 1`" in text, text
