"""The worker's own mechanics without Kafka: static-membership ids, the delivery retry loop,
and the faust behaviour the never-ack-what-was-not-done rule relies on.

The producer here is a stand-in with confluent-kafka's call shapes: what is tested is
:class:`streams.worker.KafkaOutput`'s bookkeeping (:class:`streams.delivery.Delivery`: what is
produced again, what is fatal),
not Kafka (tests/integration/test_worker_faults.py runs the real thing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from faust.types.tuples import ConsumerMessage
from prometheus_client import CollectorRegistry

from streams.delivery import Delivery, OutputRejected
from streams.scoring import BatchOutput
from streams.worker import (
    KafkaOutput,
    _ack,
    _hold,
    claim_instance_id,
    release_instance_ids,
)
from weir.errors import StackError
from weir.resilience import Backoff, DependencyHealth
from weir.settings import load_settings
from weir.spec import PipelineSpec, parse_spec
from weir.types import DeadLetter, Prediction

REPO = Path(__file__).resolve().parents[2]
FAST = Backoff(initial=0.001, maximum=0.001, jitter=0.0)


def _spec(name: str = "p") -> PipelineSpec:
    return parse_spec(
        {
            "name": name,
            "task": "binary",
            "fields": {"x": "numeric"},
            "features": [{"agg": "raw", "field": "x"}],
            "model": {"name": "m", "steps": ["river.linear_model.LogisticRegression"]},
        }
    )


# -- static membership ids -----------------------------------------------------------------


def test_instance_ids_are_unique_per_live_process_and_reused_after_it_dies(tmp_path: Path) -> None:
    settings = load_settings()
    spec = _spec()
    try:
        first = claim_instance_id(settings, spec, "scorer", lock_dir=tmp_path)
        second = claim_instance_id(settings, spec, "scorer", lock_dir=tmp_path)
        other_role = claim_instance_id(settings, spec, "all", lock_dir=tmp_path)
        assert first.endswith(".scorer.0") and second.endswith(".scorer.1")
        assert other_role.endswith(".all.0")
        assert spec.consumer_group in first
        release_instance_ids()
        assert claim_instance_id(settings, spec, "scorer", lock_dir=tmp_path) == first
    finally:
        release_instance_ids()


def test_a_killed_process_slot_is_claimed_again_by_its_successor(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from streams.worker import claim_instance_id\n"
        "from weir.settings import load_settings\n"
        "from tests.unit.test_worker import _spec\n"
        "slot = claim_instance_id(load_settings(), _spec(), 'scorer', lock_dir=Path(sys.argv[1]))\n"
        "print(slot, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, cwd=REPO, env=env, text=True
    )
    try:
        assert child.stdout is not None
        theirs = child.stdout.readline().strip()
        assert theirs.endswith(".scorer.0")
        mine = claim_instance_id(load_settings(), _spec(), "scorer", lock_dir=tmp_path)
        assert mine.endswith(".scorer.1"), "a live process's slot is never shared"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert claim_instance_id(load_settings(), _spec(), "scorer", lock_dir=tmp_path) == theirs
    finally:
        release_instance_ids()
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_weir_instance_id_overrides_the_slot(tmp_path: Path) -> None:
    settings = load_settings(instance_id="scorer-a")
    assert claim_instance_id(settings, _spec(), "scorer", lock_dir=tmp_path) == "scorer-a"
    assert list(tmp_path.iterdir()) == []


# -- never ack what was not done -------------------------------------------------------------


class RecordingConsumer:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, message: Any) -> bool:
        self.acked.append(message.offset)
        return True


class _Event:
    def __init__(self, message: ConsumerMessage) -> None:
        self.message = message


def _message(offset: int) -> ConsumerMessage:
    return ConsumerMessage("events", 0, offset, time.time(), 0, None, None, b"{}", None)


def test_a_held_batch_is_not_acked_by_the_take_events_finally() -> None:
    """What take_events' finally does to each event of the batch: ``message.ack(consumer)``."""
    consumer = RecordingConsumer()
    done = [_Event(_message(o)) for o in (0, 1)]
    failed = [_Event(_message(o)) for o in (2, 3)]
    _hold(failed)
    for e in done + failed:
        e.message.incref()
        e.message.ack(consumer)  # type: ignore[arg-type]
    assert consumer.acked == [0, 1]


