"""redis-py's asyncio connections pack commands with hiredis, as its blocking ones do.

redis-py 8.1's blocking connections pack a command with hiredis's C packer when hiredis is
installed; its asyncio connections always pack in Python (``AbstractConnection.pack_command``:
one ``bytes.join`` and one ``str(len)`` per argument). Role ``all``'s label join is one
command of about 2,000 arguments per 500 labels on the asyncio client: it took 3.66 ms to
pack in Python and 0.82 ms with hiredis on this project's machine, about 1% of role
``all``'s CPU per event; the scorer's own commands have few arguments per event and moved
within the noise (issue #12, docs/performance.md).

:func:`use_hiredis_packing` gives an asyncio client's connections (standalone or cluster,
TCP, TLS or Unix socket) the packer of the blocking client: the same bytes on the wire
(``str`` as UTF-8, ``int`` and ``float`` as their ``repr``), and ``DataError`` for an
argument of another type, as the Python packer raises.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def hiredis_packing(cls: type) -> type:
    """``cls`` (an asyncio connection class) packing commands with hiredis.

    Examples:
        >>> from redis.asyncio.connection import Connection
        >>> conn = hiredis_packing(Connection)()
        >>> conn.pack_command("EVALSHA", "ab", 1, "k", 0.5, b"\\x00")
        [b'*6\\r\\n$7\\r\\nEVALSHA\\r\\n$2\\r\\nab\\r\\n$1\\r\\n1\\r\\n$1\\r\\nk\\r\\n$3\\r\\n0.5\\r\\n$1\\r\\n\\x00\\r\\n']
        >>> conn.pack_command("SET", "k", None)
        Traceback (most recent call last):
        redis.exceptions.DataError: A tuple item must be str, int, float or bytes.
        >>> hiredis_packing(Connection) is hiredis_packing(Connection)
        True
    """
    from redis.connection import HiredisRespSerializer

    serializer = HiredisRespSerializer()

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        return serializer.pack(*args)

    return type(f"Hiredis{cls.__name__}", (cls,), {"pack_command": pack_command, "__module__": __name__})


def use_hiredis_packing(client: Any) -> Any:
    """``client`` (``redis.asyncio.Redis`` or ``RedisCluster``, no connection made yet) with
    its connections packing commands with hiredis; unchanged without hiredis."""
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return client
    pool = getattr(client, "connection_pool", None)
    if pool is not None:  # standalone: the pool makes every connection
        pool.connection_class = hiredis_packing(pool.connection_class)
        return client
    # cluster: each node makes its own connections, from the client's connection kwargs
    kwargs = client.nodes_manager.connection_kwargs
    kwargs["connection_class"] = hiredis_packing(kwargs["connection_class"])
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = hiredis_packing(node.connection_class)
    return client
