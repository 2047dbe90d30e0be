"""Harness of the fault suite (tests/integration/test_faults.py): private servers, real
Weir processes, a seeded traffic driver, and the checks every fault run ends with.

Nothing here touches the shared local stack (Kafka 9092, Redis 6379): the suite stops,
pauses and restarts servers, so it runs its own.

* :class:`PrivateRedis` (tests/integration/private_redis.py) - ``redis-server`` on a free
  port with the local stack's configuration (``appendonly yes``, ``appendfsync everysec``,
  as production should run it) in a temporary directory.
* :class:`PrivateKafka` - a single-node KRaft broker (``deploy/local/stack.py``'s ``Kafka``:
  its jars and configuration) on free ports, state in a temporary directory.
* :class:`WeirProc` - ``weir worker SPEC --role ...`` / ``weir monitor SPEC`` pointed at
  them through ``WEIR_KAFKA_BOOTSTRAP`` / ``WEIR_REDIS_URL``; kill -9 and restart.
* :class:`Traffic` - good events (and their labels, ``label_delay`` later) interleaved with
  malformed messages, every message's partition and offset recorded from its delivery
  report (a :class:`Ledger`).
* :class:`TopicTail` - reads a topic from its beginning, keeps everything.
* :func:`verify` - the five checks of every run: each good event predicted, each bad
  message dead-lettered with a reason, labels learned == labels sent, no windowed count
  above the entity's events, every process alive and making progress.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from streams import admin
from tests.integration.private_redis import PrivateRedis, stack_module, terminate
from tests.integration.processes import WeirProcess, free_port
from weir.contracts import decode_dead_letter
from weir.settings import Settings
from weir.spec import PipelineSpec

REPO = Path(__file__).resolve().parents[2]
#: Where the suite writes what it measured (docs/reliability.md quotes it).
RESULTS = REPO / ".weir" / "faults" / "results.json"
#: The broker's message.max.bytes (Kafka's default: the local stack's configuration does
#: not set it) and the test producer's; the oversized messages come within 1% of it.
BROKER_MAX_BYTES = 1_048_588
#: The count feature of :func:`fault_spec` (``{agg: count, window: 1h}``).
COUNT_FEATURE = "events_count_1h"


def _wait(check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(interval)


# -- private servers -------------------------------------------------------------------------


class PrivateKafka:
    """A one-node KRaft broker: the local stack's (``deploy/local/stack.py`` ``Kafka``: its
    jars and configuration) on free ports, its state and logs in ``root/kafka``."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        state = root / "kafka"
        self.broker = stack_module().Kafka(self.port, free_port(), state=state, logs=state)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start (formatting the storage the first time); the seconds it took to be ready."""
        t0 = time.monotonic()
        self.proc = self.broker.launch()
        self.broker.wait_ready(self.proc.pid)
        return time.monotonic() - t0

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        terminate(self.proc, 30)


@dataclass
class Servers:
    kafka: PrivateKafka
    redis: PrivateRedis
    settings: Settings
    root: Path


def pause(server: PrivateKafka | PrivateRedis, seconds: float) -> tuple[float, float]:
    """SIGSTOP ``server`` for ``seconds`` (always SIGCONT after); (stopped_at, resumed_at)."""
    t0 = time.time()
    server.signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        server.signal(signal.SIGCONT)
    return t0, time.time()


# -- the pipeline ----------------------------------------------------------------------------


def fault_spec(name: str, partitions: int = 2) -> PipelineSpec:
    """A small, cheap pipeline: two numeric fields, a logistic regression, a count window."""
    doc = {
        "name": name,
        "task": "binary",
        "entity_field": "entity_id",
        "fields": {"x1": "numeric", "x2": "numeric"},
        "features": [
            {"agg": "raw", "field": "x1"},
            {"agg": "raw", "field": "x2"},
            {"agg": "mean", "field": "x1", "window": "1h"},
            {"agg": "count", "window": "1h"},
        ],
        "lateness": "30s",
        "late_events": "dead_letter",
        "classes": ["0", "1"],
        "topics": {"partitions": partitions},
        "model": {
            "name": "fault-lr",
            "steps": ["river.preprocessing.StandardScaler", "river.linear_model.LogisticRegression"],
        },
        "labels": {"horizon": "1h"},
        "scoring": {"batch_size": 200, "batch_within": "50ms"},
        "learner": {"snapshot_every_labels": 100, "snapshot_every_seconds": "1s"},
        "drift": {"features": ["x1", "x2"], "reference_size": 100, "window": 100, "min_samples": 50},
        "retrain": {"enabled": False},
    }
    return PipelineSpec.model_validate(doc)


#: Topics whose append time tells when Weir wrote to them (recovery times).
_APPEND_TIME_ROLES = ("predictions", "dead_letters", "training_log", "drift")


def create_topics(settings: Settings, spec: PipelineSpec) -> None:
    names = spec.topics.names()
    stamped = [names[r] for r in _APPEND_TIME_ROLES]
    admin.ensure_topics(
        settings, stamped, spec.topics.partitions, 1, config={"message.timestamp.type": "LogAppendTime"}
    )
    admin.ensure_topics(
        settings, [n for r, n in names.items() if r not in _APPEND_TIME_ROLES], spec.topics.partitions, 1
    )


class WeirProc(WeirProcess):
    """A ``python -m weir.cli ARGS`` process on the private servers (no ``WEIR_*`` variable
    of the test's environment reaches it); kill -9 and restartable."""

    def __init__(self, name: str, args: list[str], servers: Servers, workdir: Path) -> None:
        self.name = name
        #: set by kill9(): the supervisor restarts without reporting an unexpected exit
        self.killed = False
        self.lock = threading.Lock()
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("WEIR_")}
        env.update(
            {
                "WEIR_KAFKA_BOOTSTRAP": servers.settings.kafka_bootstrap,
                "WEIR_REDIS_URL": servers.settings.redis_url,
                "WEIR_METRICS_PORT": "0",
            }
        )
        super().__init__(args, workdir / f"{name}.log", workdir / "data", env)

    @property
    def starts(self) -> int:
        return len(self.started_at)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts + 1} at {time.time():.3f} =====\n".encode())
        super().start()

    def returncode(self) -> int | None:
        return self.proc.poll()

    def kill9(self) -> float:
        """SIGKILL the process group (the supervisor restarts it); the time of the kill."""
        with self.lock:
            t = time.time()
            self.killed = True
            self.kill()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== kill -9 at {t:.3f} =====\n".encode())
        return t

    def stop(self) -> int:
        with self.lock:
            return super().stop()

    def grep(self, *needles: str, n: int = 6) -> list[str]:
        """Log lines holding any of ``needles`` (the last ``n``): the evidence of a failure."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln.strip()[:300] for ln in lines if any(s in ln for s in needles)][-n:]


#: Log lines that are evidence of a fault's effect inside a process.
EVIDENCE = ("Error", "error", "Traceback", "Crashed", "Exception", "CRITICAL", "Timeout", "retry", "Retry")


@dataclass
class Exit:
    name: str
    at: float
    code: int | None
    expected: bool


class Deployment:
    """The Weir processes of one run: ``all`` (one worker) or ``split`` (learner + scorer),
    with or without a monitor, under a supervisor that restarts an exited process after
    ``restart_delay`` seconds (as systemd or Kubernetes would) and records the exit.
    """

    def __init__(
        self,
        servers: Servers,
        spec: PipelineSpec,
        workdir: Path,
        layout: str,
        monitor: bool,
        restart_delay: float = 1.0,
    ) -> None:
        self.servers = servers
        self.spec = spec
        self.workdir = workdir
        self.restart_delay = restart_delay
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec_path = workdir / f"{spec.name}.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
        create_topics(servers.settings, spec)
        self.procs: dict[str, WeirProc] = {}
        faust = ["--", "--without-web", "-l", "warn"]
        spec_arg = str(self.spec_path)
        if layout == "all":
            self.procs["all"] = self._proc("all", ["worker", spec_arg, "--role", "all", *faust])
        else:
            self.procs["learner"] = self._proc("learner", ["worker", spec_arg, "--role", "learner"])
            self.procs["scorer"] = self._proc("scorer", ["worker", spec_arg, "--role", "scorer", *faust])
        if monitor:
            self.procs["monitor"] = self._proc("monitor", ["monitor", spec_arg, "--check-every", "100"])
        self.exits: list[Exit] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _proc(self, name: str, args: list[str]) -> WeirProc:
        return WeirProc(name, args, self.servers, self.workdir)

    def _supervise(self) -> None:
        dead_since: dict[str, float] = {}
        while not self._stop.wait(0.2):
            for name, p in self.procs.items():
                with p.lock:
                    if p.alive() or self._stop.is_set():
                        continue
                    now = time.time()
                    if name not in dead_since:
                        dead_since[name] = now
                        self.exits.append(Exit(name, now, p.returncode(), p.killed))
                    if now - dead_since[name] >= self.restart_delay:
                        del dead_since[name]
                        p.killed = False
                        p.start()

    def unexpected_exits(self) -> list[Exit]:
        return [e for e in self.exits if not e.expected]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for p in self.procs.values():
            p.stop()

    def evidence(self) -> str:
        """Exits and error lines of every process, for a failure message."""
        out = []
        for e in self.exits:
            why = "kill -9" if e.expected else "UNEXPECTED"
            out.append(f"--- {e.name} exited with {e.code} at {e.at:.1f} ({why})")
        for name, p in self.procs.items():
            rc = p.returncode()
            state = "alive" if rc is None else f"EXITED with {rc}"
            out.append(f"--- {name} ({state}, started {p.starts}x, log {p.log_path})")
            out += [f"    {ln}" for ln in p.grep(*EVIDENCE)]
        return "\n".join(out)


# -- traffic ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the driver sent, as the broker acknowledged it."""

    #: event_id -> (entity, 1-based index among the entity's good events)
    good: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: good event_id -> time it was handed to the producer
    sent_at: dict[str, float] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    #: (topic, partition, offset) -> kind of malformed message
    bad: dict[tuple[str, int, int], str] = field(default_factory=dict)
    #: (topic, partition, offset) -> (sha256, size) of a bad message's value (None: no value)
    bad_digest: dict[tuple[str, int, int], tuple[str, int] | None] = field(default_factory=dict)
    undelivered: list[str] = field(default_factory=list)