class _Flow:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


class _App:
    """What take_batch reads of a faust app: the consumer, flow control, the generation."""

    def __init__(self) -> None:
        self.consumer = RecordingConsumer()
        self.consumer.tracked = []  # type: ignore[attr-defined]
        self.consumer.track_message = lambda m: self.consumer.tracked.append(m.offset)  # type: ignore[attr-defined]
        self.flow_control = _Flow()
        self.consumer_generation_id = 3


def _queued(*offsets: int, generation: int = 3) -> list[_Event]:
    out = []
    for o in offsets:
        m = _message(o)
        m.generation_id = generation
        m.incref()  # as faust's conductor does, once per channel
        out.append(_Event(m))
    return out


def test_take_batch_takes_what_is_there_then_waits_within_for_more() -> None:
    from streams.worker import take_batch

    async def run() -> tuple[list[int], list[int], float, list[int]]:
        app, queue = _App(), asyncio.Queue[_Event]()
        for e in _queued(0, 1, 2, 3, 4):
            queue.put_nowait(e)
        first = [e.message.offset for e in await take_batch(app, queue, 3, 0.05)]  # full at once
        t0 = time.monotonic()

        async def later() -> None:
            await asyncio.sleep(0.02)
            for e in _queued(5):
                queue.put_nowait(e)

        task = asyncio.ensure_future(later())
        second = await take_batch(app, queue, 10, 0.1)  # 3, 4 there; 5 within 0.1 s; then waits out
        await task
        waited = time.monotonic() - t0
        _ack(app, second)
        return first, [e.message.offset for e in second], waited, app.consumer.acked

    first, second, waited, acked = asyncio.run(run())
    assert first == [0, 1, 2] and second == [3, 4, 5]
    assert 0.09 <= waited < 1.0  # the window, from the first event of the batch
    assert acked == [3, 4, 5]  # acked once done (_ack), not when taken


def test_take_batch_tracks_its_messages_and_skips_those_of_an_earlier_assignment() -> None:
    from streams.worker import take_batch

    async def run() -> tuple[list[int], _App]:
        app, queue = _App(), asyncio.Queue[_Event]()
        for e in [*_queued(0), *_queued(1, generation=2), *_queued(2)]:
            queue.put_nowait(e)
        got = await take_batch(app, queue, 10, 0.01)
        app.flow_control.active = False  # a rebalance: what is buffered is skipped
        for e in _queued(3):
            queue.put_nowait(e)
        assert await take_batch(app, queue, 10, 0.01) == []
        return [e.message.offset for e in got], app

    got, app = asyncio.run(run())
    assert got == [0, 2]
    assert app.consumer.tracked == [0, 2]  # type: ignore[attr-defined]  # the shutdown waits for them
    assert app.consumer.acked == [1, 3]  # skipped ones are acked, as faust's stream does


class _Batches:
    """Fakes of run_batches' steps over numbered batches, logging when each starts and ends."""

    def __init__(self, n: int, *, in_order: tuple[int, ...] = (), idle_after: tuple[int, ...] = ()) -> None:
        self.left = [_queued(i) for i in range(1, n + 1)]
        self.log: list[str] = []
        self.in_order_batches = in_order
        self.idle_after = idle_after  # batches after which nothing waits to be taken
        self.fail: dict[str, int] = {}  # step -> batch that raises there
        self.finishing: asyncio.Task[Any] | None = None  # the last finish started
        self.behind_left_running = False

    @staticmethod
    def number(batch: list[_Event]) -> int:
        return batch[0].message.offset

    async def take(self) -> list[_Event]:
        batch = self.left.pop(0)
        self.log.append(f"take {self.number(batch)}")
        return batch

    def idle(self) -> bool:
        taken = sum(x.startswith("take") for x in self.log)
        return not self.left or taken in self.idle_after

    async def _step(self, what: str, n: int, seconds: float) -> None:
        self.log.append(f"{what} {n}")
        await asyncio.sleep(seconds)
        if self.fail.get(what) == n:
            raise RuntimeError(f"{what} {n} failed")
        self.log.append(f"{what} {n} done")

    async def prepare(self, batch: list[_Event]) -> Any:
        from streams.scoring import Prepared
        from streams.worker import Ahead

        n = self.number(batch)
        await self._step("prepare", n, 0.02)
        timed: list[Any] | None = [] if n in self.in_order_batches else None
        return Ahead(batch, [], 0.0, 0.0, Prepared(0.0, [], []), timed)

    async def finish(self, ahead: Any) -> None:
        self.finishing = asyncio.current_task()
        await self._step("finish", self.number(ahead.batch), 0.04)

    async def in_order(self, ahead: Any) -> None:
        await self._step("in order", self.number(ahead.batch), 0.01)

    def run(self) -> None:
        from streams.worker import run_batches

        async def main() -> None:
            try:
                await run_batches(
                    self.take, self.idle, self.prepare, self.finish, self.in_order, lambda: not self.left
                )
            finally:
                await asyncio.sleep(0)  # a cancelled task ends on the loop's next turn
                self.behind_left_running = self.finishing is not None and not self.finishing.done()

        asyncio.run(main())


