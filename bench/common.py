"""Shared pieces of the benchmarks in bench/: streams with delayed labels, the output reader,
Weir worker processes, CPU and RSS from /proc, Prometheus scrapes and clean-up.

Nothing here is product code: the benchmarks drive Weir from outside, as a user does
(``weir worker SPEC`` subprocesses, Kafka topics, Redis), and read what they can see from
outside (output topics, /proc, /metrics, Redis INFO).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition  # noqa: E402

from streams.admin import admin_client, delete_keys, delete_topics, ensure_topics  # noqa: E402
from streams.produce import build_messages, open_source  # noqa: E402
from weir.settings import Settings  # noqa: E402
from weir.spec import PipelineSpec, parse_spec  # noqa: E402

WORK = REPO / ".weir" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(vals: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``vals``, or None when empty."""
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pipelines ------------------------------------------------------------------------------


def pipeline(base: dict[str, Any], name: str) -> tuple[PipelineSpec, Path]:
    """A copy of the spec dict ``base`` named ``name``, parsed, and written where a worker reads it."""
    d = dict(base)
    d["name"] = name
    if isinstance(d.get("model"), dict):
        d["model"] = {**d["model"], "name": name}
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return parse_spec(d), path


def cleanup(settings: Settings, spec: PipelineSpec) -> None:
    """Delete a benchmark pipeline's topics (Faust's assignor topic too) and Redis keys."""
    names = [*spec.topics.names().values(), f"{spec.consumer_group}-__assignor-__leader"]
    try:
        delete_topics(settings, names)
    except Exception as exc:  # clean-up must not hide the figures
        print(f"  (clean-up of {spec.name}'s topics failed: {exc})", file=sys.stderr)
    try:  # the consumer groups of the pipeline and of its baselines (offsets, static members)
        admin = admin_client(settings)
        groups = [g.group_id for g in admin.list_consumer_groups(request_timeout=10).result().valid]
        mine = [g for g in groups if g.endswith(spec.name) or g == spec.consumer_group]
        if mine:
            for fut in admin.delete_consumer_groups(mine, request_timeout=10).values():
                # NON_EMPTY_GROUP: Weir's static members stay in the group for a session
                # timeout after they stop; its offsets then age out with the broker's retention.
                with contextlib.suppress(KafkaException):
                    fut.result()
    except Exception as exc:
        print(f"  (clean-up of {spec.name}'s consumer groups failed: {exc})", file=sys.stderr)
    shutil.rmtree(Path(settings.data_dir) / "faust" / spec.name, ignore_errors=True)
    try:
        client = settings.redis()
        delete_keys(client, spec.redis_prefix)
        client.close()
    except Exception as exc:
        print(f"  (clean-up of {spec.name}'s Redis keys failed: {exc})", file=sys.stderr)


def make_topics(settings: Settings, spec: PipelineSpec) -> None:
    ensure_topics(settings, spec)


# -- the stream: events with one delayed label each -----------------------------------------


@dataclass(frozen=True)
class LabelDelay:
    """How long after its event a label is sent: seconds of wall clock, or events in between.

    Examples:
        >>> LabelDelay.parse("2s"), LabelDelay.parse("500ev"), LabelDelay.parse("1.5")
        (LabelDelay(seconds=2.0, events=None), LabelDelay(seconds=None, events=500), \
LabelDelay(seconds=1.5, events=None))
    """

    seconds: float | None = None
    events: int | None = None

    @classmethod
    def parse(cls, text: str) -> LabelDelay:
        t = text.strip().lower()
        try:
            if t.endswith("ev"):
                n = int(t[:-2])
                if n < 0:
                    raise ValueError
                return cls(events=n)
            s = float(t.removesuffix("s"))
            if s < 0:
                raise ValueError
            return cls(seconds=s)
        except ValueError:
            raise SystemExit(
                f"label delay must be seconds ('2s', '0.5') or events ('500ev'), >= 0; got {text!r}"
            ) from None

    def __str__(self) -> str:
        return f"{self.events} events" if self.events is not None else f"{self.seconds:g} s"


@dataclass
class Record:
    key: bytes
    event: bytes
    event_id: str
    label: bytes | None


