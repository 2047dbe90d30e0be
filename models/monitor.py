"""The monitor's state and decisions, fed decoded records: no Kafka here.

:class:`Monitor` takes the served predictions (feature and prediction drift), the
training-log records (performance drift, fresh labels, the window a challenger is fitted
on, the shadow and rollback comparisons) and model-control requests; every
``check_every`` records it publishes a :class:`~weir.contracts.DriftRecord` per ready
statistic and asks the :class:`~models.retrain.RetrainPolicy`. When that fires: fit a
challenger -> ``registry.save`` -> alias ``challenger``; the
:class:`~models.shadow.ShadowGate` then promotes it (alias ``champion``) or rejects it;
after a promotion the :class:`~models.shadow.RollbackGuard` may point ``champion`` back
at the predecessor. :class:`Intake` feeds consumed records to it in order, each once.

:func:`streams.monitor.run_monitor` is the Kafka loop around these (consumer, drift
producer, checkpoints, outages); see ``docs/drift.md``.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from models.drift import DriftSuite, loss
from models.estimation import EstimateTracker
from models.retrain import RetrainPolicy, data_hash, fit_challenger, retrain_token, train_log_frame
from models.shadow import PendingPredictions, RollbackGuard, ShadowGate, Verdict
from weir.contracts import DriftRecord, control_message, json_object, training_record
from weir.types import version_of

if TYPE_CHECKING:
    from weir.metrics import MonitorMetrics
    from weir.spec import PipelineSpec

log = logging.getLogger("weir.monitor")

#: A record's place in its topic: (partition, offset).
Position = tuple[int, int]
#: Per topic and partition, the next offset the monitor's state has not applied.
Offsets = dict[str, dict[int, int]]
#: Bumped when the checkpoint's layout (:meth:`Monitor.state`) changes; an older one is
#: ignored.
CHECKPOINT_FORMAT = 1
#: The challenger's serve-time predictions kept for their labels, at most (the fair shadow).
SHADOW_PENDING_MAX = 100_000

Publish = Callable[[DriftRecord], None]
#: Reads a retrain's window back from the training log up to the given end offsets per
#: partition (:func:`streams.history.read_training_window`): a History (``records``,
#: ``lineage()``).
ReadHistory = Callable[[dict[int, int]], Any]


@dataclass
class _Shadow:
    version_id: str
    trigger: str
    model: Any
    gate: ShadowGate


@dataclass
class _Guard:
    champion_id: str
    predecessor_id: str | None
    model: Any
    guard: RollbackGuard


class Monitor:
    """The monitor's state and decisions, fed decoded messages (no Kafka here).

    Args:
        spec: the pipeline spec.
        registry: a ``models.registry.ModelRegistry`` (or anything with its API).
        publish: called with every DriftRecord (the drift topic producer).
        metrics: MonitorMetrics to update, or None.
        check_every: records (predictions + examples) between two checks.
        clock: wall clock, injectable for tests.
        history: reads a retrain's window from the training-log topic (durable); None, or a
            failed read, fits on the in-memory buffer instead.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        registry: Any,
        publish: Publish,
        metrics: MonitorMetrics | None = None,
        check_every: int = 500,
        clock: Callable[[], float] = time.time,
        history: ReadHistory | None = None,
    ) -> None:
        self.spec = spec
        self.history = history
        # Per training-log partition, the next offset applied: where a retrain's read ends.
        self.log_end: dict[int, int] = {}
        # The challenger's serve-time predictions awaiting their labels (the fair shadow).
        self.shadow_pending = _pending(spec)
        self.shadow_unpaired = 0
        self.registry = registry
        self.publish = publish
        self.metrics = metrics
        self.check_every = check_every
        self.clock = clock
        self.suite = DriftSuite(spec)
        # Label-free performance estimates (CBPE) of binary models, per version.
        self.estimates: EstimateTracker | None = (
            EstimateTracker(window=spec.drift.estimate_window) if spec.task == "binary" else None
        )
        self.policy = RetrainPolicy(spec.retrain, spec.name, started=clock())
        # Joined examples a challenger may be fitted on: at most window_labels are used.
        self.buffer: collections.deque[Mapping[str, Any]] = collections.deque(
            maxlen=spec.retrain.window_labels
        )
        # Their training-log positions (None when fed without one): what a restart reads back.
        self.positions: collections.deque[Position | None] = collections.deque(
            maxlen=spec.retrain.window_labels
        )
        # Decisions that moved the registry; the loop checkpoints when this changes.
        self.transitions = 0
        self.champion_id: str | None = registry.alias("champion")
        self.shadow: _Shadow | None = None
        self.guard: _Guard | None = None
        # Correctness (or abs error) of the served predictions of the current champion,
        # over the last rollback_labels labels: its "last known rolling metric".
        self._served: collections.deque[float] = collections.deque(maxlen=spec.retrain.rollback_labels)
        self._was_drifted: dict[tuple[str, str], bool] = {}
        # Examples kept out of the performance statistics: served by another version than
        # the champion (see _measures_champion).
        self.stale_examples = 0
        self.since_check = 0
        self.predictions_seen = 0
        self.examples_seen = 0
        self.checks = 0
        self.retrains = 0
        self.promotions: list[str] = []
        self.rollbacks: list[str] = []
        self.last_check = clock()

    # -- input ---------------------------------------------------------------------------
    def on_prediction(self, msg: dict[str, Any]) -> None:
        self.on_predictions([msg])

    def on_predictions(self, msgs: list[dict[str, Any]]) -> None:
        """Served predictions, a consumed batch at once (the statistics are vectorised)."""
        self.suite.observe_predictions([(m.get("features") or {}, m.get("prediction")) for m in msgs])
        if self.estimates is not None:
            for m in msgs:
                p = _p_true(m.get("proba"))
                if p is not None:
                    self.estimates.served(version_of(m.get("model_version") or "") or "", p)
        if self.shadow is not None:
            self._shadow_serve(msgs)
        self.predictions_seen += len(msgs)
        self._count(len(msgs))

    def _shadow_serve(self, msgs: list[dict[str, Any]]) -> None:
        """The fair shadow: the challenger predicts on the features as served, when they
        are served, like the champion did; kept by event id until the label comes."""
        from models.factory import model_input, predict

        assert self.shadow is not None
        for m in msgs:
            eid = m.get("event_id")
            if eid is None:
                continue
            pred = predict(self.shadow.model, model_input(m.get("features") or {}), self.spec.task)[0]
            ts = _float(m.get("ts"))
            self.shadow_pending.add(str(eid), math.nan if ts is None else ts, pred)

    def on_example(self, msg: Mapping[str, Any], pos: Position | None = None) -> None:
        """One training-log record (:class:`~weir.contracts.TrainingRecord`): event_id, ts,
        features, label, prediction, model_version.

        ``pos`` is its (partition, offset) in the training-log topic, kept beside the
        buffered record so that a restart can read the buffer back.
        """
        from models.factory import coerce_label, learn, model_input, predict

        if pos is not None and pos[1] + 1 > self.log_end.get(pos[0], 0):
            self.log_end[pos[0]] = pos[1] + 1
        y: Any = msg.get("label")
        served = msg.get("prediction")
        if y is None:
            log.warning("skipping a training-log record without a label: %r", msg.get("event_id"))
            return
        task = self.spec.task
        self.examples_seen += 1
        mv_full = msg.get("model_version")
        current = self._measures_champion(mv_full)
        if not current:
            self.stale_examples += 1
        if current and self.suite.observe_label(y, served):
            assert self.suite.performance is not None
            rec = self.suite.performance.record(self.spec.name, self.champion_id, self.clock())
            rec.detail = {
                **(rec.detail or {}),
                "event_id": msg.get("event_id"),
                "event_ts": msg.get("ts"),
                "labels_seen": self.examples_seen,
            }
            self._emit(rec)
            self.suite.performance.acknowledge()
            self.policy.note_performance_drift(
                f"{self.suite.performance.statistic.upper()} on loss at label "
                f"{self.examples_seen} (event {msg.get('event_id')})",
                now=self.clock(),
                event_ts=_float(msg.get("ts")),
            )
        if self.estimates is not None:
            p = _p_true(msg.get("proba"))
            if p is not None:
                # The label as the model learned it (classes[1] is True), checked by the learner.
                truth = bool(coerce_label(y, self.spec))
                self.estimates.labelled(version_of(mv_full or "") or "", p, truth)
        self.policy.add_labels(1)
        self.buffer.append(msg)
        self.positions.append(pos)
        mv = _version(mv_full)
        if current:
            err = loss(task, y, served)
            if not math.isnan(err):
                self._served.append(err)

        x = model_input(msg.get("features") or {})
        if self.shadow is not None:
            # Compared on the same event, both predictions made at serve time: the
            # challenger's was kept when the prediction record came (_shadow_serve).
            found, pred = self.shadow_pending.pop(str(msg.get("event_id")))
            if not found and self.shadow_pending.added == 0:
                # Fed no served predictions (an embedded monitor without the predictions
                # topic): the challenger predicts now, one label delay late.
                found, pred = True, predict(self.shadow.model, x, task)[0]
            learn(self.shadow.model, x, y, task)
            if not found:
                self.shadow_unpaired += 1  # served before the shadow began, or not kept
            else:
                verdict = self.shadow.gate.update(y, champion=served, challenger=pred)
                if verdict is not None:
                    self._settle_shadow(verdict)
        elif self.guard is not None:
            g = self.guard
            own = predict(g.model, x, task)[0]
            learn(g.model, x, y, task)
            # The served prediction once the learner serves the new version; until then
            # the monitor's own copy of it.
            new = served if mv == g.champion_id else own
            verdict = g.guard.update(y, champion=new)
            if verdict is not None:
                self._settle_guard(verdict)
        self._count()

    def _measures_champion(self, model_version: str | None) -> bool:
        """True if a training-log record's served prediction was made by the champion, so
        that it may feed the performance statistics (and the champion's served metric).

        The training log is in the order the learner joined the labels, not the order the
        events were served in: labels held because they came before their served record
        was found are joined seconds later, in blocks. After a promotion or a rollback
        (which re-bases the detector), such a block served by the version before, read as
        the new champion's loss, is a rise (or a fall, then a rise): a false performance
        drift, and a second retrain or a second rollback watch for nothing. Those records
        still count as fresh labels and still go to the buffer a challenger is fitted on.
        While no champion is known, and without a model version, a record counts.
        """
        version = _version(model_version)
        return version is None or self.champion_id is None or version == self.champion_id

    def on_control(self, msg: Mapping[str, Any]) -> None:
        if msg.get("command") == "retrain":
            reason = str(msg.get("reason") or "requested")
            log.info("manual retrain requested: %s", reason)
            self.policy.note_manual(reason, self.clock())
            self.check()
        else:
            log.warning("ignoring unknown model-control command %r", msg.get("command"))

    def _count(self, n: int = 1) -> None:
        self.since_check += n
        if self.since_check >= self.check_every:
            self.check()

    # -- periodic check --------------------------------------------------------------------
    def check(self) -> list[DriftRecord]:
        """Publish the statistics, then take (and publish) the retrain decision."""
        now = self.clock()
        self.since_check = 0
        self.last_check = now
        self.checks += 1
        self._follow_champion()
        out = self.suite.check(self.champion_id, now)
        out.extend(self._estimate_records(now))
        for rec in out:
            self._emit(rec)
        self.policy.note_feature_drift(self.suite.drifted_features())
        busy = None
        if self.shadow is not None:
            busy = (
                f"challenger {self.shadow.version_id} in shadow "
                f"({self.shadow.gate.labels}/{self.shadow.gate.labels_needed} labels)"
            )
        elif self.guard is not None:
            busy = (
                f"champion {self.guard.champion_id} under rollback watch "
                f"({self.guard.guard.champion.n}/{self.guard.guard.labels} labels)"
            )
        decision = self.policy.decide(now, busy=busy, model_version=self.champion_id)
        self._emit(decision.record)
        out.append(decision.record)
        if decision.fire:
            self._retrain(decision.trigger, decision.reason, now)
        elif decision.trigger != "none" and self.metrics is not None:
            self.metrics.retrains.labels(self.spec.name, decision.trigger, "skipped").inc()
        return out

    def _follow_champion(self) -> None:
        """Notice a champion set outside the monitor and watch it for rollback."""
        current = self.registry.alias("champion")
        if current == self.champion_id:
            return
        if self.shadow is not None and current == self.shadow.version_id:
            # Our own promotion, written before a crash and being replayed: the shadow
            # gate settles it again and moves champion_id there.
            return
        previous, self.champion_id = self.champion_id, current
        self.transitions += 1
        log.info("champion changed outside the monitor: %s -> %s", previous, current)
        self.suite.rebase()
        self.policy.champion_changed()
        if current is None or previous is None or self.guard is not None:
            return
        baseline = self._served_metric()
        try:
            model, _ = self.registry.load_live(current)
        except Exception as exc:  # a bad blob must not stop the monitor
            log.error("cannot load new champion %s for the rollback watch: %s", current, exc)
            return
        self._start_guard(current, previous, model, baseline)
        self._served.clear()

    def _served_metric(self) -> float | None:
        if not self._served:
            return None
        mean = sum(self._served) / len(self._served)
        return mean if self.spec.task == "regression" else 1.0 - mean

    # -- retrain, shadow, promotion, rollback ----------------------------------------------
    def _retrain(self, trigger: str, reason: str, now: float) -> None:
        since = self.policy.drift_point if trigger == "performance" else None
        self.policy.fired(now)
        self.retrains += 1
        self.transitions += 1
        try:
            frame, lineage, upto = self._retrain_frame()
            # The champion's holdout score is that of its served predictions: the live
            # champion learned online, its stored version did not.
            result = fit_challenger(self.spec, frame, since_ts=since)
            # The token: a monitor that crashes after the save and replays the same
            # records fires this retrain again and gets the same version back.
            version = self.registry.save(
                result.model,
                parent=self.champion_id,
                trigger=trigger,
                reason=reason,
                meta={**result.as_meta(), "history": lineage},
                token=retrain_token(self.spec.name, trigger, self.retrains, upto, self.spec.retrain),
            )
            self.registry.set_alias("challenger", version.id)
        except Exception as exc:  # RetrainError, a registry failure: the monitor goes on
            log.exception("retrain (%s) failed", trigger)
            self._decision("challenger", "failed", False, f"retrain failed: {exc}", now, trigger=trigger)
            self._count_retrain(trigger, "failed")
            return
        self._count_retrain(trigger, "trained")
        self._decision(
            "challenger",
            "trained",
            True,
            f"challenger {version.id} fitted on {result.train_rows} rows ({reason}); holdout "
            f"{result.metric} {result.challenger_score:.4f} vs champion "
            f"{result.champion_score:.4f}",
            now,
            value=result.improvement,
            challenger=version.id,
            trigger=trigger,
            **result.as_meta(),
        )
        gate = ShadowGate(
            self.spec.task,
            labels_needed=self.spec.retrain.shadow_labels,
            margin=self.spec.retrain.promote_margin,
        )
        self.shadow = _Shadow(version.id, trigger, result.model, gate)
        self.shadow_pending = _pending(self.spec)

    def _retrain_frame(self) -> tuple[Any, dict[str, Any], dict[int, int]]:
        """(frame, lineage, end offsets) of a retrain: the training log read back from Kafka
        up to the offsets applied (durable: the same after a restart or a replay), else the
        in-memory buffer (no reader, or the read failed: logged, recorded in the lineage)."""
        upto = dict(self.log_end)
        lineage: dict[str, Any] = {"source": "buffer"}
        records: list[Mapping[str, Any]] | None = None
        if self.history is not None:
            try:
                hist = self.history(upto)
                records, lineage = list(hist.records), hist.lineage()
            except Exception as exc:  # Kafka away: the buffer holds the newest examples too
                log.warning("retrain window not read from the training log (%s); fitting on the buffer", exc)
                lineage["history_error"] = str(exc)
        if records is None:
            records = list(self.buffer)
            spans: dict[int, list[int]] = {}
            for pos in self.positions:
                if pos is not None:
                    lo, hi = spans.get(pos[0], [pos[1], pos[1] + 1])
                    spans[pos[0]] = [min(lo, pos[1]), max(hi, pos[1] + 1)]
            ts = [t for t in (_float(r.get("ts")) for r in records) if t is not None]
            lineage.update(
                offsets={str(p): v for p, v in sorted(spans.items())},
                records_read=len(records),
                first_ts=min(ts) if ts else None,
                last_ts=max(ts) if ts else None,
            )
        frame = train_log_frame(records, features=self.spec.feature_names)
        lineage["rows"] = len(frame)
        lineage["frame_sha256"] = data_hash(frame)
        return frame, lineage, upto

    def _settle_shadow(self, verdict: Verdict) -> None:
        assert self.shadow is not None
        sh, self.shadow = self.shadow, None
        self.shadow_pending = _pending(self.spec)
        self.transitions += 1
        now = self.clock()
        rec = verdict.record(
            self.spec.name,
            self.champion_id,
            "promotion",
            now,
            margin=self.spec.retrain.promote_margin,
            challenger=sh.version_id,
        )
        self._emit(rec)
        self._annotate(sh.version_id, shadow=rec.detail)
        self.registry.set_alias("challenger", None)
        if verdict.decision != "promote":
            log.info("challenger %s rejected: %s", sh.version_id, verdict.reason)
            self._count_retrain(sh.trigger, "rejected")
            return
        predecessor = self.champion_id
        # The learner picks the challenger up as it learned in shadow, not as first fitted.
        try:
            self.registry.park(sh.model, sh.version_id, labels_learned=sh.gate.labels, by="monitor")
        except Exception as exc:  # the saved blob still serves; log and go on
            log.warning("could not park %s's shadow state: %s", sh.version_id, exc)
        self._switch_champion(sh.version_id)
        self.promotions.append(sh.version_id)
        log.info("challenger %s promoted: %s", sh.version_id, verdict.reason)
        self._count_retrain(sh.trigger, "promoted")
        if self.metrics is not None:
            self.metrics.promotions.labels(self.spec.name).inc()
        # The predecessor's last known metric: its score over the shadow labels.
        self._start_guard(sh.version_id, predecessor, sh.model, verdict.incumbent)

    def _start_guard(
        self, champion_id: str, predecessor: str | None, model: Any, baseline: float | None
    ) -> None:
        if predecessor is None or baseline is None:
            return
        guard = RollbackGuard(
            self.spec.task,
            labels=self.spec.retrain.rollback_labels,
            margin=self.spec.retrain.rollback_margin,
            baseline=baseline,
        )
        self.guard = _Guard(champion_id, predecessor, model, guard)

    def _switch_champion(self, version_id: str) -> None:
        """Move the champion alias (learner and scorers follow it) and re-baseline drift."""
        self.registry.set_alias("champion", version_id)
        self.champion_id = version_id
        self.suite.rebase()
        self.policy.champion_changed()
        self._served.clear()

    def _annotate(self, version_id: str, **meta: Any) -> None:
        """Record an outcome on a version's metadata; a failure is logged, never fatal."""
        try:
            self.registry.update_meta(version_id, **meta)
        except Exception as exc:
            log.warning("could not record %s on %s: %s", sorted(meta), version_id, exc)

    def _settle_guard(self, verdict: Verdict) -> None:
        assert self.guard is not None
        g, self.guard = self.guard, None
        self.transitions += 1
        now = self.clock()
        rec = verdict.record(
            self.spec.name,
            g.champion_id,
            "rollback",
            now,
            margin=self.spec.retrain.rollback_margin,
            predecessor=g.predecessor_id,
        )
        self._emit(rec)
        if verdict.decision != "rollback" or g.predecessor_id is None:
            return
        log.warning("rolling %s back to %s: %s", g.champion_id, g.predecessor_id, verdict.reason)
        self._switch_champion(g.predecessor_id)
        self._annotate(g.champion_id, rolled_back=rec.detail)
        self.rollbacks.append(g.champion_id)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(self.spec.name).inc()

    # -- durable state -----------------------------------------------------------------------
    def _estimate_records(self, now: float) -> list[DriftRecord]:
        """The label-free estimates (CBPE) of each version's served predictions: a record
        per metric for the champion (``kind="estimate"``, flagged below
        ``drift.estimate_min_accuracy``), and the gauges of every version."""
        if self.estimates is None:
            return []
        estimates, errors = self.estimates.estimates(), self.estimates.errors()
        m = self.metrics
        if m is not None:  # one series per live version: the gauges are rebuilt each check
            m.estimated_performance.clear()
            m.estimate_error.clear()
            for version, values in estimates.items():
                for metric, value in values.items():
                    if math.isfinite(value):
                        m.estimated_performance.labels(self.spec.name, version, metric).set(value)
            for version, err in errors.items():
                m.estimate_error.labels(self.spec.name, version).set(err)
        champion = version_of(self.champion_id or "") or ""
        current = estimates.get(champion)
        if current is None:
            return []
        floor = self.spec.drift.estimate_min_accuracy
        served = len(self.estimates.window_of(champion))
        out = []
        for metric, value in current.items():
            low = metric == "accuracy" and floor is not None and value < floor
            out.append(
                DriftRecord(
                    time=now,
                    pipeline=self.spec.name,
                    model_version=self.champion_id,
                    kind="estimate",
                    name=metric,
                    statistic="cbpe",
                    value=value,
                    threshold=floor if metric == "accuracy" and floor is not None else math.nan,
                    drifted=low,
                    detail={
                        "served": served,
                        "calibration_labels": self.estimates.calibrator.labels,
                        "estimate_error": errors.get(champion),
                    },
                )
            )
        return out

    def state(self) -> dict[str, Any]:
        """Everything a restart needs, picklable; the buffer as its training-log positions."""
        return {
            "format": CHECKPOINT_FORMAT,
            "champion_id": self.champion_id,
            "suite": self.suite,
            "policy": self.policy,
            "shadow": self.shadow,
            "guard": self.guard,
            "served": list(self._served),
            "was_drifted": dict(self._was_drifted),
            "positions": list(self.positions),
            "since_check": self.since_check,
            "counts": {
                "predictions_seen": self.predictions_seen,
                "examples_seen": self.examples_seen,
                "stale_examples": self.stale_examples,
                "checks": self.checks,
                "retrains": self.retrains,
                "transitions": self.transitions,
                "shadow_unpaired": self.shadow_unpaired,
            },
            "log_end": dict(self.log_end),
            "shadow_pending": self.shadow_pending,
            "promotions": list(self.promotions),
            "rollbacks": list(self.rollbacks),
            "estimates": self.estimates,
        }

    def restore(self, state: dict[str, Any], records: Mapping[Position, Mapping[str, Any]]) -> int:
        """Take up a :meth:`state`; ``records`` are the buffered examples read back by
        position. Returns how many buffered examples could not be read back."""
        self.champion_id = state["champion_id"]
        self.suite = state["suite"]
        self.policy = state["policy"]
        self.shadow = state["shadow"]
        self.guard = state["guard"]
        self._served.clear()
        self._served.extend(state["served"])
        self._was_drifted = dict(state["was_drifted"])
        self.since_check = int(state["since_check"])
        for name, value in state["counts"].items():
            setattr(self, name, int(value))
        self.promotions = list(state["promotions"])
        self.rollbacks = list(state["rollbacks"])
        if state.get("estimates") is not None:  # absent from checkpoints written before CBPE
            self.estimates = state["estimates"]
        # Absent from checkpoints written before the durable retrain and the fair shadow:
        # the end offsets are then those of the buffer's positions.
        ends: dict[int, int] = {}
        for pos in state["positions"]:
            if pos is not None:
                ends[int(pos[0])] = max(ends.get(int(pos[0]), 0), int(pos[1]) + 1)
        self.log_end = {int(p): int(o) for p, o in (state.get("log_end") or ends).items()}
        pending = state.get("shadow_pending")
        self.shadow_pending = pending if pending is not None else _pending(self.spec)
        self.buffer.clear()
        self.positions.clear()
        missing = 0
        for pos in state["positions"]:
            rec = records.get(tuple(pos)) if pos is not None else None  # type: ignore[arg-type]
            if rec is None:
                missing += 1
                continue
            self.buffer.append(rec)
            self.positions.append(pos)
        self.last_check = self.clock()
        return missing

    def reconcile(self) -> None:
        """Adopt a challenger the registry names but the restored state does not: a retrain
        saved in the moment between its registry write and the next checkpoint."""
        alias = self.registry.alias("challenger")
        if alias is None or (self.shadow is not None and self.shadow.version_id == alias):
            return
        try:
            model, version = self.registry.load(alias)
        except Exception as exc:  # a pruned or refused blob: no shadow to resume
            log.error("challenger %s named by the registry cannot be loaded: %s", alias, exc)
            return
        log.warning("adopting challenger %s, saved after the last checkpoint, into shadow", alias)
        self.policy.fired(self.clock())
        gate = ShadowGate(
            self.spec.task,
            labels_needed=self.spec.retrain.shadow_labels,
            margin=self.spec.retrain.promote_margin,
        )
        self.shadow = _Shadow(alias, version.trigger, model, gate)
        self.shadow_pending = _pending(self.spec)
        self.guard = None
        self.transitions += 1

    # -- output ----------------------------------------------------------------------------
    def _decision(
        self,
        name: str,
        statistic: str,
        drifted: bool,
        reason: str,
        now: float,
        value: float = math.nan,
        **detail: Any,
    ) -> None:
        self._emit(
            DriftRecord(
                time=now,
                pipeline=self.spec.name,
                model_version=self.champion_id,
                kind="decision",
                name=name,
                statistic=statistic,
                value=value,
                threshold=0.0,
                drifted=drifted,
                detail={"reason": reason, **detail},
            )
        )

    def _count_retrain(self, trigger: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.retrains.labels(self.spec.name, trigger, outcome).inc()

    def _emit(self, rec: DriftRecord) -> None:
        m = self.metrics
        if m is not None and rec.kind != "decision":
            if math.isfinite(rec.value):
                m.drift_statistic.labels(self.spec.name, rec.kind, rec.name, rec.statistic).set(rec.value)
            m.drift_detected.labels(self.spec.name, rec.kind, rec.name).set(int(rec.drifted))
            key = (rec.kind, rec.name)
            # Count detections, not checks: a statistic that stays past its threshold
            # counts once; every performance detection counts.
            if rec.drifted and (rec.kind == "performance" or not self._was_drifted.get(key)):
                m.drift_events.labels(self.spec.name, rec.kind).inc()
            self._was_drifted[key] = rec.drifted
        self.publish(rec)


class Intake:
    """Feeds consumed records to a :class:`Monitor` in order, and each one once.

    ``offsets`` are, per topic and partition, the next offset the monitor's state has not
    applied: the checkpoint's, then moved on as records are applied (the dict is updated
    in place; :func:`run_monitor` checkpoints it with the state). A record below them is
    one the state already covers, delivered again after a seek to the checkpoint, a
    rebalance or a fetch reset: it is skipped (counted in ``replayed``), so a replay never
    feeds the detectors, the shadow gate or the rollback watch twice. Predictions are
    applied as one vectorised batch at :meth:`flush`; a record of another topic flushes
    them first, so the order across topics holds.
    """

    def __init__(self, monitor: Monitor, offsets: Offsets | None = None) -> None:
        self.monitor = monitor
        self.offsets: Offsets = offsets if offsets is not None else {}
        self.replayed = 0
        self._predictions: list[dict[str, Any]] = []
        self._pending: dict[tuple[str, int], int] = {}  # offsets of predictions not yet applied

    def covered(self, topic: str, partition: int, offset: int) -> bool:
        """True if the record at ``offset`` was applied (or is about to be, at flush)."""
        nxt = self.offsets.get(topic, {}).get(partition)
        if nxt is not None and offset < nxt:
            return True
        last = self._pending.get((topic, partition))
        return last is not None and offset <= last

    def add(self, topic: str, partition: int, offset: int, value: bytes | None) -> bool:
        """Apply one record; False if it was a replay of one already applied (skipped)."""
        if self.covered(topic, partition, offset):
            self.replayed += 1
            return False
        try:
            obj = json_object(value)
        except orjson.JSONDecodeError:
            log.warning("skipping non-JSON message on %s @%s", topic, offset)
            obj = None
        t = self.monitor.spec.topics
        if topic == t.predictions:
            if obj is not None:
                self._predictions.append(obj)  # fed as one vectorised batch
            self._pending[(topic, partition)] = offset
            return True
        self.flush()  # keep the order across topics
        if obj is not None:
            if topic == t.training_log:
                self.monitor.on_example(training_record(obj), (partition, offset))
            elif topic == t.model_control:
                self.monitor.on_control(control_message(obj))
        self._mark(topic, partition, offset)
        return True

    def flush(self) -> None:
        """Apply the predictions held for their batch."""
        if self._predictions:
            self.monitor.on_predictions(self._predictions)
            self._predictions.clear()
        for (topic, p), o in self._pending.items():
            self._mark(topic, p, o)
        self._pending.clear()

    def _mark(self, topic: str, partition: int, offset: int) -> None:
        self.offsets.setdefault(topic, {})[partition] = offset + 1


def _version(model_version: Any) -> str | None:
    """A record's model version as its registry version (:func:`weir.types.version_of`)."""
    return None if model_version is None else version_of(str(model_version))


def _p_true(proba: Any) -> float | None:
    """P(True) of a binary prediction's ``proba`` (keys are the classes as strings)."""
    if not isinstance(proba, Mapping):
        return None
    p = proba.get("True", proba.get("1", proba.get("true")))
    try:
        return float(p) if p is not None else None
    except (TypeError, ValueError):
        return None


def _pending(spec: PipelineSpec) -> PendingPredictions:
    """The fair shadow's pending predictions: a label later than the horizon (plus the
    lateness an event's ts may lag by) is never joined."""
    return PendingPredictions(SHADOW_PENDING_MAX, spec.labels.horizon + spec.lateness)


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None