def test_run_batches_computes_a_batchs_features_while_the_one_before_is_finished() -> None:
    b = _Batches(3)
    b.run()
    log = b.log
    assert log.index("prepare 2") < log.index("finish 1 done")  # the overlap
    assert (
        log.index("finish 1 done")
        < log.index("finish 2")
        < log.index("finish 2 done")
        < log.index("finish 3")
    )
    assert log.index("prepare 1 done") < log.index("prepare 2") and log.index("prepare 2 done") < log.index(
        "prepare 3"
    )
    assert log[-1] == "finish 3 done"  # the last batch finished before the loop returns


def test_run_batches_finishes_the_batch_behind_before_it_waits_or_scores_in_event_time_order() -> None:
    b = _Batches(3, in_order=(3,), idle_after=(1,))
    b.run()
    log = b.log
    assert log.index("finish 1 done") < log.index("take 2")  # nothing waited: batch 1 done first
    assert log.index("finish 2 done") < log.index("in order 3")  # nothing behind an in-order batch
    assert "finish 3" not in log and log[-1] == "in order 3 done"


def test_run_batches_holds_the_batch_ahead_when_the_one_behind_fails() -> None:
    b = _Batches(3)
    b.fail["finish"] = 1
    second = b.left[1]
    with pytest.raises(RuntimeError, match="finish 1 failed"):
        b.run()
    assert "prepare 3" not in b.log and "finish 2" not in b.log
    assert all(e.message.acked for e in second)  # held: never acked, redelivered


def test_run_batches_holds_the_batch_behind_when_the_one_ahead_fails() -> None:
    b = _Batches(3)
    b.fail["prepare"] = 2
    second = b.left[1]
    with pytest.raises(RuntimeError, match="prepare 2 failed"):
        b.run()
    assert all(e.message.acked for e in second)
    assert "finish 1" in b.log and "finish 1 done" not in b.log
    assert not b.behind_left_running  # cancelled (the real finish then holds its batch)


# -- Kafka delivery ------------------------------------------------------------------------------


class StandInMessage:
    def __init__(self, topic: str, value: bytes, key: bytes | None) -> None:
        self._t, self._v, self._k = topic, value, key

    def topic(self) -> str:
        return self._t

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes | None:
        return self._k


class StandInProducer:
    """confluent_kafka.Producer's produce/flush shapes; delivery outcomes scripted per attempt."""

    def __init__(self, outcomes: list[Any]) -> None:
        # outcomes[i]: for flush i, None (all delivered), "stuck" (nothing acknowledged in
        # time), a KafkaError for every record, or "full" (produce raises BufferError once).
        self.outcomes = outcomes
        self.queue: list[tuple[StandInMessage, Any]] = []
        self.delivered: list[bytes] = []
        self.flushes = 0
        self.full_once = False

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
        if self.full_once:
            self.full_once = False
            raise BufferError("Local: Queue full")
        self.queue.append((StandInMessage(topic, value, key), on_delivery))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        outcome = self.outcomes[self.flushes] if self.flushes < len(self.outcomes) else None
        self.flushes += 1
        if isinstance(outcome, str) and outcome == "stuck":
            return len(self.queue)
        queue, self.queue = self.queue, []
        for msg, cb in queue:
            if isinstance(outcome, KafkaError):
                cb(outcome, msg)
            else:
                self.delivered.append(msg.value())
                cb(None, msg)
        return 0