def records(
    spec: PipelineSpec, n: int, *, run_id: str, seed: int, entities: int, labels: bool = True
) -> list[Record]:
    """``n`` Agrawal events for ``spec`` with their labels, deterministic by ``seed``
    (the senders set each event's time when they send it: :func:`stamped`)."""
    rows = itertools.islice(open_source(f"river:synth.Agrawal?seed={seed}"), n)
    out: list[Record] = []
    # Labels carry no ts: the reader stamps when it reads one, i.e. when the label became
    # known, as a label source that learns the outcome later does. Stamped with their own
    # event's ts (as before), every label would be due before its event is scored, and the
    # worker's event-time order (scoring.max_idle) would make each event wait for its own
    # label: a worst case, not what users run.
    for ev, lab, _ in build_messages(spec, rows, run_id=run_id, entities=entities, label_delay=None):
        eid = f"{run_id}-{len(out)}"
        out.append(Record(ev.key or b"", ev.value, eid, lab.value if (labels and lab) else None))
    return out


def interleave(recs: Sequence[Record], delay_events: int) -> Iterator[tuple[bool, Record]]:
    """``(is_label, record)`` in send order: each label ``delay_events`` events after its event."""
    for i, r in enumerate(recs):
        yield False, r
        j = i - delay_events
        if j >= 0 and recs[j].label is not None:
            yield True, recs[j]
    for r in recs[max(0, len(recs) - delay_events) :]:
        if r.label is not None:
            yield True, r


def producer(settings: Settings, linger_ms: int = 5) -> Producer:
    return Producer({**settings.confluent_config(), "linger.ms": linger_ms, "compression.type": "lz4"})


def _send(p: Producer, topic: str, value: bytes, key: bytes | None, ts_ms: int | None = None) -> None:
    while True:
        try:
            if ts_ms is None:
                p.produce(topic, value, key)
            else:
                p.produce(topic, value, key, timestamp=ts_ms)
            return
        except BufferError:
            p.poll(0.05)


def stamped(event: bytes, ts: float) -> bytes:
    """The event with its ``ts`` set to ``ts`` (the send time).

    A producer stamps an event when it happens, so event times follow the order and the
    pace of sending, as the labels' do (their Kafka timestamps, see :func:`records`).
    Stamped when the records were built instead, every event of a phase had one ts,
    seconds old by the time it was sent: role ``all``'s event-time order (streams/sync.py)
    then put every event of the backlog before every label, and made each live event a
    backlog item (older than ``scoring.max_idle``) ordered against the live labels: not
    what users run.

    Examples:
        >>> orjson.loads(stamped(b'{"event_id": "e1", "ts": 1.5, "data": {}}', 7.25))["ts"]
        7.25
    """
    obj = orjson.loads(event)
    obj["ts"] = ts
    return orjson.dumps(obj)


def preload(settings: Settings, spec: PipelineSpec, recs: Sequence[Record], delay_events: int) -> None:
    """Write events (stamped at their send time) and labels (each ``delay_events`` events
    late) as fast as Kafka takes them."""
    p = producer(settings, 20)
    t = spec.topics
    for i, (is_label, r) in enumerate(interleave(recs, delay_events)):
        if is_label:
            assert r.label is not None
            _send(p, t.labels, r.label, r.event_id.encode())
        else:
            _send(p, t.events, stamped(r.event, time.time()), r.key)
        if i % 1000 == 0:
            p.poll(0)
    if p.flush(60):
        raise SystemExit(f"preload of {spec.name}: messages not delivered within 60 s")