def _filler(rng: random.Random, n: int) -> str:
    """``n`` characters lz4 cannot shrink (a compressed dead letter would hide a size bug)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(rng.choices(alphabet, k=n))


def bad_messages(rng: random.Random, now: float, heavy: bool) -> list[tuple[str, bytes | None]]:
    """``(kind, value)`` of malformed events. ``heavy`` adds the size and depth attacks."""
    ok = {"event_id": "bad-x", "entity_id": "bad-entity", "ts": now, "data": {"x1": 0.5, "x2": 0.5}}

    def with_(**kw: Any) -> bytes:
        return orjson.dumps({**ok, "event_id": f"bad-{uuid.uuid4().hex[:8]}", **kw})

    def data(**kw: Any) -> bytes:
        return with_(data={"x1": 0.5, "x2": 0.5, **kw})

    light: list[tuple[str, bytes | None]] = [
        ("not_json", b"this is not json {"),
        ("invalid_utf8", b'{"event_id": "\xff\xfe\xfd", "entity_id": "e", "ts": 1, "data": {}}'),
        ("binary_garbage", bytes(rng.randrange(256) for _ in range(64))),
        ("nan", b'{"event_id": "n1", "entity_id": "e", "ts": %d, "data": {"x1": NaN, "x2": 1}}' % int(now)),
        (
            "infinity",
            b'{"event_id": "n2", "entity_id": "e", "ts": %d, "data": {"x1": 1, "x2": -Infinity}}' % int(now),
        ),
        ("wrong_type_field", data(x1="abc")),
        ("wrong_type_bool", data(x2=True)),
        ("wrong_type_id", with_(event_id={"nested": 1})),
        ("wrong_type_data", with_(data=[1, 2, 3])),
        ("ts_milliseconds", with_(ts=now * 1000)),
        ("ts_negative", with_(ts=-5)),
        ("ts_far_future", with_(ts=now + 10 * 86_400)),
        ("ts_not_a_date", with_(ts="yesterday at noon")),
        ("ts_huge", with_(ts=1e308)),
        ("missing_event_id", orjson.dumps({k: v for k, v in ok.items() if k != "event_id"})),
        ("missing_ts", orjson.dumps({k: v for k, v in ok.items() if k != "ts"})),
        ("missing_data", orjson.dumps({k: v for k, v in ok.items() if k != "data"})),
        ("missing_field", data(x1=None)),
        ("not_object", b"[1, 2, 3]"),
        ("json_null", b"null"),
        ("json_string", b'"an event"'),
        ("empty_bytes", b""),
        ("tombstone", None),
        ("empty_id", with_(event_id="")),
        ("empty_object", b"{}"),
    ]
    if not heavy:
        return light
    depth = 20_000
    return [
        *light,
        ("deep_array", b"[" * depth + b"]" * depth),
        ("deep_object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000),
        (
            "deep_in_data",
            b'{"event_id": "d1", "entity_id": "e", "ts": %d, "data": {"x1": ' % int(now)
            + b"[" * 3_000
            + b"]" * 3_000
            + b', "x2": 1}}',
        ),
        (
            "huge_number",
            b'{"event_id": "h1", "entity_id": "e", "ts": %d, "data": {"x1": 1e999, "x2": 1}}' % int(now),
        ),
        ("long_id", with_(event_id="i" * 5_000)),
        ("over_max_event_bytes", data(pad=_filler(rng, 70_000))),
        ("near_broker_limit", data(pad=_filler(rng, BROKER_MAX_BYTES - 4_000))),
        (
            "near_broker_limit_utf8",
            b'{"event_id": "\xff' + _filler(rng, BROKER_MAX_BYTES - 4_000).encode() + b'"}',
        ),
        ("near_broker_limit_not_json", _filler(rng, BROKER_MAX_BYTES - 3_000).encode()),
    ]


class Traffic:
    """Produces good events with their labels (``label_delay`` s later), and bad messages.

    Runs in a thread (:meth:`start`) or inline (:meth:`run`). Entities ``e0..e{n-1}``; an
    event's ``ts`` is the wall clock at send, so each entity's events are in time order.
    """

    def __init__(
        self,
        servers: Servers,
        spec: PipelineSpec,
        seed: int,
        *,
        entities: int = 40,
        label_delay: float = 1.0,
    ) -> None:
        from confluent_kafka import Producer

        self.spec = spec
        self.rng = random.Random(seed)
        self.entities = entities
        self.label_delay = label_delay
        self.ledger = Ledger()
        self._counts: dict[str, int] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self.producer: Any = Producer(
            {
                **servers.settings.confluent_config(),
                "linger.ms": 5,
                "message.max.bytes": BROKER_MAX_BYTES,
                "message.timeout.ms": 300_000,
                "compression.type": "none",
                # Quiet while the suite stops the broker: delivery reports carry the errors.
                "log_level": 2,
            }
        )
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        #: (due, event_id, label, event ts) of labels not sent yet, in due order
        self._pending: list[tuple[float, str, int, float]] = []

    # delivery reports --------------------------------------------------------------------
    def _on_bad(self, kind: str) -> Callable[[Any, Any], None]:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                self.ledger.undelivered.append(f"{kind}: {err}")
            else:
                where = (msg.topic(), msg.partition(), msg.offset())
                value = msg.value()
                digest = None if value is None else (hashlib.sha256(value).hexdigest(), len(value))
                self.ledger.bad_digest[where] = digest
                self.ledger.bad[where] = kind

        return cb

    def _on_good(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.ledger.undelivered.append(f"{msg.topic()} {msg.key()!r}: {err}")

    # sending -----------------------------------------------------------------------------
    def event(self, prefix: str = "ev", label: bool = True) -> tuple[bytes, float]:
        """Send one good event; returns its id and the time its label is due."""
        with self._lock:
            self._seq += 1
            eid = f"{prefix}-{self._seq}"
        entity = f"e{self.rng.randrange(self.entities)}"
        x1, x2 = self.rng.random(), self.rng.random()
        now = time.time()
        value = orjson.dumps({"event_id": eid, "entity_id": entity, "ts": now, "data": {"x1": x1, "x2": x2}})
        self._counts[entity] = self._counts.get(entity, 0) + 1
        self.ledger.good[eid] = (entity, self._counts[entity])
        self.ledger.sent_at[eid] = now
        self._produce(self.spec.topics.events, value, entity.encode(), self._on_good)
        if label:
            y = int(x1 + x2 + self.rng.gauss(0, 0.1) > 1.0)
            self._pending.append((now + self.label_delay, eid, y, now))
        return eid.encode(), now + self.label_delay

    def _send_label(self, eid: str, y: int, ts: float) -> None:
        value = orjson.dumps({"event_id": eid, "label": y, "ts": ts + self.label_delay})
        self.ledger.labels.add(eid)
        self._produce(self.spec.topics.labels, value, eid.encode(), self._on_good)

    def bad(self, kind: str, value: bytes | None, key: bytes | None = None) -> None:
        self._produce(self.spec.topics.events, value, key, self._on_bad(kind))

    def bad_label(self, kind: str, value: bytes) -> None:
        self._produce(self.spec.topics.labels, value, None, self._on_bad(f"label:{kind}"))

    def late_event(self) -> None:
        """A well-formed event 5 minutes older than its entity's newest: dead letter ``late``."""
        seen = [e for e, n in self._counts.items() if n > 0]
        if not seen:
            return
        entity = self.rng.choice(seen)
        value = orjson.dumps(
            {
                "event_id": f"late-{uuid.uuid4().hex[:8]}",
                "entity_id": entity,
                "ts": time.time() - 300,
                "data": {"x1": 0.1, "x2": 0.2},
            }
        )
        self.bad("late", value, entity.encode())

    def _produce(
        self, topic: str, value: bytes | None, key: bytes | None, cb: Callable[[Any, Any], None]
    ) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, on_delivery=cb)
                break
            except BufferError:  # the broker is paused: wait for room
                self.producer.poll(0.1)
        self.producer.poll(0)

    def run(
        self,
        n: int,
        rate: float,
        *,
        prefix: str = "ev",
        bad_every: int = 0,
        heavy: bool = False,
        bad_labels: bool = False,
        on_event: Callable[[int], None] | None = None,
    ) -> None:
        """Send ``n`` good events at ``rate``/s (labels follow), a bad message every
        ``bad_every`` good ones (0: none), then the remaining labels; then flush."""
        bads = bad_messages(self.rng, time.time(), heavy) if bad_every else []
        self.rng.shuffle(bads)
        # The size attacks once each (a few MB); every other kind on every round.
        again = [b for b in bads if not b[0].startswith("near_broker_limit")]
        label_faults: list[tuple[str, bytes]] = [
            ("not_json", b"nope"),
            ("label_type", b'{"event_id": "x", "label": "maybe"}'),
            ("missing_event_id", b'{"label": 1}'),
            ("nan_label", b'{"event_id": "x", "label": NaN}'),
        ]
        if heavy:
            label_faults += [
                ("deep_label", b"[" * 20_000 + b"]" * 20_000),
                (
                    "near_broker_limit_label",
                    b'{"event_id": "' + _filler(self.rng, BROKER_MAX_BYTES - 4_000).encode() + b'"}',
                ),
            ]
        label_turn = itertools.count()
        t0 = time.time()
        for i in range(n):
            due = t0 + i / rate
            while (left := due - time.time()) > 0:
                self._labels_due()
                time.sleep(min(left, 0.02))
            self.event(prefix)
            if bad_every and i % bad_every == bad_every - 1:
                slot = i // bad_every
                kinds = bads if slot < len(bads) + 2 else again
                k = slot % (len(kinds) + 2) if slot >= len(bads) + 2 else slot
                if k < len(kinds):
                    kind, value = kinds[k]
                    self.bad(kind, value, self.rng.choice([None, b"bad-key"]))
                elif k == len(kinds):
                    self.late_event()
                elif bad_labels:
                    self.bad_label(*label_faults[next(label_turn) % len(label_faults)])
            self._labels_due()
            if on_event is not None:
                on_event(i)
        while self._pending:
            self._labels_due()
            time.sleep(0.02)
        self.flush()

    def _labels_due(self) -> None:
        now = time.time()
        while self._pending and self._pending[0][0] <= now:
            _, eid, y, ts = self._pending.pop(0)
            self._send_label(eid, y, ts)
        self.producer.poll(0)

    def flush(self, timeout: float = 180.0) -> None:
        left = self.producer.flush(timeout)
        if left:
            self.ledger.undelivered.append(f"{left} messages still in the test producer after {timeout}s")

    def close(self) -> None:
        """Drop the producer (it would log reconnects to a broker the suite stopped)."""
        self.producer.flush(5)
        self.producer = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        def target() -> None:
            try:
                self.run(*args, **kwargs)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 300.0) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the traffic driver did not finish within {timeout}s")
        if self.error is not None:
            raise self.error


