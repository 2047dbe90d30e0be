"""The Faust scoring worker: a thin agent around :class:`streams.scoring.Scorer`.

Roles:

* ``all`` (default, one process): scores events with the LIVE model and learns from
  labels in the same process, so every prediction uses everything learned so far.
* ``scorer``: scores only, following the learner's snapshots (swapped in between
  batches); run as many as the events topic has partitions, in one consumer group.
* ``learner``: joins labels and learns (see :mod:`streams.learner`); run exactly one.

Delivery is at-least-once: predictions and dead letters are flushed to Kafka before
a batch's offsets can be committed, and features are idempotent by ``event_id``, so a
redelivered event is scored again from the features first served for it. Consumers
of the predictions topic de-duplicate by ``event_id``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from streams.contracts import dead_letter_key, encode_dead_letter, encode_prediction
from streams.scoring import BatchOutput, ModelSource, RawMessage, Scorer
from weir.errors import StackError
from weir.metrics import MetricsServer, WorkerMetrics
from weir.settings import Settings
from weir.spec import PipelineSpec

log = logging.getLogger("weir.worker")

Role = Literal["all", "scorer"]


class KafkaOutput:
    """Produces predictions and dead letters with confluent-kafka; ``flush`` awaits delivery."""

    def __init__(self, spec: PipelineSpec, settings: Settings) -> None:
        from confluent_kafka import Producer

        conf = settings.confluent_config()
        conf.update({"linger.ms": 5, "enable.idempotence": True, "compression.type": "lz4"})
        self.producer = Producer(conf)
        self.spec = spec
        self.errors: list[str] = []

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")

    def emit(self, out: BatchOutput) -> None:
        t = self.spec.topics
        produce = self.producer.produce
        for p in out.predictions:
            produce(t.predictions, encode_prediction(p), p.entity_id.encode(), on_delivery=self._on_delivery)
        for d in out.dead_letters:
            produce(t.dead_letters, encode_dead_letter(d), dead_letter_key(d), on_delivery=self._on_delivery)
        self.producer.poll(0)

    async def flush(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        left = await loop.run_in_executor(None, self.producer.flush, timeout)
        if left or self.errors:
            errs, self.errors = self.errors[:5], []
            raise StackError(
                f"could not deliver {left} message(s) to Kafka at {self.spec.topics.predictions!r} "
                f"within {timeout}s (errors: {errs}); the batch will be redelivered after restart"
            )


def create_app(
    spec: PipelineSpec,
    settings: Settings,
    *,
    role: Role = "all",
    models: ModelSource | None = None,
    metrics: WorkerMetrics | None = None,
) -> Any:
    """The Faust app of a scoring worker for ``spec``."""
    import faust

    from features.online import RedisFeatureStore

    datadir = (Path(settings.data_dir) / "faust" / spec.name).resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        spec.consumer_group,
        broker=settings.faust_broker(),
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=spec.topics.partitions,
        topic_replication_factor=spec.topics.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 4 * spec.scoring.batch_size),
        **settings.faust_broker_options(),
    )
    events = app.topic(spec.topics.events, key_serializer="raw", value_serializer="raw")
    features = RedisFeatureStore(spec)
    state: dict[str, Any] = {}

    served: Any = None
    learner_hook: Any = None
    if models is None:
        from streams.live import live_wiring, snapshot_wiring

        if role == "all":
            live, served, learner_hook = live_wiring(spec, settings)
            if metrics is not None:
                live.attach_metrics(metrics.registry)
            models = live
        else:
            models, served = snapshot_wiring(spec, settings)
    scorer = Scorer(spec, features, models, metrics, served)
    _observe_model(spec, metrics, scorer.models)

    async def _redis() -> Any:
        if "redis" not in state:
            state["redis"] = settings.redis_async()
        return state["redis"]

    @app.agent(events, concurrency=1)
    async def score(stream: Any) -> None:
        output = KafkaOutput(spec, settings)
        state["output"] = output
        try:
            await _score_loop(stream, output)
        finally:
            output.producer.flush(10)
            if "redis" in state:
                await state.pop("redis").aclose()

    async def _score_loop(stream: Any, output: KafkaOutput) -> None:
        async for batch in stream.take_events(spec.scoring.batch_size, within=spec.scoring.batch_within):
            t0 = time.perf_counter()
            msgs = [
                RawMessage(
                    e.message.value,
                    e.message.key,
                    e.message.topic,
                    e.message.partition,
                    e.message.offset,
                    e.message.timestamp,
                )
                for e in batch
            ]
            follow()
            redis = await _redis()
            out = await scorer.process(msgs, redis)
            output.emit(out)
            await asyncio.gather(scorer.record_served(out, redis), output.flush())
            scorer.observe(msgs, out, time.perf_counter() - t0)
            _observe_lag(app, spec, metrics, batch)

    def follow() -> None:
        """Swap in a newer model if there is one (the sources throttle their own checks)."""
        if scorer.models.refresh():
            _, name, version = scorer.models.current()
            log.info("now scoring with %s %s", name, version)
            _observe_model(spec, metrics, scorer.models)

    @app.timer(1.0)
    async def follow_model() -> None:
        # Idle scorers follow snapshots and promotions too; a batch in flight keeps the
        # model it started with (it reads the model once, between awaits it does not).
        follow()
        _observe_model(spec, metrics, scorer.models)  # also ages the snapshot gauge

    if learner_hook is not None:
        learner_hook(app)

    return app


def _observe_lag(app: Any, spec: PipelineSpec, metrics: WorkerMetrics | None, batch: Any) -> None:
    if metrics is None or not batch:
        return
    last: dict[Any, int] = {}
    for e in batch:
        last[e.message.tp] = e.message.offset
    for tp, offset in last.items():
        try:
            hw = app.consumer.highwater(tp)
        except Exception:
            continue
        if hw is not None:
            metrics.lag.labels(spec.name, tp.topic, str(tp.partition)).set(max(0, hw - offset - 1))


def _observe_model(spec: PipelineSpec, metrics: WorkerMetrics | None, models: ModelSource) -> None:
    if metrics is None:
        return
    _, name, version = models.current()
    metrics.model_version.clear()
    metrics.model_version.labels(spec.name, name, version).set(1)
    metrics.snapshot_age.labels(spec.name, name).set(models.age_seconds())


def run_worker(
    spec: PipelineSpec,
    settings: Settings,
    *,
    role: Role = "all",
    faust_args: list[str] | None = None,
    metrics_port: int | None = None,
) -> int:
    """Run a scoring worker until SIGINT/SIGTERM. Faust's worker options pass through."""
    from prometheus_client import CollectorRegistry

    from streams.admin import check_broker, check_redis, ensure_topics

    check_broker(settings)
    check_redis(settings)
    ensure_topics(settings, spec)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry).init_series(spec)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = MetricsServer(registry, settings.metrics_host, port)
    log.info("metrics at %s", server.url)
    app = create_app(spec, settings, role=role, metrics=metrics)
    argv = ["weir-worker", "worker", *(faust_args or ["--without-web", "-l", "info"])]
    old = sys.argv
    sys.argv = argv
    try:
        app.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
        server.stop()
    return 0
