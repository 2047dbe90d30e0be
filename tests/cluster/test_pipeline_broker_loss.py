"""Weir on the cluster: 3 scorers + 1 learner + the monitor, 6 partitions, RF 3, min ISR 2,
on the Redis Cluster; kill -9 of one broker mid-stream: no event lost, labels learned ==
labels sent, the monitor still reading.

The topology and its settings-only configuration are :func:`tests.cluster.pipeline.pipeline_on_cluster`.
The broker killed leads partition 0 of the events topic; once the stream is in, it is
restarted (``cluster.py up kafka``) while the pipeline catches up, and the test ends with
3 brokers in the metadata. The Redis master's kill in the same topology is
test_redis_failover.py.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from streams import admin
from tests.cluster.conftest import Cluster, kill_broker, restart_kafka
from tests.cluster.pipeline import pipeline_on_cluster
from tests.integration.conftest import wait_for

N = 3000
RATE = 250.0


@pytest.mark.timeout(900)
def test_kill_a_broker_under_three_scorers_a_learner_and_the_monitor(
    cluster: Cluster, unique: str, tmp_path: Path
) -> None:
    with pipeline_on_cluster("cl", unique, tmp_path) as p, ThreadPoolExecutor(1) as pool:
        killed: int | None = None
        restarted: Future[None] | None = None
        try:
            stream = p.produce(N, RATE, run_id="bl")
            time.sleep(N / RATE / 3)  # a third of the stream in
            md = admin.admin_client(p.settings).list_topics(p.spec.topics.events, timeout=10)
            killed = md.topics[p.spec.topics.events].partitions[0].leader
            t_kill = time.monotonic()
            kill_broker(killed)
            assert not stream.done.is_set(), "the stream ended before the kill: nothing was tested"
            survivors = admin.admin_client(p.settings)
            wait_for(
                lambda: killed not in survivors.list_topics(timeout=10).brokers,
                60,
                f"broker {killed} to leave the cluster",
            )
            left_s = time.monotonic() - t_kill

            assert stream.done.wait(300), "weir produce did not finish with a broker down"
            stream.thread.join(5)
            assert stream.summary["events"] == N and stream.summary["labels"] == N
            restarted = pool.submit(restart_kafka)  # while the pipeline catches up

            _, distinct, duplicates = p.predictions(N)
            wait_for(
                lambda: p.learned() == N or p.any_dead(),
                240,
                f"labels learned == {N} labels sent",
            )
            wait_for(
                lambda: min(p.monitor_seen()) >= N or p.any_dead(),
                120,
                f"the monitor to read {N} predictions and examples",
            )
            caught_up_s = time.monotonic() - t_kill
            seen = p.monitor_seen()
            print(
                f"\nBROKER LOSS: pipeline ready in {p.ready_s:.1f}s; "
                f"killed broker {killed} (leader of events partition 0), out of the "
                f"metadata after {left_s:.1f}s; events {N}, predicted {distinct}, duplicates "
                f"{duplicates}; labels sent {N}, learned {p.learned()}, joins {p.joins()}; "
                f"monitor read {seen[0]} predictions, {seen[1]} examples, {caught_up_s:.1f}s after the kill"
            )
            p.assert_alive("with a broker down")
            assert distinct == N, f"{N - distinct} of {N} events have no prediction"
            assert duplicates == 0, f"{duplicates} predictions written twice"
            assert p.learned() == N, "a label learned twice"
            assert seen == (N, N), f"the monitor read {seen} (predictions, examples), not {N} of each"

            restarted.result()
            wait_for(
                lambda: len(survivors.list_topics(timeout=10).brokers) == 3, 120, "3 brokers in the metadata"
            )
        finally:
            if killed is not None and restarted is None:
                restart_kafka()