def live_send(
    settings: Settings, spec: PipelineSpec, recs: Sequence[Record], rate: float, delay: LabelDelay
) -> dict[str, float]:
    """Send events at ``rate``/s, each label ``delay`` later; returns each event's Kafka timestamp.

    The event's Kafka timestamp is set explicitly to the send time (ms), so the latency
    measured is the one a consumer of both topics sees: prediction timestamp - event timestamp.
    """
    import heapq

    p = producer(settings, 1)
    t = spec.topics
    # Connected, with both topics' leaders known, before the first timed send: a new
    # producer holds its first messages until then, and their wait (100-300 ms here) was
    # counted as the system's latency (the floor, which does nothing, read p99 274 ms).
    for topic in (t.events, t.labels):
        p.list_topics(topic, timeout=10)
    sent: dict[str, float] = {}
    due: list[tuple[float, int, Record]] = []
    t0 = time.time()
    for i, r in enumerate(recs):
        target = t0 + i / rate
        d = target - time.time()
        if d > 0:
            time.sleep(d)
        now = time.time()
        ts_ms = int(now * 1000)
        _send(p, t.events, stamped(r.event, ts_ms / 1000.0), r.key, ts_ms)
        sent[r.event_id] = ts_ms / 1000.0
        if r.label is not None:
            if delay.events is not None:
                heapq.heappush(due, (float(i + delay.events), i, r))
            else:
                heapq.heappush(due, (now + (delay.seconds or 0.0), i, r))
        clock = float(i) if delay.events is not None else now
        while due and due[0][0] <= clock:
            _, _, lr = heapq.heappop(due)
            assert lr.label is not None
            _send(p, t.labels, lr.label, lr.event_id.encode())
        p.poll(0)
    while due:  # the last labels, on time
        when, _, lr = heapq.heappop(due)
        if delay.events is None:
            d = when - time.time()
            if d > 0:
                time.sleep(d)
        assert lr.label is not None
        _send(p, t.labels, lr.label, lr.event_id.encode())
        p.poll(0)
    p.flush(30)
    return sent


def _live_send_child(
    conn: Any, settings: Settings, spec: PipelineSpec, recs: Any, rate: float, delay: Any
) -> None:
    sent = live_send(settings, spec, recs, rate, delay)
    conn.send_bytes(orjson.dumps(sent))
    conn.close()


def live_send_apart(
    settings: Settings, spec: PipelineSpec, recs: Sequence[Record], rate: float, delay: LabelDelay
) -> dict[str, float]:
    """:func:`live_send` in a process of its own; returns its event timestamps.

    In the benchmark's process the sender shares the GIL with the output reader's thread:
    at a few thousand events and labels a second it fell behind its own schedule and its
    queue showed as latency of the system measured (the floor, which does nothing, read
    p50 1.9 s at 10,000 events/s). Apart, each has a core's share of its own.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process running librdkafka threads
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_live_send_child, args=(child, settings, spec, list(recs), rate, delay))
    proc.start()
    child.close()
    try:
        sent: dict[str, float] = orjson.loads(parent.recv_bytes())
    except EOFError as exc:
        proc.join(10)
        raise SystemExit(f"the live sender exited ({proc.exitcode}) before sending its timestamps") from exc
    proc.join(30)
    return sent


# -- the one consumer of predictions --------------------------------------------------------


def watermarks(c: Consumer, topic: str, partition: int, timeout: float = 30.0) -> tuple[int, int]:
    """Low and high watermarks, retried: a new topic's leader can take a moment to be known."""
    deadline = time.time() + timeout
    while True:
        try:
            low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            return int(low), int(high)
        except KafkaException:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