def _output(outcomes: list[Any]) -> KafkaOutput:
    out = KafkaOutput.__new__(KafkaOutput)
    out.delivery = Delivery(StandInProducer(outcomes))
    out.spec = _spec()
    out.flush_timeout = 0.01
    return out


def _batch(n: int) -> BatchOutput:
    preds = [Prediction(f"e{i}", "a", 1.0, "m", "v1", True, None, {"x": 1.0}, 2.0) for i in range(n)]
    dead = [DeadLetter("not_json", "bad", "events", 0, 99, b"{", None, 2.0)]
    return BatchOutput(predictions=preds, dead_letters=dead)


def _deliver(output: KafkaOutput, batch: BatchOutput, registry: CollectorRegistry) -> None:
    health = DependencyHealth(registry, "p")
    asyncio.run(output.deliver(batch, health, FAST))


def test_records_whose_delivery_failed_are_produced_again_until_acknowledged() -> None:
    registry = CollectorRegistry()
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    output = _output(["stuck", timed_out, None])
    _deliver(output, _batch(3), registry)
    producer = output.producer
    assert producer.flushes == 3
    assert len(producer.delivered) == 4, "each record delivered once: nothing lost, nothing doubled"
    get = registry.get_sample_value
    assert get("weir_dependency_retries_total", {"pipeline": "p", "dependency": "kafka"}) == 2
    assert get("weir_dependency_up", {"pipeline": "p", "dependency": "kafka"}) == 1


def test_a_full_local_queue_is_flushed_then_the_rest_produced() -> None:
    output = _output([None, None])
    output.producer.full_once = True
    _deliver(output, _batch(2), CollectorRegistry())
    assert len(output.producer.delivered) == 3


def test_a_record_kafka_refuses_for_good_is_not_retried_forever() -> None:
    output = _output([KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)])
    with pytest.raises(OutputRejected, match=r"for good.*max\.message\.bytes"):
        _deliver(output, _batch(1), CollectorRegistry())


def test_a_synchronous_produce_refusal_is_fatal_too() -> None:
    output = _output([])

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))

    output.producer.produce = refuse
    with pytest.raises(OutputRejected):
        _deliver(output, _batch(1), CollectorRegistry())


def test_one_attempt_reports_what_is_missing_as_transient() -> None:
    output = _output(["stuck"])
    output.emit(_batch(2))
    with pytest.raises(StackError, match="did not acknowledge 3 record"):
        asyncio.run(output.flush())


def test_every_agent_of_the_app_ends_the_process_when_it_fails(tmp_path: Path) -> None:
    """faust would restart a crashed agent (and a restarted take_events agent was seen to
    idle): create_app hooks every agent's on_error to the fatal exit instead."""
    from river import linear_model

    from streams.worker import create_app
    from tests.unit.doubles import StaticModel

    fatal: list[tuple[str, BaseException]] = []
    settings = load_settings(data_dir=str(tmp_path))
    model = StaticModel(linear_model.LogisticRegression(), "m", "v1")
    app = create_app(
        _spec(), settings, role="scorer", models=model, on_fatal=lambda w, e: fatal.append((w, e))
    )
    agents = list(app.agents.values())
    assert agents, "the app has its score agent"
    boom = RuntimeError("boom")
    for agent in agents:
        asyncio.run(agent._on_error(agent, boom))
    assert [e for _, e in fatal] == [boom] * len(agents)
    assert "score" in fatal[0][0]


def _drain_consumer() -> Any:
    """A mode Service with faust's fetcher hand-off shape, made fast by fast_drain_consumer."""
    from mode import Service

    from streams.worker import fast_drain_consumer

    class Base(Service):
        calls = 0

        async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
            type(self).calls += 1
            return await super().wait_first(*coros, timeout=timeout)

    consumer = fast_drain_consumer(Base)()
    consumer.suspend_flow = asyncio.Event()
    return consumer


