"""A producer that acknowledges nothing is replaced, and its records land (streams/delivery.py).

The stuck producer here is pointed at a port where no broker listens (it can never deliver),
as the learner's idempotent producer once stayed stuck after a Kafka restart in CI; the
new producer is a real one on the stack's broker, and the records are read back from it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from streams.delivery import Delivery
from weir.settings import Settings

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket is: nobody listens


def stuck_producer(settings: Settings) -> Any:
    """A producer pointed at a port where no broker listens: it never acknowledges anything."""
    conf = {**settings.producer_config(), "bootstrap.servers": f"127.0.0.1:{_closed_port()}"}
    return Producer({**conf, "log_level": 0, "error_cb": lambda _err: None})


def test_a_producer_acknowledging_nothing_is_replaced_and_its_records_land(
    settings: Settings, make_topics: Any, consume_all: Any
) -> None:
    (topic,) = make_topics("renew")
    delivery = Delivery(
        stuck_producer(settings), make=lambda: Producer(settings.producer_config()), renew_after=1.0
    )
    records = [(topic, orjson.dumps({"event_id": f"e{i}"}), f"e{i}".encode()) for i in range(50)]
    delivery.add(records)
    delivery.send()
    left, _ = delivery.wait(0.5)
    assert left == 50 and delivery.renewals == 0  # stuck, not yet for renew_after
    time.sleep(0.6)
    left, _ = delivery.wait(0.5)  # 1.1 s of waits acknowledging nothing: replaced
    assert delivery.renewals == 1
    assert sorted(delivery.pending) == sorted(records), "the purged records are pending again"
    delivery.send()
    assert delivery.wait(30) == (0, [])
    got = sorted(orjson.loads(m.value())["event_id"] for m in consume_all(topic, 50, timeout=30))
    assert got == sorted(f"e{i}" for i in range(50))


def test_without_a_way_to_make_one_the_producer_is_kept(settings: Settings) -> None:
    stuck = stuck_producer(settings)
    delivery = Delivery(stuck, renew_after=0.0)
    delivery.add([("weir-renew-none", b"{}", None)])
    delivery.send()
    for _ in range(2):
        left, _ = delivery.wait(0.3)
        assert left == 1
    assert delivery.producer is stuck and delivery.renewals == 0
    stuck.purge()
