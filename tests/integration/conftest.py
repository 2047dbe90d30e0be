"""Fixtures for tests that talk to the real Kafka, Redis and Prometheus.

The session fixture ``stack`` uses the servers the environment points at
(``WEIR_KAFKA_BOOTSTRAP`` / ``WEIR_REDIS_URL``), or else runs
``deploy/local/stack.py up`` (reusing servers already running) and, at the end of the
session, stops only the servers it started. An unreachable server fails the session,
locally and in CI: integration tests never skip.

Fixtures:
    stack          session  Stack: kafka_bootstrap, redis_url, prometheus_url, state_dir,
                            add_scrape_target(name, host_port), remove_scrape_target(name),
                            query(promql)
    settings       session  weir Settings pointing at the stack (and this session's
                            WEIR_MODEL_KEY, set in os.environ for every process)
    redis_client   function sync ``redis.Redis`` (bytes); use ``unique`` in key names
    unique         function short unique id, e.g. ``t3f9a0c1d``
    make_topics    function make_topics(*names, partitions=1) -> [topic names], deleted after;
                            make_topics.for_spec(spec) -> spec with unique name and topics
    consume_all    function consume_all(topic, n, timeout=30.0, allow_fewer=False) -> [Message]
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from streams import admin
from tests.local_scripts import run_deploy_script
from weir.errors import StackError
from weir.settings import Settings, load_settings
from weir.spec import PipelineSpec

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / ".weir" / "stack"
PROMETHEUS_URL = "http://127.0.0.1:9090"
# Cold start: the first Maven fetch of the Kafka jars plus a cold JVM; seconds.
STACK_UP_TIMEOUT = 240.0
CHECK_TIMEOUT = 10.0


# One model key for the whole session: every Weir process a test starts (each may have its
# own WEIR_DATA_DIR, as scale-out scorers on other hosts do) and every registry a test
# opens sign and check with it, like the processes of one deployment sharing WEIR_MODEL_KEY.
# Tests of the default key file (WEIR_DATA_DIR/model.key) unset it for their processes
# (tests/integration/test_integrity.py; the fault suites' processes, tests/integration/faults.py).
os.environ.setdefault("WEIR_MODEL_KEY", f"weir-test-session-{uuid.uuid4().hex}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Stack:
    """The servers a test session uses."""

    kafka_bootstrap: str
    redis_url: str
    prometheus_url: str
    state_dir: Path
    #: Servers this session started (and stops at its end); empty when reusing.
    started: list[str] = field(default_factory=list)
    _targets: set[str] = field(default_factory=set, repr=False)

    @property
    def targets_dir(self) -> Path:
        return self.state_dir / "prometheus" / "targets"

    def prometheus_get(self, path: str, **params: str) -> Any:
        """GET a Prometheus API path; the decoded JSON ``data``. Fails the test on errors."""
        url = f"{self.prometheus_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError) as exc:
            pytest.fail(
                f"Prometheus at {self.prometheus_url} did not answer {path} ({exc}); "
                "start it with `make up` (logs: .weir/stack/logs/prometheus.log)"
            )
        if body.get("status") != "success":
            pytest.fail(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = self.prometheus_get("/api/v1/query", query=promql)
        return list(data["result"])

    def add_scrape_target(
        self,
        name: str,
        host_port: str,
        *,
        labels: dict[str, str] | None = None,
        wait_up: bool = False,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Have Prometheus scrape ``host_port`` (job ``weir``) until removed or session end.

        Writes ``<state>/prometheus/targets/<name>.json`` (file_sd) and waits until
        Prometheus lists the target (and, with ``wait_up``, until a scrape succeeded).
        Returns the target as ``/api/v1/targets`` shows it.
        """
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"target name must be letters, digits, - or _, got {name!r}")
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        path = self.targets_dir / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")  # not matched by *.json: no half-read file
        tmp.write_text(json.dumps([{"targets": [host_port], "labels": labels or {}}]))
        tmp.replace(path)
        self._targets.add(name)

        def shown() -> dict[str, Any] | None:
            for t in self.prometheus_get("/api/v1/targets", state="active")["activeTargets"]:
                mine = t["labels"].get("instance") == host_port and t["scrapePool"] == "weir"
                if mine and (not wait_up or t["health"] == "up"):
                    return dict(t)
            return None

        what = f"Prometheus to {'scrape' if wait_up else 'list'} target {host_port} ({path})"
        result: dict[str, Any] = wait_for(shown, timeout, what, interval=0.5)
        return result

    def remove_scrape_target(self, name: str) -> None:
        (self.targets_dir / f"{name}.json").unlink(missing_ok=True)
        self._targets.discard(name)

    def cleanup(self) -> None:
        for name in list(self._targets):
            self.remove_scrape_target(name)


def _healthy(settings: Settings) -> dict[str, bool]:
    def ok(check: Callable[[], object]) -> bool:
        try:
            check()
        except StackError:
            return False
        return True

    def prometheus_ready() -> None:
        try:
            with urllib.request.urlopen(f"{PROMETHEUS_URL}/-/ready", timeout=2) as resp:
                if resp.status != 200:
                    raise StackError("not ready")
        except (OSError, urllib.error.URLError) as exc:
            raise StackError(str(exc)) from None

    return {
        "kafka": ok(lambda: admin.check_broker(settings, timeout=2.0)),
        "redis": ok(lambda: admin.check_redis(settings, timeout=2.0)),
        "prometheus": ok(prometheus_ready),
    }