class OutputReader(threading.Thread):
    """Reads an output topic from its current end: each event id's first output Kafka timestamp.

    The same reader for every system: Weir's predictions, the naive loop's, the floor's
    copies of the events (all JSON objects with an ``event_id``).
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        super().__init__(daemon=True)
        conf = settings.confluent_config()
        self.c = Consumer(
            {**conf, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
        )
        md = self.c.list_topics(topic, timeout=10).topics[topic]
        parts = []
        for part in md.partitions:
            _, high = watermarks(self.c, topic, part)
            parts.append(TopicPartition(topic, part, high))
        self.c.assign(parts)
        self.times: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for m in self.c.consume(1000, 0.1):
                if m.error():
                    continue
                eid = orjson.loads(m.value() or b"{}").get("event_id")
                if eid is None:
                    continue
                if eid not in self.times:
                    self.times[eid] = m.timestamp()[1] / 1000.0
        self.c.close()

    def count(self, ids: set[str] | None = None) -> int:
        if ids is None:
            return len(self.times)
        return sum(1 for k in list(self.times) if k in ids)

    def wait_for(self, ids: set[str], timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.count(ids) >= len(ids):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.halt.set()
        self.join(10)


# -- processes: start, stop, CPU, RSS -------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (all threads), from /proc/<pid>/stat."""
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # fields 14 and 15 of stat(5): utime, stime
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (``/proc/stat``: user,
    nice, system, irq, softirq, steal): the whole machine's work, this process's too.

    Examples:
        >>> a = machine_busy_seconds(); b = machine_busy_seconds()
        >>> 0 < a <= b
        True
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def server_pids(settings: Any) -> dict[str, int]:
    """The local stack's servers that every system shares: Redis (its ``INFO`` names its
    pid) and the Kafka broker (the process whose command line runs ``kafka.Kafka``). A
    server not found (another host) is left out."""
    out: dict[str, int] = {}
    try:
        client = settings.redis()
        try:
            out["redis"] = int(client.info("server")["process_id"])
        finally:
            client.close()
    except Exception:  # a figure left out, not a failed benchmark
        pass
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in argv:
            out["kafka"] = int(d)
            break
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants (VmRSS)."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@dataclass
class Proc:
    """A benchmark subprocess in its own process group, with its log and /metrics URL."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    metrics_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
    return Proc(name, popen, log)


def weir_worker(spec_path: Path, role: str, name: str, env: dict[str, str] | None = None) -> Proc:
    """``weir worker SPEC --role ROLE`` with its own /metrics port (``env``: more variables)."""
    port = free_port()
    argv = [sys.executable, "-m", "weir.cli", "worker", str(spec_path), "--role", role]
    argv += ["--metrics-port", str(port)]
    if role != "learner":
        argv += ["--", "--without-web", "-l", "warn"]
    proc = spawn(name, argv, env)
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return proc


def _only(url: str, name: str) -> str:
    """``url`` asking for the samples of metric ``name`` only.

    Examples:
        >>> _only("http://h:1/metrics", "weir_labels_learned_total")
        'http://h:1/metrics?name%5B%5D=weir_labels_learned_total'
    """
    return f"{url}?{urllib.parse.urlencode({'name[]': name})}"


def scrape(url: str | None, name: str) -> float | None:
    """Sum over all series of the counter or gauge ``name`` at a /metrics URL (None if unreachable).

    Asks for ``name`` alone (prometheus-client's ``name[]`` filter): the whole page costs
    the process ~6 ms of CPU to render, one metric well under 1 ms."""
    if not url:
        return None
    try:
        body = urllib.request.urlopen(_only(url, name), timeout=3).read().decode()
    except OSError:
        return None
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape_by(url: str | None, name: str, label: str) -> dict[str, float]:
    """Values of the series of ``name`` at a /metrics URL, summed by the value of ``label``."""
    if not url:
        return {}
    try:
        body = urllib.request.urlopen(_only(url, name), timeout=3).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            key = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def wait_until(pred: Any, timeout: float, step: float = 0.25) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def lag(settings: Settings, group: str, topic: str) -> int | None:
    """Messages of ``topic`` not yet committed by consumer group ``group`` (None if unknown)."""
    c = Consumer({**settings.confluent_config(), "group.id": group, "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None:
            return None
        tps = [TopicPartition(topic, p) for p in md.partitions]
        committed = c.committed(tps, timeout=10)
        total = 0
        for tp in committed:
            _, high = watermarks(c, topic, tp.partition)
            total += high - (tp.offset if tp.offset >= 0 else 0)
        return total
    except Exception:
        return None
    finally:
        c.close()


def high_watermarks(settings: Settings, topic: str) -> int | None:
    """Messages ever written to ``topic`` (sum of its partitions' high watermarks)."""
    c = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"bench-hw-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None:
            return None
        return sum(watermarks(c, topic, p)[1] for p in md.partitions)
    except Exception:
        return None
    finally:
        c.close()


def shown(path: str | Path) -> str:
    """``path`` as a result file names it: relative to the repository when it is inside it.

    Examples:
        >>> shown(REPO / "examples" / "loan-lr.yaml"), shown("/tmp/x.json")
        ('examples/loan-lr.yaml', '/tmp/x.json')
    """
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def machine() -> dict[str, Any]:
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }
