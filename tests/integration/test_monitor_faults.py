"""The monitor under faults: kill -9 mid-shadow and mid-rollback-watch, and a Redis pause.

* A ``weir monitor`` process is killed with SIGKILL while a challenger is in shadow,
  restarted, killed again while the promoted champion is under rollback watch, and
  restarted once more. The verdicts it publishes, its training buffer and the registry
  must be those of the same stream fed to one uninterrupted :class:`Monitor` (the
  reference, offline): no state lost, no retrain run twice.
* A second monitor for the same pipeline fences the first out (static membership):
  the first exits with an error naming the cause, the second goes on from the
  checkpoint.
* A private redis-server (never the shared one) is paused with SIGSTOP for 20 s while
  the monitor holds a challenger in shadow, then killed -9 and restarted: the monitor
  stays alive, shows the outage in ``weir_dependency_up`` /
  ``weir_dependency_retries_total``, and when Redis returns it finishes the shadow
  (promotion) with every record read and the registry intact.

Checks are count-driven (``--check-seconds 3600``) so the live runs and the reference
take their decisions at the same records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from models.drift import DriftRecord
from models.registry import ModelRegistry
from streams.admin import delete_keys
from streams.monitor import CHECKPOINT
from tests.integration.conftest import wait_for
from tests.integration.private_redis import PrivateRedis
from tests.integration.processes import WeirProcess
from tests.integration.test_monitor import Running, drift_records
from tests.unit.test_retrain_monitor import (
    MemoryRegistry,
    agrawal_examples,
    feed_examples,
    make_spec,
    trained_champion,
)
from weir.errors import StackError
from weir.settings import Settings, load_settings
from weir.spec import PipelineSpec, load_spec

COOLDOWN = 3600  # one retrain per run, whatever the wall clock says


def _produce(settings: Settings, spec: PipelineSpec, records: list[dict[str, Any]]) -> None:
    producer = Producer({**settings.confluent_config(), "linger.ms": 20})
    for r in records:
        producer.produce(spec.topics.training_log, orjson.dumps(r), spec.model.name.encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def _checkpoint(registry: ModelRegistry) -> dict[str, Any]:
    raw = registry.client.get(registry.prefix + f"checkpointmeta:{CHECKPOINT}")
    return {} if raw is None else dict(orjson.loads(raw))


def _reference(spec: PipelineSpec, champion: Any, records: list[dict[str, Any]]) -> Any:
    reg = MemoryRegistry()
    reg.set_alias("champion", reg.save(champion, parent=None, trigger="initial", reason="r").id)
    return feed_examples(spec, records, reg)


def _verdicts(records: list[DriftRecord]) -> list[tuple[Any, ...]]:
    """(name, decision, value, candidate, incumbent, labels) of every promotion/rollback verdict."""
    out = []
    for r in records:
        if r.kind == "decision" and r.name in ("promotion", "rollback"):
            d = r.detail or {}
            out.append((r.name, r.statistic, r.value, d["candidate"], d["incumbent"], d["labels"]))
    return out


def test_kill_9_mid_shadow_and_mid_rollback_watch_loses_nothing(
    settings: Settings, make_topics: Any, redis_client: Any, consume_all: Any, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    spec_path = tmp_path / "mon.yaml"
    made = make_topics.for_spec(make_spec(cooldown=COOLDOWN), partitions=1)
    spec_path.write_text(yaml.safe_dump(made.model_dump(mode="json", by_alias=True)))
    spec = load_spec(spec_path)  # what the processes read (its spec_hash is the checkpoint's)
    champion = trained_champion(spec)
    records = agrawal_examples(spec, champion, [(6, 2000), (7, 2500)])
    ref, ref_out, moments = _reference(spec, champion, records)
    retrained_at, promoted_at = moments[0][0], moments[1][0]
    assert ref.promotions == ["v2"] and [v[:2] for v in _verdicts(ref_out)] == [
        ("promotion", "promote"),
        ("rollback", "keep"),
    ]
    cut1, cut2 = retrained_at + 200, promoted_at + 200  # mid-shadow, mid-rollback watch

    registry = ModelRegistry(redis_client, spec)
    registry.set_alias("champion", registry.save(champion, parent=None, trigger="initial", reason="r").id)
    args = ["monitor", str(spec_path), "--metrics-port", "0", "--check-every", "100"]
    args += ["--check-seconds", "3600"]
    procs: list[WeirProcess] = []
    try:
        # 1. Up to mid-shadow; checkpointed with the challenger in shadow; more records; kill -9.
        _produce(settings, spec, records[:cut1])
        procs.append(WeirProcess(args, tmp_path / "monitor-1.log", tmp_path / "data"))
        wait_for(
            lambda: _checkpoint(registry).get("examples_seen") == cut1,
            60,
            f"the first monitor to checkpoint {cut1} examples ({procs[0].tail(5)})",
        )
        assert _checkpoint(registry)["shadow"] == "v2" and registry.alias("challenger") == "v2"
        _produce(settings, spec, records[cut1:cut2])
        time.sleep(0.3)
        procs[0].kill()

        # 2. Restarted: finishes the shadow, promotes, watches; killed mid-watch.
        procs.append(WeirProcess(args, tmp_path / "monitor-2.log", tmp_path / "data"))
        wait_for(
            lambda: _checkpoint(registry).get("examples_seen") == cut2,
            60,
            f"the restarted monitor to checkpoint {cut2} examples ({procs[1].tail(5)})",
        )
        assert _checkpoint(registry)["guard"] == "v2" and registry.alias("champion") == "v2"
        _produce(settings, spec, records[cut2:])
        time.sleep(0.3)
        procs[1].kill()

        # 3. Restarted again (in this process, to look at its buffer): runs to the end.
        running = Running(spec, settings, ModelRegistry(redis_client, spec), check_seconds=3600)
        mon = running.monitor
        assert mon is not None
        wait_for(lambda: mon.examples_seen >= len(records), 60, "the last monitor to read every example")
        running.stop()

        assert mon.examples_seen == len(records) == ref.examples_seen
        assert [r["event_id"] for r in mon.buffer] == [r["event_id"] for r in ref.buffer]
        assert list(mon.positions) == list(ref.positions)
        assert mon.promotions == ["v2"] and mon.guard is None and mon.shadow is None
        live = _verdicts(drift_records(settings, consume_all, spec))
        # The same verdicts as the uninterrupted reference (a verdict replayed after a
        # kill in the instant before its checkpoint would repeat, identical).
        assert sorted(set(live)) == sorted(set(_verdicts(ref_out)))
        assert [v.id for v in registry.list()] == ["v1", "v2"], "a retrain ran twice"
        assert registry.alias("champion") == "v2" and registry.alias("challenger") is None
        assert registry.get("v2").meta["shadow"]["candidate"] == _verdicts(ref_out)[0][3]
    finally:
        for p in procs:
            p.stop()
        delete_keys(redis_client, spec.redis_prefix)
    print(f"\nkill -9 test: {time.monotonic() - t0:.1f}s")


def test_monitor_rides_out_a_20s_redis_pause_and_a_redis_restart(
    settings: Settings, make_topics: Any, consume_all: Any, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    private = load_settings(kafka_bootstrap=settings.kafka_bootstrap, redis_url=server.url, redis_timeout=2.0)
    spec = make_topics.for_spec(make_spec(cooldown=COOLDOWN), partitions=1)
    champion = trained_champion(spec)
    records = agrawal_examples(spec, champion, [(6, 2000), (7, 2000)])
    ref, ref_out, moments = _reference(spec, champion, records)
    assert ref.promotions == ["v2"]
    cut = moments[0][0] + 100  # the challenger is in shadow when Redis stops
    mid = cut + 150  # ... and still when it is killed and restarted

    client = server.client()
    registry = ModelRegistry(client, spec)
    registry.set_alias("champion", registry.save(champion, parent=None, trigger="initial", reason="r").id)
    prom = CollectorRegistry()

    def up() -> float | None:
        return prom.get_sample_value("weir_dependency_up", {"pipeline": spec.name, "dependency": "redis"})

    def retries() -> float:
        v = prom.get_sample_value(
            "weir_dependency_retries_total", {"pipeline": spec.name, "dependency": "redis"}
        )
        return v or 0.0

    running = None
    try:
        _produce(settings, spec, records[:cut])
        # registry=None: the monitor builds its own from the settings (WEIR_REDIS_URL).
        running = Running(spec, private, None, check_seconds=3600, metrics_registry=prom)
        mon = running.monitor
        assert mon is not None
        wait_for(lambda: _checkpoint(registry).get("examples_seen") == cut, 60, "the first checkpoint")
        assert mon.shadow is not None and up() == 1.0

        server.pause()
        paused = time.monotonic()
        _produce(settings, spec, records[cut:mid])
        wait_for(lambda: up() == 0.0, 30, "weir_dependency_up{redis} to show the pause")
        while time.monotonic() - paused < 20:
            assert running.thread.is_alive(), "the monitor exited during the Redis pause"
            time.sleep(0.5)
        assert mon.examples_seen < mid, "the monitor did not pause"
        assert retries() >= 1 and up() == 0.0
        server.resume()
        resumed = time.monotonic()
        wait_for(lambda: up() == 1.0, 30, "weir_dependency_up{redis} back to 1")
        back_after = time.monotonic() - resumed
        wait_for(lambda: mon.examples_seen >= mid, 60, f"the monitor to read {mid} examples")

        # Redis killed -9 and restarted from its append-only file: nothing acknowledged is lost.
        server.kill()
        _produce(settings, spec, records[mid:])
        time.sleep(3)
        assert running.thread.is_alive(), "the monitor exited while Redis was down"
        server.start()
        wait_for(lambda: mon.examples_seen >= len(records), 60, "the monitor to read every example")
        wait_for(
            lambda: _checkpoint(registry).get("examples_seen") == len(records), 30, "the last checkpoint"
        )
        assert running.thread.is_alive()
        running.stop()
        running = None
        assert mon.promotions == ["v2"] and registry.alias("champion") == "v2"
        assert [v.id for v in registry.list()] == ["v1", "v2"]
        assert sorted(set(_verdicts(drift_records(settings, consume_all, spec)))) == sorted(
            set(_verdicts(ref_out))
        )
        print(f"\nRedis paused 20 s: the monitor was working again {back_after:.1f}s after SIGCONT")
    finally:
        if running is not None:
            server.resume()
            running.stop()
        client.close()
        server.stop()


def test_a_second_monitor_fences_the_first_out(
    settings: Settings, make_topics: Any, redis_client: Any
) -> None:
    spec = make_topics.for_spec(make_spec(cooldown=COOLDOWN), partitions=1)
    champion = trained_champion(spec)
    registry = ModelRegistry(redis_client, spec)
    registry.set_alias("champion", registry.save(champion, parent=None, trigger="initial", reason="r").id)
    records = agrawal_examples(spec, champion, [(6, 600)])
    first = second = None
    try:
        _produce(settings, spec, records[:300])
        first = fenced = Running(spec, settings, registry, check_seconds=3600)
        mon1 = fenced.monitor
        assert mon1 is not None
        wait_for(lambda: mon1.examples_seen >= 300, 60, "the first monitor to read 300 examples")
        second = Running(spec, settings, registry, check_seconds=3600)
        wait_for(lambda: not fenced.thread.is_alive(), 60, "the first monitor to be fenced out")
        with pytest.raises(StackError, match=r"fatal Kafka error .*fenced.*another monitor"):
            fenced.stop()
        first = None
        _produce(settings, spec, records[300:])
        mon2 = second.monitor
        assert mon2 is not None
        wait_for(lambda: mon2.examples_seen >= 600, 60, "the second monitor to go on to 600 examples")
        second.stop()
        second = None
        assert mon2.examples_seen == 600  # resumed from the first one's checkpoint: nothing twice
    finally:
        for r in (first, second):
            if r is not None:
                r.stop_event.set()
                r.thread.join(20)
        delete_keys(redis_client, spec.redis_prefix)