def _other_sessions(mine: Path) -> list[int]:
    """Pids of other live test sessions holding a lease on the local stack."""
    pids = []
    for lease in mine.parent.glob("*.lease"):
        if lease == mine:
            continue
        try:
            pid = int(lease.stem)
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            lease.unlink(missing_ok=True)  # stale: that session is gone
            continue
        except PermissionError:
            pass
        pids.append(pid)
    return pids


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    external = bool(os.environ.get("WEIR_KAFKA_BOOTSTRAP") or os.environ.get("WEIR_REDIS_URL"))
    base = load_settings()
    started: list[str] = []
    # Several engineers' sessions share one local stack: each holds a lease, and the
    # last one out stops only the servers its own `up` started.
    lease = STATE_DIR / "sessions" / f"{os.getpid()}.lease"
    if not external:
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.write_text(f"{os.getpid()}\n")
        down = [name for name, ok in _healthy(base).items() if not ok]
        if down:
            res = run_deploy_script("stack", "up", "--json", *down, timeout=STACK_UP_TIMEOUT)
            if res.returncode != 0:
                lease.unlink(missing_ok=True)
                pytest.fail(
                    f"`deploy/local/stack.py up {' '.join(down)}` failed (exit {res.returncode}):\n"
                    f"{res.stdout}{res.stderr}",
                    pytrace=False,
                )
            started = list(json.loads(res.stdout.strip().splitlines()[-1])["started"])
    problem = None
    try:
        admin.check_broker(base, timeout=CHECK_TIMEOUT)
        admin.check_redis(base, timeout=CHECK_TIMEOUT)
    except StackError as exc:
        problem = str(exc)
    if problem:  # failed outside the except block: no chained traceback in the report
        lease.unlink(missing_ok=True)
        pytest.fail(f"integration tests need the servers: {problem}", pytrace=False)
    st = Stack(
        kafka_bootstrap=base.kafka_bootstrap,
        redis_url=base.redis_url,
        prometheus_url=PROMETHEUS_URL,
        state_dir=STATE_DIR,
        started=started,
    )
    try:
        yield st
    finally:
        st.cleanup()
        lease.unlink(missing_ok=True)
        others = _other_sessions(lease) if started else []
        if started and others:
            print(f"\nlocal stack left running: test sessions {others} still use it", file=sys.stderr)
        elif started:
            res = run_deploy_script("stack", "down", *started, timeout=60)
            if res.returncode != 0:
                print(f"stack.py down {started} failed:\n{res.stdout}{res.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    return load_settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url)


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[Any]:
    client = settings.redis()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def unique() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


class TopicFactory:
    """Creates topics with names unique to one test and deletes them afterwards."""

    def __init__(self, settings: Settings, unique: str) -> None:
        self.settings = settings
        self.unique = unique
        self.created: list[str] = []

    def __call__(self, *names: str, partitions: int = 1, config: dict[str, str] | None = None) -> list[str]:
        """``make_topics("events", "labels", partitions=3)`` -> ``["weir.test.<uid>.events", ...]``."""
        full = [f"weir.test.{self.unique}.{n}" for n in (names or ("topic",))]
        admin.ensure_topics(self.settings, full, partitions, 1, config=config)
        self.created += full
        return full

    def for_spec(self, spec: PipelineSpec, partitions: int | None = None) -> PipelineSpec:
        """The spec renamed ``<name>-<uid>`` with its topics ``weir.<new name>.<role>``, created.

        The new name also gives the test its own Redis key prefix and consumer group.
        """
        name = f"{spec.name}-{self.unique}"[:63]
        names = {role: f"weir.{name}.{role.replace('_', '-')}" for role in spec.topics.names()}
        update: dict[str, Any] = dict(names)
        if partitions is not None:
            update["partitions"] = partitions
        topics = spec.topics.model_copy(update=update)
        new = spec.model_copy(update={"name": name, "topics": topics})
        admin.ensure_topics(self.settings, new)
        self.created += list(names.values())
        return new

    def cleanup(self) -> None:
        if self.created:
            admin.delete_topics(self.settings, self.created)
            self.created = []


@pytest.fixture
def make_topics(settings: Settings, unique: str) -> Iterator[TopicFactory]:
    factory = TopicFactory(settings, unique)
    try:
        yield factory
    finally:
        factory.cleanup()


ConsumeAll = Callable[..., list[Message]]


@pytest.fixture
def consume_all(settings: Settings, unique: str) -> ConsumeAll:
    counter = iter(range(1_000_000))

    def consume(topic: str, n: int, timeout: float = 30.0, allow_fewer: bool = False) -> list[Message]:
        """Read ``n`` messages of ``topic`` from its beginning, all partitions.

        A fresh group id each call; partitions are assigned rather than subscribed, which
        reads from the start without waiting for a group rebalance. Fails the test if
        fewer than ``n`` arrive within ``timeout`` seconds, unless ``allow_fewer``.
        """
        consumer = Consumer(
            {
                **settings.confluent_config(),
                "group.id": f"{unique}-consume-{next(counter)}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        try:
            md = consumer.list_topics(topic, timeout=10)
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None:
                pytest.fail(f"topic {topic!r} does not exist ({meta.error if meta else 'unknown'})")
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            got: list[Message] = []
            deadline = time.monotonic() + timeout
            while len(got) < n and time.monotonic() < deadline:
                batch = consumer.consume(
                    n - len(got), timeout=min(0.5, max(0.0, deadline - time.monotonic()))
                )
                for msg in batch:
                    err = msg.error()
                    if err is None:
                        got.append(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        pytest.fail(f"consuming {topic!r}: {err.str()}")
            if len(got) < n and not allow_fewer:
                pytest.fail(f"got {len(got)} of {n} messages from {topic!r} within {timeout:g}s")
            return got
        finally:
            consumer.close()

    return consume