def test_fast_drain_hands_off_a_message_inline_when_nothing_waits() -> None:
    async def main() -> None:
        consumer = _drain_consumer()
        seen: list[int] = []

        async def callback(n: int) -> int:
            seen.append(n)
            return n

        res = await consumer.wait_first(callback(1), consumer.suspend_flow.wait())
        assert seen == [1] and res.results == [1] and not res.stopped
        assert type(consumer).calls == 0  # no tasks: mode's wait_first was not needed

    asyncio.run(main())


def test_fast_drain_falls_back_when_the_callback_waits_and_keeps_its_result() -> None:
    async def main() -> None:
        consumer = _drain_consumer()
        gate = asyncio.Event()

        async def callback() -> str:
            await gate.wait()  # a full stream buffer
            await asyncio.sleep(0)
            return "delivered"

        asyncio.get_running_loop().call_later(0.01, gate.set)
        res = await consumer.wait_first(callback(), consumer.suspend_flow.wait())
        assert "delivered" in res.results
        assert type(consumer).calls == 1

    asyncio.run(main())


def test_fast_drain_a_suspended_flow_still_interrupts_a_waiting_callback() -> None:
    async def main() -> None:
        consumer = _drain_consumer()
        cancelled: list[bool] = []

        async def callback() -> None:
            try:
                await asyncio.Event().wait()  # never set
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        asyncio.get_running_loop().call_later(0.01, consumer.suspend_flow.set)
        res = await asyncio.wait_for(consumer.wait_first(callback(), consumer.suspend_flow.wait()), 5)
        assert res.results == [True]  # the flow's wait won
        await asyncio.sleep(0.01)
        assert cancelled == [True]  # and the callback was cancelled, as faust's own does
        # With the flow suspended, the hand-off is faust's from the start.
        n = type(consumer).calls

        async def quick() -> int:
            return 1

        await consumer.wait_first(quick(), consumer.suspend_flow.wait())
        assert type(consumer).calls == n + 1

    asyncio.run(main())


def test_the_scoring_consumer_fetches_with_the_settings_min_bytes_and_max_wait(tmp_path: Path) -> None:
    """faust hard-codes aiokafka's fetch_min_bytes 1 / fetch_max_wait_ms 1500; the worker's
    consumer is made with WEIR_KAFKA_FETCH_MIN_BYTES / _MAX_WAIT_MS instead, which aiokafka
    hands to its fetcher when the consumer starts (no broker is reached here)."""
    from river import linear_model

    from streams.worker import create_app
    from tests.unit.doubles import StaticModel

    settings = load_settings(data_dir=str(tmp_path), kafka_fetch_min_bytes=12345, kafka_fetch_max_wait_ms=7)
    model = StaticModel(linear_model.LogisticRegression(), "m", "v1")
    app = create_app(_spec(), settings, role="scorer", models=model, on_fatal=lambda w, e: None)

    async def main() -> Any:
        thread = app.consumer._new_consumer_thread()
        return thread._create_worker_consumer(app.transport)

    consumer = asyncio.run(main())
    assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (12345, 7)
    assert consumer._max_partition_fetch_bytes == app.conf.consumer_max_fetch_size  # faust's own kept


def test_the_events_arrive_as_kafka_gave_them_and_faust_monitor_is_not_called_per_message(
    tmp_path: Path,
) -> None:
    """The events topic's schema hands over the key and value bytes without faust's codec
    registry, and faust's Monitor is not among the sensors called for every message."""
    from faust.sensors import Monitor
    from river import linear_model

    from streams.worker import create_app
    from tests.unit.doubles import StaticModel

    settings = load_settings(data_dir=str(tmp_path))
    model = StaticModel(linear_model.LogisticRegression(), "m", "v1")
    app = create_app(_spec(), settings, role="scorer", models=model, on_fatal=lambda w, e: None)
    (topic,) = [a.channel for a in app.agents.values()]
    message = ConsumerMessage("events", 0, 7, time.time(), 0, None, b"c1", b'{"event_id": "e1"}', None)

    async def decode() -> Any:
        return await topic.decode(message)

    event = asyncio.run(decode())
    assert (event.key, event.value, event.message) == (b"c1", b'{"event_id": "e1"}', message)

    list(app.on_init_dependencies())  # what the worker does when it starts
    assert not [s for s in app.sensors if isinstance(s, Monitor)]
    assert isinstance(app.monitor, Monitor)  # still there for the consumer's own calls
