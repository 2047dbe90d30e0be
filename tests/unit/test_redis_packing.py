"""The asyncio client packs with hiredis (weir.redis_packing): the same bytes on the wire
as redis-py's Python packer, for every type of argument Weir sends, and the same refusal
of the types it does not."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from weir.redis_packing import hiredis_packing, use_hiredis_packing
from weir.settings import load_settings


def _wire(conn: Connection, *args: Any) -> bytes:
    return b"".join(bytes(chunk) for chunk in conn.pack_command(*args))


def _random_arg(rng: random.Random) -> object:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randint(-(2**62), 2**62)
    if kind == 1:
        return rng.choice([0.1, -0.0, 1e-300, 1e300, math.inf, -math.inf, math.nan, rng.uniform(-1e6, 1e6)])
    if kind == 2:
        return "".join(rng.choice("aZ9:{}#é€😀 \t") for _ in range(rng.randrange(0, 20)))
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
    if kind == 4:
        return memoryview(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10))))
    return bytearray(b"x" * rng.randrange(0, 10))


def test_the_same_bytes_on_the_wire_as_the_python_packer() -> None:
    rng = random.Random(12)
    python, hiredis = Connection(), hiredis_packing(Connection)()
    for _ in range(500):
        args = ["EVALSHA", "f" * 40, *(_random_arg(rng) for _ in range(rng.randrange(0, 30)))]
        assert _wire(hiredis, *args) == _wire(python, *args), args
    big = ["EVALSHA", "f" * 40, *range(2000), "x" * 100_000]  # chunked by the Python packer
    assert _wire(hiredis, *big) == _wire(python, *big)
    assert _wire(hiredis, "CLIENT SETNAME", "w") == _wire(python, "CLIENT SETNAME", "w")


@pytest.mark.parametrize("bad", [None, True, object(), [1]])
def test_an_argument_of_another_type_is_refused_as_the_python_packer_does(bad: Any) -> None:
    for conn in (Connection(), hiredis_packing(Connection)()):
        with pytest.raises(DataError):
            conn.pack_command("SET", "k", bad)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:6379/0", Connection),
        ("rediss://127.0.0.1:6380/0", SSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_settings_give_the_asyncio_client_hiredis_packing_for_every_scheme(url: str, base: type) -> None:
    client = load_settings(redis_url=url).redis_async()
    cls = client.connection_pool.connection_class
    assert issubclass(cls, base) and cls is hiredis_packing(base)
    plain = use_hiredis_packing(aioredis.Redis())
    assert plain.connection_pool.connection_class is hiredis_packing(Connection)