# -- reading ---------------------------------------------------------------------------------


@dataclass
class Record:
    partition: int
    offset: int
    timestamp: float
    key: bytes | None
    value: bytes | None


class TopicTail:
    """Everything on ``topic`` from the beginning; :meth:`poll` reads what arrived since."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.topic = topic
        self.consumer = Consumer(
            {
                **settings.confluent_config(),
                "group.id": f"fault-suite-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "fetch.max.bytes": 8 * BROKER_MAX_BYTES,
                "log_level": 2,  # no reconnect chatter while the suite stops the broker
            }
        )
        md = self.consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.records: list[Record] = []

    def poll(self, seconds: float = 0.5) -> list[Record]:
        new: list[Record] = []
        deadline = time.monotonic() + seconds
        while True:
            msgs = self.consumer.consume(1000, timeout=0.1)
            for m in msgs:
                if m.error() is not None:
                    continue
                new.append(
                    Record(m.partition() or 0, m.offset() or 0, m.timestamp()[1] / 1000.0, m.key(), m.value())
                )
            if not msgs and time.monotonic() >= deadline:
                break
        self.records += new
        return new

    def close(self) -> None:
        self.consumer.close()


# -- measures --------------------------------------------------------------------------------


@dataclass
class Outputs:
    """Tails of the topics Weir writes, read as the run goes."""

    predictions: TopicTail
    dead_letters: TopicTail
    training_log: TopicTail
    drift: TopicTail

    @classmethod
    def open(cls, settings: Settings, spec: PipelineSpec) -> Outputs:
        t = spec.topics
        return cls(
            TopicTail(settings, t.predictions),
            TopicTail(settings, t.dead_letters),
            TopicTail(settings, t.training_log),
            TopicTail(settings, t.drift),
        )

    def poll(self) -> None:
        for tail in (self.predictions, self.dead_letters, self.training_log, self.drift):
            tail.poll(0.2)

    def close(self) -> None:
        for tail in (self.predictions, self.dead_letters, self.training_log, self.drift):
            tail.close()

    def predicted(self) -> dict[str, list[dict[str, Any]]]:
        """event_id -> every prediction record of it (at-least-once: maybe several)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.predictions.records:
            rec = orjson.loads(r.value or b"{}")
            rec["_appended"] = r.timestamp
            out.setdefault(str(rec.get("event_id")), []).append(rec)
        return out


