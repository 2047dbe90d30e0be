"""Where a scoring worker's model comes from, and the in-process learner of role ``all``.

* :class:`LiveModel` (role ``all``): the scorer reads the very model object an embedded
  :class:`models.learner.LearnerCore` learns, in the same event loop, so there is one
  writer and every prediction uses everything learned so far. Predictions name the
  model version (``v1``...). The embedded learner is :class:`streams.learner.LearnerLoop`,
  the same crash-safe step as role ``learner`` (manual assignment at the snapshot's
  offsets, flush before snapshot, retries through outages), run as a Faust app task: its
  Kafka and Redis calls on a thread of its own, its learning on the event loop's thread
  (River models are not thread-safe; the scorer only reads the model). If it fails for
  good (not an outage: a bug), the worker exits with status 70 like a failed agent
  (:func:`streams.worker.exit_process`), for its supervisor to restart it: it never stays
  alive without learning.
* :class:`SnapshotFollower` (role ``scorer``): between batches, at most every
  ``poll_seconds``, one Redis GET asks for the learner's latest snapshot; a newer one is
  loaded (its sha256/HMAC checked first) and swapped in atomically for the next batch.
  Predictions name the snapshot (``v1.42``: version 1, 42nd snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from models.learner import LearnerCore
from weir.errors import ModelError
from weir.metrics import LearnerMetrics
from weir.settings import Settings
from weir.spec import PipelineSpec

log = logging.getLogger("weir.worker")


class LiveModel:
    """The embedded learner's live model (role ``all``)."""

    def __init__(self, core: Any, name: str) -> None:
        self.core: LearnerCore = core
        self.name = name
        self._version = str(core.version_id)

    def current(self) -> tuple[Any, str, str]:
        return self.core.model, self.name, str(self.core.version_id)

    def refresh(self) -> bool:
        # A promotion or rollback moves the champion alias; the embedded learner follows
        # it (every second, off the event loop). Here no Redis call: True once it swapped.
        version = str(self.core.version_id)
        if version == self._version:
            return False
        self._version = version
        return True

    def age_seconds(self) -> float:
        return 0.0

    def attach_metrics(self, registry: Any) -> None:
        """The embedded learner exports its metrics on the worker's registry."""
        self.core.metrics = LearnerMetrics(registry).init_series(self.core.spec)


class SnapshotFollower:
    """Scores with the learner's newest snapshot (role ``scorer``)."""

    def __init__(self, registry: Any, name: str, poll_seconds: float = 0.5) -> None:
        self.registry = registry
        self.name = name
        self.poll_seconds = poll_seconds
        self.model: Any = None
        self.snapshot_id: str | None = None
        self.created = time.time()
        self._checked = 0.0

    def load_initial(self, timeout: float = 120.0) -> None:
        """Wait for the learner's first snapshot (or the champion) before scoring."""
        deadline = time.time() + timeout
        warned = False
        while True:
            if self._load_latest():
                return
            champion = self.registry.alias("champion")
            if champion is not None:
                self.model, mv = self.registry.load(champion)
                self.snapshot_id, self.created = champion, mv.created
                return
            if time.time() > deadline:
                raise ModelError(
                    f"no model to score with after {timeout:.0f}s: no snapshot and no champion in the "
                    "registry; start the learner (`weir worker SPEC --role learner`) or run one worker "
                    "with `--role all`"
                )
            if not warned:
                log.warning(
                    "waiting for the learner's first snapshot (start `weir worker SPEC --role learner`)"
                )
                warned = True
            time.sleep(0.5)

    def _load_latest(self) -> bool:
        sid = self.registry.latest_snapshot()
        if sid is None or sid == self.snapshot_id:
            return False
        model, meta = self.registry.load_snapshot(sid)
        self.model, self.snapshot_id, self.created = model, sid, float(meta["created"])
        return True

    def current(self) -> tuple[Any, str, str]:
        return self.model, self.name, str(self.snapshot_id)

    def refresh(self) -> bool:
        now = time.time()
        if now - self._checked < self.poll_seconds:
            return False
        self._checked = now
        try:
            return self._load_latest()
        except ModelError as exc:  # a pruned or refused snapshot: keep scoring with ours
            log.error("keeping snapshot %s: %s", self.snapshot_id, exc)
            return False

    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created)


def _registry(spec: PipelineSpec, settings: Settings) -> Any:
    from models.registry import ModelRegistry, registry_key

    return ModelRegistry(settings.redis(), spec, key=registry_key(settings))


def snapshot_wiring(spec: PipelineSpec, settings: Settings) -> tuple[SnapshotFollower, Any]:
    """Role ``scorer``: the learner's snapshots, and the served store the learner joins on."""
    from models.join import ServedStore

    follower = SnapshotFollower(_registry(spec, settings), spec.model.name)
    follower.load_initial()
    return follower, ServedStore(spec)


def live_wiring(spec: PipelineSpec, settings: Settings) -> tuple[LiveModel, Any, Any]:
    """Role ``all``: an embedded learner on the labels topic sharing the scorer's model."""
    from models.join import ServedStore
    from streams.learner import LearnerLoop, start_core
    from weir.resilience import DependencyHealth

    core = start_core(spec, settings)
    live = LiveModel(core, spec.model.name)

    def hook(app: Any) -> None:
        # Metrics are attached (live.attach_metrics) before the hook runs.
        registry = core.metrics.registry if core.metrics is not None else None
        learner = LearnerLoop(spec, settings, core, health=DependencyHealth(registry, spec.name), linger_ms=5)

        @app.task
        async def learn_labels() -> None:
            try:
                await learner.run_async()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # not an outage (those are retried): a bug
                from streams.worker import exit_process

                exit_process("the embedded learner", exc)

    return live, ServedStore(spec), hook
