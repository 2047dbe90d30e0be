"""When to retrain (a pure policy) and how: fit a challenger on the training log.

:class:`RetrainPolicy` turns triggers (performance drift, feature drift on enough
features, a schedule, a manual request) into decisions, held back by a cooldown
and a minimum of fresh labels. Every decision, taken or not, is a ``decision``
:class:`~weir.contracts.DriftRecord` with its reason.

:func:`fit_challenger` fits a fresh model of the spec on the training-log window
(the last ``window_labels`` joined examples, not before the drift point), scores it
and the champion prequentially on the most recent ``holdout_fraction`` of it, and
returns both scores with a data hash and the window, so a retrain is reproducible
and auditable. The decision table is in ``docs/drift.md``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time as _time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from models.evaluation import PRIMARY_METRIC
from models.shadow import Score, metric_improvement
from weir.contracts import DriftRecord, finite_or_none
from weir.errors import ModelError

if TYPE_CHECKING:
    import pandas as pd

    from weir.spec import PipelineSpec, RetrainSpec

Trigger = Literal["performance", "features", "schedule", "manual"]
#: Columns of a training-log frame besides the features.
BASE_COLUMNS: tuple[str, ...] = ("event_id", "ts", "label", "prediction", "model_version")


class RetrainError(ModelError):
    """A retrain could not run (too little data, a bad frame)."""


# --------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Decision:
    """One retrain decision: fire or not, on which trigger, and why."""

    fire: bool
    trigger: str
    reason: str
    record: DriftRecord


class RetrainPolicy:
    """Decide when to retrain. Pure: the caller passes the clock and what it saw.

    Triggers, by priority: a manual request, performance drift (if
    ``on_performance_drift``), feature drift on at least ``min_feature_drifts``
    features, the ``schedule`` (seconds since the last retrain). A trigger stays
    pending until it fires, so a drift seen during the cooldown is not lost.
    Held back by, in order: ``enabled`` off, a challenger still in shadow (``busy``),
    the cooldown since the last retrain (a manual request skips it), fewer than
    ``min_fresh_labels`` labels since the later of the last retrain and the latest
    performance drift (those are the examples a challenger would learn the new
    concept from).

    Args:
        spec: the spec's ``retrain`` section.
        pipeline: the pipeline name (for the records).
        started: clock of the policy's start; the schedule counts from it.

    Examples:
        >>> from weir.spec import RetrainSpec
        >>> p = RetrainPolicy(RetrainSpec(cooldown=60, min_fresh_labels=100), "demo", started=0)
        >>> p.note_performance_drift("ADWIN on loss", now=10)
        >>> p.add_labels(40)
        >>> p.decide(now=20).reason
        'performance drift: ADWIN on loss; held: only 40 fresh labels < 100'
        >>> p.add_labels(60)
        >>> d = p.decide(now=30); d.fire, d.trigger
        (True, 'performance')
        >>> p.fired(now=30)
        >>> p.note_manual("operator asked", now=40)
        >>> p.add_labels(100)
        >>> p.decide(now=40).fire
        True
    """

    def __init__(self, spec: RetrainSpec, pipeline: str, started: float | None = None) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.started = _time.time() if started is None else started
        self.last_retrain: float | None = None
        self.fresh_labels = 0
        self.pending: dict[str, str] = {}
        self.drift_point: float | None = None

    # -- what the monitor saw --------------------------------------------------------
    def add_labels(self, n: int = 1) -> None:
        self.fresh_labels += n

    def note_performance_drift(self, reason: str, now: float, event_ts: float | None = None) -> None:
        """A performance detector fired: fresh labels count from here on."""
        if not self.spec.on_performance_drift:
            return
        self.pending["performance"] = f"performance drift: {reason}"
        self.fresh_labels = 0
        self.drift_point = event_ts if event_ts is not None else now

    def champion_changed(self) -> None:
        """Another model serves now (a promotion, a rollback, an operator's promote): a
        performance drift pending from the one it replaced was measured on that model's
        loss and must not retrain its successor. Feature drift (the inputs) stays."""
        self.pending.pop("performance", None)
        self.drift_point = None

    def note_feature_drift(self, features: Iterable[str]) -> None:
        """The features drifted at the latest check (replaces the previous list)."""
        names = sorted(features)
        if len(names) >= self.spec.min_feature_drifts:
            self.pending["features"] = (
                f"feature drift on {len(names)} features >= {self.spec.min_feature_drifts}: "
                + ", ".join(names)
            )
        else:
            self.pending.pop("features", None)

    def note_manual(self, reason: str, now: float) -> None:
        self.pending["manual"] = f"manual: {reason or 'requested'}"

    # -- the decision ------------------------------------------------------------------
    def decide(self, now: float, busy: str | None = None, model_version: str | None = None) -> Decision:
        s = self.spec
        if s.schedule is not None:
            since = now - (self.last_retrain if self.last_retrain is not None else self.started)
            if since >= s.schedule:
                self.pending.setdefault(
                    "schedule", f"schedule: {since:.0f}s since the last retrain >= {s.schedule:g}s"
                )
        trigger = next(
            (t for t in ("manual", "performance", "features", "schedule") if t in self.pending), None
        )
        detail: dict[str, Any] = {
            "fresh_labels": self.fresh_labels,
            "min_fresh_labels": s.min_fresh_labels,
            "pending": sorted(self.pending),
        }
        if trigger is None:
            return self._decision(
                False,
                "none",
                "no trigger: no performance drift, "
                f"fewer than {s.min_feature_drifts} drifted features, no schedule or request",
                now,
                model_version,
                detail,
            )
        why = self.pending[trigger]
        held = None
        if not s.enabled:
            held = "retrain disabled in the spec"
        elif busy:
            held = busy
        elif trigger != "manual" and self.last_retrain is not None and now - self.last_retrain < s.cooldown:
            held = f"cooldown: {s.cooldown - (now - self.last_retrain):.0f}s left"
        elif self.fresh_labels < s.min_fresh_labels:
            held = f"only {self.fresh_labels} fresh labels < {s.min_fresh_labels}"
        if held is not None:
            return self._decision(False, trigger, f"{why}; held: {held}", now, model_version, detail)
        return self._decision(True, trigger, why, now, model_version, detail)

    def fired(self, now: float) -> None:
        """The retrain ran (whatever its outcome): start the cooldown, clear the triggers."""
        self.last_retrain = now
        self.fresh_labels = 0
        self.pending.clear()

    def _decision(
        self, fire: bool, trigger: str, reason: str, now: float, mv: str | None, detail: dict
    ) -> Decision:
        rec = DriftRecord(
            time=now,
            pipeline=self.pipeline,
            model_version=mv,
            kind="decision",
            name="retrain",
            statistic=trigger,
            value=float(self.fresh_labels),
            threshold=float(self.spec.min_fresh_labels),
            drifted=fire,
            detail={"reason": reason, **detail},
        )
        return Decision(fire, trigger, reason, rec)


# --------------------------------------------------------------------------------------
# The training-log frame
# --------------------------------------------------------------------------------------


def train_log_frame(records: Iterable[Mapping[str, Any]], features: list[str] | None = None) -> pd.DataFrame:
    """Training-log records (:class:`~weir.contracts.TrainingRecord`) -> a frame: event_id,
    ts, label, prediction, model_version and one column per feature (missing features are
    NaN/None).

    ``features`` fixes the feature columns (default: every feature seen, sorted).
    The feature names are kept in ``frame.attrs["features"]``.

    Examples:
        >>> f = train_log_frame([{"event_id": "e1", "ts": 1.0, "label": "1",
        ...     "prediction": True, "model_version": "v1", "features": {"a": 2.0}}])
        >>> list(f.columns), f.attrs["features"]
        (['event_id', 'ts', 'label', 'prediction', 'model_version', 'a'], ['a'])
    """
    import pandas as pd

    recs = list(records)
    if features is None:
        seen: set[str] = set()
        for r in recs:
            seen.update((r.get("features") or {}).keys())
        features = sorted(seen)
    clash = sorted(set(features) & set(BASE_COLUMNS))
    if clash:
        raise RetrainError(
            f"feature name(s) {clash} clash with the training log's own columns "
            f"{list(BASE_COLUMNS)}; rename the feature(s) in the spec"
        )
    rows = []
    for r in recs:
        feats = r.get("features") or {}
        row = {c: r.get(c) for c in BASE_COLUMNS}
        row.update({f: feats.get(f) for f in features})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*BASE_COLUMNS, *features])
    frame["ts"] = frame["ts"].astype(float)
    frame.attrs["features"] = list(features)
    return frame


def retrain_token(
    pipeline: str, trigger: str, retrain_no: int, upto: Mapping[int, int], spec: RetrainSpec
) -> str:
    """The idempotency token of a retrain's ``registry.save``: a monitor that crashes after
    saving and replays the same records fires the same retrain (same trigger, same count of
    retrains before it, same training-log offsets seen, same window) and gets the version
    it saved back instead of a second one.

    Examples:
        >>> from weir.spec import RetrainSpec
        >>> a = retrain_token("demo", "manual", 3, {0: 10, 1: 7}, RetrainSpec())
        >>> a == retrain_token("demo", "manual", 3, {1: 7, 0: 10}, RetrainSpec())
        True
        >>> a == retrain_token("demo", "manual", 3, {0: 11, 1: 7}, RetrainSpec())
        False
    """
    import orjson

    canon = orjson.dumps(
        {
            "pipeline": pipeline,
            "trigger": trigger,
            "retrain": retrain_no,
            "upto": {str(p): int(o) for p, o in sorted(upto.items())},
            "window_labels": spec.window_labels,
            "window_seconds": spec.window_seconds,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return "retrain-" + hashlib.sha256(canon).hexdigest()[:32]


def load_backfill(path: str | Path, spec: PipelineSpec | None = None) -> pd.DataFrame:
    """A ``weir backfill`` file (JSON lines of training-log records) as a training-log
    frame for :func:`fit_challenger` (the spec fixes the feature columns)."""
    import orjson

    text = Path(path).read_bytes().splitlines()
    records = [orjson.loads(line) for line in text if line.strip()]
    return train_log_frame(records, features=spec.feature_names if spec is not None else None)


def data_hash(frame: pd.DataFrame) -> str:
    """sha256 of the frame's canonical bytes: columns sorted, CSV with full-precision floats."""
    canon = frame[sorted(frame.columns)].to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(canon.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Fitting a challenger
# --------------------------------------------------------------------------------------


@dataclass
class ChallengerResult:
    """A fitted challenger with its holdout comparison and provenance."""

    model: Any
    metric: str
    challenger_score: float
    champion_score: float
    rows: int
    train_rows: int
    holdout_rows: int
    data_hash: str
    window: dict[str, Any]
    fit_mode: str
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def improvement(self) -> float:
        return metric_improvement(self.metric, self.challenger_score, self.champion_score)

    def as_meta(self) -> dict[str, Any]:
        """What goes into the registry's version meta."""
        return {
            "metric": self.metric,
            "holdout_challenger": finite_or_none(self.challenger_score),
            "holdout_champion": finite_or_none(self.champion_score),
            "rows": self.rows,
            "train_rows": self.train_rows,
            "holdout_rows": self.holdout_rows,
            "data_sha256": self.data_hash,
            "window": self.window,
            "fit_mode": self.fit_mode,
            "fit_seconds": round(self.seconds, 4),
            **self.meta,
        }


def select_window(spec: PipelineSpec, frame: pd.DataFrame, since_ts: float | None = None) -> pd.DataFrame:
    """The rows a retrain uses, in canonical order (ts, event_id): those at or after
    ``since_ts`` (the drift point), at most the last ``retrain.window_labels``."""
    ordered = frame.sort_values(["ts", "event_id"], kind="mergesort").reset_index(drop=True)
    if since_ts is not None:
        ordered = ordered[ordered["ts"] >= since_ts]
    return ordered.tail(spec.retrain.window_labels).reset_index(drop=True)


def _can_learn_many(model: Any, task: str, X: pd.DataFrame) -> bool:
    from river import compose

    if task not in ("binary", "regression"):
        return False  # River's multiclass wrappers have no learn_many
    steps = list(model.steps.values()) if isinstance(model, compose.Pipeline) else [model]
    if not all(callable(getattr(s, "learn_many", None)) for s in steps):
        return False
    # Mini-batch learning needs a dense numeric frame (no categories, no gaps).
    return all(X[c].dtype.kind in "fiub" for c in X.columns) and not X.isna().to_numpy().any()


def fit_challenger(
    spec: PipelineSpec,
    frame: pd.DataFrame,
    *,
    champion: Any = None,
    since_ts: float | None = None,
    batch_size: int = 32,
    min_rows: int = 50,
) -> ChallengerResult:
    """Fit a fresh model of the spec on the retrain window and score it against the champion.

    The window (:func:`select_window`) is split in time: the most recent
    ``retrain.holdout_fraction`` is held out. The challenger learns the rest, with
    River's ``learn_many`` in mini-batches of ``batch_size`` where every step of the
    model has it and the features are dense numbers, else ``learn_one`` row by row.
    On the holdout both models are scored prequentially (predict, then learn) on
    copies for the champion, so the comparison is the one the shadow gate makes; the
    returned challenger has learned the holdout too. Without a ``champion`` model the
    champion's score is that of the predictions served for the holdout rows (the
    ``prediction`` column). Same frame -> same window, hash and model (River's linear
    models are deterministic; seed stochastic models in the spec's params).

    Raises:
        RetrainError: fewer than ``min_rows`` rows in the window.
    """
    import pandas as pd

    from models.factory import build_model, coerce_label, learn, model_input, predict

    t0 = _time.perf_counter()
    task = spec.task
    features = list(frame.attrs.get("features") or [c for c in frame.columns if c not in BASE_COLUMNS])
    window = select_window(spec, frame, since_ts)
    n = len(window)
    if n < min_rows:
        raise RetrainError(
            f"only {n} training-log rows in the retrain window (since_ts={since_ts!r}, "
            f"window_labels={spec.retrain.window_labels}); need >= {min_rows}: wait for labels"
        )
    n_hold = min(n - 1, max(1, round(n * spec.retrain.holdout_fraction)))
    n_train = n - n_hold
    labels = [coerce_label(v, spec) for v in window["label"]]
    X = window[features]
    model = build_model(spec.model)

    fit_mode = "learn_one"
    train_X = X.iloc[:n_train]
    if _can_learn_many(model, task, train_X):
        fit_mode = f"learn_many(batch={batch_size})"
        y = pd.Series(labels[:n_train], dtype=bool if task == "binary" else float)
        for i in range(0, n_train, batch_size):
            model.learn_many(train_X.iloc[i : i + batch_size], y.iloc[i : i + batch_size])
    else:
        for i, row in enumerate(train_X.to_dict("records")):
            learn(model, model_input(_clean(row)), labels[i], task)

    metric = PRIMARY_METRIC[task]
    ch_score, cp_score = Score(task), Score(task)
    champ = copy.deepcopy(champion) if champion is not None else None
    served = window["prediction"].tolist() if "prediction" in window.columns else [None] * n
    for i, row in enumerate(X.iloc[n_train:].to_dict("records"), start=n_train):
        x = model_input(_clean(row))
        y_i = labels[i]
        ch_score.update(y_i, predict(model, x, task)[0])
        learn(model, x, y_i, task)
        if champ is not None:
            cp_score.update(y_i, predict(champ, x, task)[0])
            learn(champ, x, y_i, task)
        else:
            cp_score.update(y_i, served[i])

    ts = window["ts"]
    span = {
        "ts_min": float(ts.min()),
        "ts_max": float(ts.max()),
        "since_ts": since_ts,
        "first_event_id": str(window["event_id"].iloc[0]),
        "last_event_id": str(window["event_id"].iloc[-1]),
        "rows_in_log": len(frame),
        "row_start": len(frame) - n,
        "row_end": len(frame),
        "holdout_from_ts": float(ts.iloc[n_train]),
    }
    return ChallengerResult(
        model=model,
        metric=metric,
        challenger_score=ch_score.value,
        champion_score=cp_score.value,
        rows=n,
        train_rows=n_train,
        holdout_rows=n_hold,
        data_hash=data_hash(window),
        window=span,
        fit_mode=fit_mode,
        seconds=_time.perf_counter() - t0,
        meta={"champion_scored": "model" if champ is not None else "served predictions"},
    )


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    # pandas turns a missing feature into NaN; the model sees it as absent.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