def learned_status(client: Any, spec: PipelineSpec) -> dict[str, Any]:
    """The learner's status (``weir status SPEC --json``): labels_learned, joins, ..."""
    raw = client.get(f"{spec.redis_prefix}:status")
    return dict(orjson.loads(raw)) if raw else {}


@dataclass
class Report:
    """What one run lost; empty lists mean nothing was lost."""

    name: str
    problems: list[str] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)

    def fail_if_lost(self, deployment: Deployment) -> None:
        save_result(self.name, {"problems": self.problems, **self.measures})
        if self.problems:
            raise AssertionError(
                f"fault run {self.name!r} lost something:\n  - "
                + "\n  - ".join(self.problems)
                + f"\nmeasured: {json.dumps(self.measures, default=str)}\n"
                + deployment.evidence()
            )


def save_result(name: str, result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        allr = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        allr = {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    allr[name] = {
        **result,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
    }
    RESULTS.write_text(json.dumps(allr, indent=2, default=str) + "\n")
    print(f"\n[faults] {name}: {json.dumps(allr[name], default=str)}")


def verify(
    name: str,
    deployment: Deployment,
    traffic: Traffic,
    outputs: Outputs,
    redis_client: Any,
    *,
    timeout: float = 150.0,
    stall: float = 75.0,
    measures: dict[str, Any] | None = None,
) -> Report:
    """Wait (up to ``timeout``, or until nothing moved for ``stall`` s: longer than a
    consumer group's 60 s session timeout) for every good event's prediction, every bad
    message's dead letter and every label's learning, then check the five invariants. The returned
    report lists what was lost; :meth:`Report.fail_if_lost` raises with the evidence."""
    spec = deployment.spec
    ledger = traffic.ledger
    report = Report(name, measures=dict(measures or {}))
    if ledger.undelivered:
        report.problems.append(
            f"the test producer could not deliver {len(ledger.undelivered)} message(s) "
            f"(the suite's input, not Weir): {ledger.undelivered[:3]}"
        )
    bad_where = set(ledger.bad)

    def dead_lettered() -> dict[tuple[str, int, int], dict[str, Any]]:
        """(topic, partition, offset) of the original -> its dead-letter record."""
        got: dict[tuple[str, int, int], dict[str, Any]] = {}
        for r in outputs.dead_letters.records:
            try:
                rec = decode_dead_letter(r.value or b"{}")
                got[(str(rec.get("topic")), int(rec["partition"]), int(rec["offset"]))] = rec
            except (orjson.JSONDecodeError, TypeError, ValueError, KeyError):
                got[("?", -1, r.offset)] = {"reason": "undecodable dead letter"}
        return got

    progress: dict[str, Any] = {"seen": None, "at": time.monotonic()}

    def done() -> bool:
        outputs.poll()
        preds = outputs.predicted()
        learned = learned_status(redis_client, spec).get("labels_learned", -1)
        dls = dead_lettered()
        if all(e in preds for e in ledger.good) and bad_where <= set(dls) and learned >= len(ledger.labels):
            return True
        # Give up early once nothing has moved for `stall` seconds: a stalled process
        # would only spend the whole timeout (and the make-test budget).
        seen = (len(preds), len(dls), learned)
        if seen != progress["seen"]:
            progress.update(seen=seen, at=time.monotonic())
        return time.monotonic() - progress["at"] > stall

    t0 = time.monotonic()
    _wait(done, timeout, interval=1.0)
    # Learned twice would show as a count above the labels sent: let a late snapshot land.
    time.sleep(3)
    outputs.poll()
    report.measures["settle_seconds"] = round(time.monotonic() - t0, 1)

    # 1. every good event has a prediction
    preds = outputs.predicted()
    missing = [e for e in ledger.good if e not in preds]
    redelivered = sum(len(v) - 1 for v in preds.values())
    report.measures.update(good_events=len(ledger.good), predictions_duplicated=redelivered)
    if missing:
        report.problems.append(
            f"{len(missing)} of {len(ledger.good)} good events have no prediction "
            f"(first: {missing[:5]}, sent at {[round(ledger.sent_at[e], 1) for e in missing[:3]]})"
        )

    # 2. every bad message has a dead letter with a reason
    got = dead_lettered()
    report.measures["bad_messages"] = len(ledger.bad)
    no_dl = {w: k for w, k in ledger.bad.items() if w not in got}
    no_reason = {w: ledger.bad[w] for w in bad_where & set(got) if not got[w].get("reason")}
    # The original must be findable: its sha256 and size as sent (the copy may be capped).
    wrong_digest = sorted(
        {
            ledger.bad[w]
            for w in bad_where & set(got)
            if ledger.bad_digest.get(w) is not None
            and (got[w].get("value_sha256"), got[w].get("value_size")) != ledger.bad_digest[w]
        }
    )
    report.measures["reasons"] = dict(
        sorted(collections.Counter(str(got[w].get("reason")) for w in bad_where & set(got)).items())
    )
    if no_dl:
        kinds = sorted({k for k in no_dl.values()})
        report.problems.append(
            f"{len(no_dl)} of {len(ledger.bad)} bad messages have no dead letter "
            f"(kinds: {kinds}; where: {sorted(no_dl)[:4]})"
        )
    if no_reason:
        report.problems.append(
            f"{len(no_reason)} dead letters without a reason: {sorted(set(no_reason.values()))}"
        )
    if wrong_digest:
        report.problems.append(
            f"dead letters whose value_sha256/value_size do not match the original (kinds: {wrong_digest})"
        )
    unexpected = [g for g in got if g[0] == "?"]
    if unexpected:
        report.problems.append(f"{len(unexpected)} dead-letter records are not valid JSON records")

    # 3. labels learned == labels sent (the learner's status; none lost, none twice)
    status = learned_status(redis_client, spec)
    learned = status.get("labels_learned")
    examples = {str(orjson.loads(r.value or b"{}").get("event_id")) for r in outputs.training_log.records}
    report.measures.update(labels_sent=len(ledger.labels), labels_learned=learned, joins=status.get("joins"))
    if learned != len(ledger.labels):
        what = "never learned" if (learned or 0) < len(ledger.labels) else "learned twice"
        report.problems.append(
            f"labels learned {learned} != labels sent {len(ledger.labels)}: "
            f"{abs((learned or 0) - len(ledger.labels))} {what} (status joins {status.get('joins')}, "
            f"expiries {status.get('expiries')})"
        )
    no_example = sorted(ledger.labels - examples)
    if no_example:
        report.problems.append(
            f"{len(no_example)} of {len(ledger.labels)} labels have no training-log record "
            f"(first: {no_example[:5]})"
        )

    # 4. no entity's windowed count exceeds its events
    over = []
    for eid, recs in preds.items():
        if eid not in ledger.good:
            continue
        entity, k = ledger.good[eid]
        for rec in recs:
            c = (rec.get("features") or {}).get(COUNT_FEATURE)
            if c is not None and c > k:
                over.append(f"{eid} of {entity}: {COUNT_FEATURE}={c} > {k} events sent")
    if over:
        report.problems.append(f"{len(over)} predictions count more events than their entity had: {over[:4]}")

    # 5. no process exited on its own, and each is alive (progress: see final_batch)
    exits: dict[str, list[Exit]] = {}
    for e in deployment.unexpected_exits():
        exits.setdefault(e.name, []).append(e)
    for pname, es in exits.items():
        codes = sorted({str(e.code) for e in es})
        report.problems.append(
            f"process {pname} exited {len(es)} time(s) on its own (status {', '.join(codes)}; the "
            f"suite's supervisor restarted it each time): {deployment.procs[pname].grep(*EVIDENCE, n=3)}"
        )
    report.measures["unexpected_exits"] = {name: len(es) for name, es in exits.items()}
    for pname, p in deployment.procs.items():
        if not p.alive():
            report.problems.append(f"process {pname} is not running (exit {p.returncode()})")
    return report


def recovery(
    tail: TopicTail,
    fault_end: float,
    sent_at: dict[str, float] | None = None,
    *,
    output_after: float | None = None,
) -> dict[str, Any]:
    """Seconds from ``fault_end`` to the first record Weir appended to ``tail`` after
    ``output_after`` (default ``fault_end``; for a kill -9, the restart, so that a record
    the killed process had in flight does not count), and (given ``sent_at`` of events,
    for the predictions topic) until every event sent before ``fault_end`` had its first
    prediction: the backlog cleared."""
    since = fault_end if output_after is None else output_after
    after = [r.timestamp for r in tail.records if r.timestamp > since]
    out: dict[str, Any] = {"first_output_s": round(min(after) - fault_end, 1) if after else None}
    if sent_at is not None:
        first: dict[str, float] = {}
        for r in tail.records:
            eid = str(orjson.loads(r.value or b"{}").get("event_id"))
            first[eid] = min(first.get(eid, r.timestamp), r.timestamp)
        backlog = [first[e] for e, t in sent_at.items() if t <= fault_end and e in first]
        out["caught_up_s"] = round(max(0.0, max(backlog) - fault_end), 1) if backlog else None
    return out


def final_batch(
    deployment: Deployment,
    traffic: Traffic,
    outputs: Outputs,
    redis_client: Any,
    report: Report,
    *,
    n: int = 40,
    timeout: float = 90.0,
) -> None:
    """Progress at the end: ``n`` fresh events and labels are scored and learned, and the
    monitor (if any) reads them; otherwise a problem naming the stalled process."""
    spec = deployment.spec
    before = learned_status(redis_client, spec).get("labels_learned", 0) or 0
    drift_before = len(outputs.drift.records)
    t0 = time.time()
    start = len(traffic.ledger.good)
    traffic.run(n, rate=50, prefix="final")
    fresh = list(traffic.ledger.good)[start:]

    def progressed() -> bool:
        outputs.poll()
        preds = outputs.predicted()
        learned = learned_status(redis_client, spec).get("labels_learned", 0) or 0
        mon = "monitor" not in deployment.procs or any(
            r.timestamp > t0 for r in outputs.drift.records[drift_before:]
        )
        return all(e in preds for e in fresh) and learned >= before + n and mon

    _wait(progressed, timeout, interval=1.0)
    preds = outputs.predicted()
    unscored = [e for e in fresh if e not in preds]
    learned = learned_status(redis_client, spec).get("labels_learned", 0) or 0
    report.measures["final_batch_seconds"] = round(time.time() - t0, 1)
    if unscored:
        who = "scorer" if "scorer" in deployment.procs else "all"
        report.problems.append(
            f"no progress at the end: {len(unscored)} of {n} fresh events unscored after {timeout:.0f}s "
            f"(the {who} process is {'alive but idle' if deployment.procs[who].alive() else 'dead'})"
        )
    if learned < before + n:
        who = "learner" if "learner" in deployment.procs else "all"
        report.problems.append(
            f"no progress at the end: {before + n - learned} of {n} fresh labels unlearned "
            f"after {timeout:.0f}s "
            f"(the {who} process is {'alive' if deployment.procs[who].alive() else 'dead'})"
        )
    if "monitor" in deployment.procs and not any(
        r.timestamp > t0 for r in outputs.drift.records[drift_before:]
    ):
        m = deployment.procs["monitor"]
        report.problems.append(
            f"no progress at the end: the monitor published no drift record for the fresh batch "
            f"(it is {'alive' if m.alive() else 'dead'})"
        )


def wait_ready(deployment: Deployment, traffic: Traffic, outputs: Outputs, timeout: float = 120.0) -> float:
    """Warm up: events until one is predicted (group joined, model loaded); seconds taken."""
    t0 = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        traffic.event(prefix="warm", label=False)
        traffic.flush(10)
        outputs.poll()
        if outputs.predictions.records:
            return time.time() - t0
        for name, p in deployment.procs.items():
            if not p.alive():
                raise AssertionError(f"{name} exited while starting (exit {p.returncode()}):\n{p.tail()}")
        time.sleep(1.0)
    raise AssertionError(f"no prediction within {timeout:.0f}s of starting:\n{deployment.evidence()}")
