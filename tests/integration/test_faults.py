"""The fault suite (issue #11): faults injected from outside into real Weir processes and
real servers, and what was lost, which must be nothing.

Every test runs a small pipeline (:func:`faults.fault_spec`) on the suite's OWN Kafka
broker and Redis (started once for the module on free ports; the shared stack is never
paused or killed), streams good events with delayed labels interleaved with malformed
messages, injects one fault at a seeded random moment, and then checks (``faults.verify``):

1. every good event has a prediction (predictions topic, de-duplicated by event_id);
2. every bad message has a dead letter with a reason (matched by topic/partition/offset);
3. labels learned (the learner's status, as ``weir status`` shows it) == labels sent, and
   every label has a training-log record;
4. no prediction's windowed count (``events_count_1h``) exceeds its entity's events;
5. no process exited on its own, and at the end a fresh batch is scored, learned and
   seen by the monitor (``faults.final_batch``).

A failure lists everything that was lost and the processes' error lines. Measured
recovery times are printed and saved to ``.weir/faults/results.json`` (quoted in
docs/reliability.md). A suite-side supervisor restarts any process that exits, 1 s later,
as systemd or Kubernetes would: a kill -9 is restarted that way, and an exit the suite did
not cause is reported as a failure.

``FAULT_SEED`` (default 11) picks the moments and durations (not ``WEIR_``: Weir refuses
unknown ``WEIR_*`` variables).
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.faults import (
    Deployment,
    Outputs,
    PrivateKafka,
    PrivateRedis,
    Servers,
    Traffic,
    fault_spec,
    final_batch,
    pause,
    recovery,
    verify,
    wait_ready,
)
from weir.settings import load_settings

SEED = int(os.environ.get("FAULT_SEED", "11"))
#: Every run mixes these in: a malformed event every BAD_EVERY good ones (and bad labels).
BAD_EVERY = 10
#: Seconds from a kill -9 to the restarted process's first output, at most. It includes
#: the suite's 1 s restart delay and the Python start (5-20 s on 2 busy cores); a process
#: that waits for its dead predecessor's session to expire (45 s) takes longer.
RESTART_BOUND = 40.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("faults")
    kafka = PrivateKafka(root)
    redis = PrivateRedis(root / "redis")
    try:
        took = kafka.start()
        print(f"\n[faults] private broker {kafka.bootstrap} ready in {took:.1f}s, redis {redis.url}")
        settings = load_settings(kafka_bootstrap=kafka.bootstrap, redis_url=redis.url)
        yield Servers(kafka, redis, settings, root)
    finally:
        kafka.stop()
        redis.stop()


class Run:
    """One test's pipeline, processes, traffic and output readers."""

    def __init__(self, servers: Servers, tmp: Path, name: str, layout: str, monitor: bool) -> None:
        self.rng = random.Random(f"{SEED}-{name}")
        self.name = name
        # Unique per session, not seeded: worker instance slots are host-wide, so two test
        # sessions at once must not run pipelines of the same name.
        self.spec = fault_spec(f"f-{name}-{uuid.uuid4().hex[:6]}")
        self.servers = servers
        self.deployment = Deployment(servers, self.spec, tmp, layout, monitor)
        self.traffic = Traffic(servers, self.spec, seed=self.rng.randrange(2**32))
        self.outputs = Outputs.open(servers.settings, self.spec)
        self.redis = servers.settings.redis()
        self.measures: dict[str, Any] = {}

    def ready(self) -> None:
        self.measures["ready_s"] = round(wait_ready(self.deployment, self.traffic, self.outputs), 1)

    def stream(self, n: int, rate: float, **kw: Any) -> None:
        """Start the traffic thread: ``n`` good events at ``rate``/s, bad ones mixed in."""
        kw.setdefault("bad_every", BAD_EVERY)
        kw.setdefault("bad_labels", True)
        self.traffic.start(n, rate, **kw)

    def at_event(self, k: int, timeout: float = 120.0) -> None:
        """Wait until the driver has sent ``k`` good events of the stream."""
        deadline = time.monotonic() + timeout
        while len(self.traffic.ledger.good) < k:
            assert time.monotonic() < deadline, f"the driver did not reach event {k}"
            time.sleep(0.02)

    def finish(self, measure: Any = None, check: Any = None, timeout: float = 150.0) -> None:
        """Wait for the stream, check the invariants and progress, add ``measure()``'s
        figures (recovery times) and ``check(measures)``'s problems; fail listing them."""
        self.traffic.join()
        report = verify(
            self.name,
            self.deployment,
            self.traffic,
            self.outputs,
            self.redis,
            timeout=timeout,
            measures=self.measures,
        )
        final_batch(self.deployment, self.traffic, self.outputs, self.redis, report)
        if measure is not None:
            self.outputs.poll()
            report.measures.update(measure())
        if check is not None:
            report.problems += check(report.measures)
        report.fail_if_lost(self.deployment)

    def close(self) -> None:
        self.deployment.stop()
        self.traffic.close()
        self.outputs.close()
        self.redis.close()


@pytest.fixture
def run_factory(servers: Servers, tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def make(name: str, layout: str, monitor: bool = False) -> Run:
        r = Run(servers, tmp_path / name, name, layout, monitor)
        runs.append(r)
        return r

    try:
        yield make
    finally:
        for r in runs:
            r.close()


def _kill_and_measure(run: Run, role: str, k: int, topic: str) -> dict[str, Any]:
    """kill -9 ``role`` when the driver has sent ``k`` events; the supervisor restarts it."""
    run.at_event(k)
    proc = run.deployment.procs[role]
    starts = proc.starts
    t_kill = proc.kill9()
    deadline = time.monotonic() + 30
    while proc.starts == starts and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"role": role, "at_event": k, "t_kill": t_kill, "t_restart": proc.started_at[-1], "topic": topic}


def _recoveries(run: Run, kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds from each kill -9 to the restarted process's first output."""
    tails = {
        "predictions": run.outputs.predictions,
        "training_log": run.outputs.training_log,
        "drift": run.outputs.drift,
    }
    out = []
    for kill in kills:
        sent = run.traffic.ledger.sent_at if kill["topic"] == "predictions" else None
        rec = recovery(tails[kill["topic"]], kill["t_kill"], sent, output_after=kill["t_restart"])
        out.append({"role": kill["role"], "at_event": kill["at_event"], **rec})
    return out


def _restarted_in_time(measures: dict[str, Any]) -> list[str]:
    """A restarted process's first output must not wait out the group's session timeout."""
    problems = []
    for rec in measures["recovery"]:
        took = rec["first_output_s"]
        if took is None or took > RESTART_BOUND:
            when = "never came" if took is None else f"came after {took}s"
            problems.append(
                f"{rec['role']} killed at event {rec['at_event']}: the restarted process's first output "
                f"{when} (> {RESTART_BOUND:.0f}s: it waited for the consumer group's session timeout "
                "instead of rejoining as a static member)"
            )
    return problems


# -- kill -9 -----------------------------------------------------------------------------------


def test_kill9_role_all(run_factory: Any) -> None:
    """`weir worker SPEC` (role all) killed twice mid-stream; restarted 1 s after each kill."""
    run = run_factory("kill-all", "all")
    run.ready()
    run.stream(900, rate=100)
    k1, k2 = sorted(run.rng.sample(range(100, 800), 2))
    if k2 - k1 < 200:
        k2 = min(880, k1 + 200)
    kills = [_kill_and_measure(run, "all", k1, "predictions")]
    kills.append(_kill_and_measure(run, "all", k2, "predictions"))
    run.finish(lambda: {"recovery": _recoveries(run, kills)}, _restarted_in_time)


def test_kill9_scorer(run_factory: Any) -> None:
    """A `--role scorer` process killed mid-stream beside a running learner."""
    run = run_factory("kill-scorer", "split")
    run.ready()
    run.stream(800, rate=100)
    kills = [_kill_and_measure(run, "scorer", run.rng.randrange(150, 650), "predictions")]
    run.finish(lambda: {"recovery": _recoveries(run, kills)}, _restarted_in_time)


def test_kill9_learner(run_factory: Any) -> None:
    """The `--role learner` process killed mid-stream while the scorer goes on."""
    run = run_factory("kill-learner", "split")
    run.ready()
    run.stream(800, rate=100)
    kills = [_kill_and_measure(run, "learner", run.rng.randrange(250, 650), "training_log")]
    run.finish(lambda: {"recovery": _recoveries(run, kills)}, _restarted_in_time)


def test_kill9_monitor(run_factory: Any) -> None:
    """`weir monitor SPEC` killed mid-stream beside a role-all worker."""
    run = run_factory("kill-monitor", "all", monitor=True)
    run.ready()
    run.stream(800, rate=100)
    kills = [_kill_and_measure(run, "monitor", run.rng.randrange(250, 650), "drift")]
    run.finish(lambda: {"recovery": _recoveries(run, kills)}, _restarted_in_time)


# -- server outages ----------------------------------------------------------------------------


def _outage(run: Run, what: str, fault: Any, n: int = 1200, rate: float = 50) -> None:
    """Stream, run ``fault()`` (returns (start, end) wall times) at a seeded moment, check."""
    run.ready()
    run.stream(n, rate=rate)
    run.at_event(run.rng.randrange(100, 250))
    start, end = fault()
    run.measures["outage"] = {"what": what, "seconds": round(end - start, 1)}

    def measure() -> dict[str, Any]:
        rec = {
            "predictions": recovery(run.outputs.predictions, end, run.traffic.ledger.sent_at),
            "training_log": recovery(run.outputs.training_log, end),
        }
        if "monitor" in run.deployment.procs:
            rec["drift"] = recovery(run.outputs.drift, end)
        return {"recovery": rec}

    run.finish(measure)


def test_redis_sigstop(run_factory: Any) -> None:
    """Redis frozen (SIGSTOP) for 20-30 s under a role-all worker and a monitor."""
    run = run_factory("redis-stop", "all", monitor=True)
    seconds = run.rng.uniform(20, 30)
    _outage(run, f"redis SIGSTOP {seconds:.0f}s", lambda: pause(run.servers.redis, seconds))


def test_kafka_sigstop(run_factory: Any) -> None:
    """The broker frozen (SIGSTOP) for 20-30 s under a scorer, a learner and a monitor."""
    run = run_factory("kafka-stop", "split", monitor=True)
    seconds = run.rng.uniform(20, 30)
    _outage(run, f"kafka SIGSTOP {seconds:.0f}s", lambda: pause(run.servers.kafka, seconds))


def test_redis_restart(run_factory: Any) -> None:
    """Redis stopped (SIGTERM: it syncs its append-only file) and started again 3 s later,
    under a scorer, a learner and a monitor."""
    run = run_factory("redis-restart", "split", monitor=True)

    def restart() -> tuple[float, float]:
        t0 = time.time()
        run.servers.redis.stop()
        time.sleep(3)
        run.servers.redis.start()
        return t0, time.time()

    _outage(run, "redis restart (3 s down)", restart, n=1000, rate=100)


# -- malformed input ---------------------------------------------------------------------------


def test_malformed_barrage(run_factory: Any) -> None:
    """A malformed message after every second good event, of every kind: messages within
    1% of the broker's message.max.bytes, nesting 20,000 deep, invalid UTF-8, NaN, wrong
    types, absurd timestamps, missing fields, empty values, tombstones, late events; and
    bad labels. Under a role-all worker."""
    run = run_factory("barrage", "all")
    run.ready()
    run.stream(600, rate=100, bad_every=2, heavy=True)
    run.finish()


def test_kafka_restart(run_factory: Any) -> None:
    """The broker stopped (SIGTERM, a controlled shutdown) and started again on the same
    ports and data, under a scorer, a learner and a monitor. Last: it restarts the
    module's broker."""
    run = run_factory("kafka-restart", "split", monitor=True)

    def restart() -> tuple[float, float]:
        t0 = time.time()
        run.servers.kafka.stop()
        took = run.servers.kafka.start()
        run.measures["broker_start_s"] = round(took, 1)
        return t0, time.time()

    _outage(run, "kafka restart", restart, n=1000, rate=100)


def test_private_servers_are_private(servers: Servers) -> None:
    """The suite pauses only its own servers: neither is the shared stack's."""
    assert servers.kafka.port != 9092 and servers.redis.port != 6379
    assert servers.kafka.proc is not None and servers.redis.proc is not None
    assert servers.kafka.proc.poll() is None and servers.redis.proc.poll() is None
    # A paused server answers again once continued (the suite's own SIGSTOP/SIGCONT work).
    servers.redis.signal(signal.SIGSTOP)
    servers.redis.signal(signal.SIGCONT)
    assert servers.redis.ping()
