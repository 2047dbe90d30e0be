"""The pipeline spec: one YAML file that describes a whole Weir pipeline.

``load_spec(path)`` parses and validates it and raises :class:`~weir.errors.SpecError`
listing every fault as ``field.path: what is wrong (got value); the fix``.
Durations accept ``'30s'``, ``'5m'``, ``'1h'``, ``'1d'`` or seconds and are stored
as float seconds. Every key is documented in ``docs/spec.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from weir.durations import format_duration, parse_duration
from weir.errors import SpecError

Task = Literal["binary", "multiclass", "regression"]
FieldType = Literal["numeric", "categorical", "boolean"]
Agg = Literal["raw", "count", "sum", "mean", "min", "max", "std", "last", "distinct", "since_prev"]
#: Aggregates that need a numeric (or boolean, read as 0/1) field.
NUMERIC_AGGS: frozenset[str] = frozenset({"sum", "mean", "min", "max", "std"})
#: Aggregates that need no field at all.
FIELDLESS_AGGS: frozenset[str] = frozenset({"count", "since_prev"})

Duration = Annotated[float, BeforeValidator(parse_duration)]
_NAME_RX = re.compile(r"^[a-z][a-z0-9_]*$")


def _int_name(v: Any) -> Any:
    """A field named by an unquoted integer in YAML (River's SEA keys its features 0, 1, 2)
    is that integer's string form, as the events carry it."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _int_keys(v: Any) -> Any:
    if isinstance(v, dict):
        return {_int_name(k): val for k, val in v.items()}
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TopicsSpec(_Strict):
    """Topic names; each defaults to ``weir.<pipeline>.<role>``."""

    events: str = ""
    labels: str = ""
    predictions: str = ""
    dead_letters: str = ""
    drift: str = ""
    model_control: str = ""
    training_log: str = ""
    partitions: int = Field(6, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)
    #: Kafka's ``min.insync.replicas`` of each topic Weir creates: with the producers'
    #: ``acks=all``, a write is acknowledged once this many replicas have it. None: the
    #: broker's default (not set on the topic).
    min_insync_replicas: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="after")
    def _insync_fits(self) -> TopicsSpec:
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"topics.min_insync_replicas is {self.min_insync_replicas}, more than "
                f"topics.replication_factor {self.replication_factor}: no write could ever be "
                "acknowledged; use at most the replication factor (2 with a factor of 3)"
            )
        return self

    def names(self) -> dict[str, str]:
        """Role -> topic name for every topic of the pipeline."""
        return {
            role: getattr(self, role)
            for role in (
                "events",
                "labels",
                "predictions",
                "dead_letters",
                "drift",
                "model_control",
                "training_log",
            )
        }


class FieldSpec(_Strict):
    """A raw field of an event's ``data``."""

    type: FieldType
    required: bool = True


def _field_shorthand(v: Any) -> Any:
    # ``amount: numeric`` is short for ``amount: {type: numeric}``.
    return {"type": v} if isinstance(v, str) else v


class FeatureSpec(_Strict):
    """One feature: an aggregate of a field over an event-time window of the entity.

    The window of an event at time ``ts`` is ``(ts - window, ts]`` over the events of
    the same entity that arrived no later than it (see docs/features.md).
    """

    name: str = ""
    agg: Agg
    field: Annotated[str | None, BeforeValidator(_int_name)] = None
    window: Duration | None = None

    @field_validator("window")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(f"window must be > 0 seconds, got {v!r}; use e.g. '5m'")
        return v

    @model_validator(mode="after")
    def _shape(self) -> FeatureSpec:
        if self.agg == "raw":
            if self.field is None:
                raise ValueError("agg 'raw' needs a `field`: the raw field to pass through")
            if self.window is not None:
                raise ValueError("agg 'raw' takes no `window`: remove it")
        else:
            if self.window is None:
                raise ValueError(f"agg {self.agg!r} needs a `window`, e.g. window: 1h")
            if self.agg not in FIELDLESS_AGGS and self.field is None:
                raise ValueError(f"agg {self.agg!r} needs a `field` to aggregate")
        if not self.name:
            parts = [self.field or "events"]
            if self.agg != "raw":
                parts.append(self.agg)
                if self.window is not None:
                    parts.append(format_duration(self.window))
            name = "_".join(parts)
            # A field named by a number (River's SEA: 0, 1, 2) gives "f_0", "f_1_mean_5m".
            object.__setattr__(self, "name", f"f_{name}" if name[:1].isdigit() else name)
        if not _NAME_RX.match(self.name):
            raise ValueError(f"feature name must match [a-z][a-z0-9_]*, got {self.name!r}; rename it")
        return self


class ComponentSpec(_Strict):
    """A River estimator (or optimizer, loss, ...) by dotted path, with parameters.

    A parameter that is itself a mapping with a ``class`` key is built as a component.
    """

    cls: str = Field(alias="class")
    params: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("cls")
    @classmethod
    def _dotted(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$", v):
            raise ValueError(
                f"class must be a dotted path like 'river.linear_model.LogisticRegression', got {v!r}"
            )
        return v


def _component_shorthand(v: Any) -> Any:
    return {"class": v} if isinstance(v, str) else v


class ModelSpec(_Strict):
    """The model: River components chained into a pipeline, first to last."""

    name: str = ""
    steps: list[Annotated[ComponentSpec, BeforeValidator(_component_shorthand)]] = Field(min_length=1)
    features: list[str] | None = None
    """The features the model reads (default: all). The others are still computed,
    served with each prediction and watched for drift."""


class LabelsSpec(_Strict):
    """How labels join the served features."""

    horizon: Duration = 3600.0
    """How long the served features of an event wait for its label."""

    @field_validator("horizon")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"horizon must be > 0 seconds, got {v!r}; use e.g. '1h'")
        return v


class ScoringSpec(_Strict):
    """The scoring worker's batching and input limits."""

    batch_size: int = Field(500, ge=1, le=100_000)
    batch_within: Duration = 0.002
    """After a batch's first event, how long to wait for more (``batch_size`` at most): the
    events of one Kafka fetch, handed over one at a time, come within 2 ms; a longer wait
    adds itself to the latency of a stream too slow to fill batches (docs/spec.md)."""
    max_idle: Duration = 1.0
    """Role ``all``: how long the scorer waits for labels (and the learner for events) to
    take both topics in event-time order when they hold a backlog; 0 never waits."""
    max_event_bytes: int = Field(65_536, ge=256)
    min_ts: float = 946_684_800.0
    """Events before this epoch time (default 2000-01-01) are dead-lettered as absurd."""
    max_future: Duration = 86_400.0
    """Events further than this in the future of the worker's clock are dead-lettered."""
    dedupe_horizon: Duration = 120.0
    """How long (at least) an event_id and its first features are remembered, so an event
    sent again under a new offset (a producer's retry) is not counted twice. Redeliveries
    of the same Kafka message are recognised by their offsets, however late they come."""

    @field_validator("max_idle")
    @classmethod
    def _idle(cls, v: float) -> float:
        if not 0 <= v <= 300:
            raise ValueError(
                f"max_idle must be between 0 and 300 seconds, got {v!r}; use e.g. '1s', "
                "or 0 to score without waiting for labels (no event-time order)"
            )
        return v


class RedisSpec(_Strict):
    """How the pipeline's keys are laid out in Redis (docs/scaling.md, "Redis Cluster")."""

    buckets: int = Field(1, ge=1, le=16_384)
    """Hash-tag buckets for the per-entity and per-event keys (:mod:`weir.slots`). 1 (the
    default): every key of the pipeline in one slot, on one master of a Redis Cluster. More
    (e.g. 64 for 3 to 10 masters): entities and event ids spread over that many slots, so
    one pipeline's Redis work and memory go to every master. Fixed for a pipeline's life:
    another value names other keys (start the pipeline afresh)."""


class LearnerSpec(_Strict):
    """When the learner publishes model snapshots for the scorers."""

    snapshot_every_labels: int = Field(1000, ge=1)
    snapshot_every_seconds: Duration = 10.0
    keep_snapshots: int = Field(5, ge=1)
    """Snapshots kept in Redis; older ones are deleted as new ones are published."""


class DriftSpec(_Strict):
    """Drift statistics (features, predictions, performance)."""

    enabled: bool = True
    features: list[str] | None = None
    """Features watched; default: every feature."""
    method: Literal["psi", "ks", "js"] = "psi"
    bins: int = Field(10, ge=2, le=1000)
    reference_size: int = Field(1000, ge=10)
    window: int = Field(1000, ge=10)
    min_samples: int = Field(200, ge=1)
    threshold: float = Field(0.2, gt=0)
    detector: Literal["adwin", "page_hinkley"] = "adwin"
    detector_params: dict[str, float] = Field(default_factory=dict)
    estimate_window: int = Field(1000, ge=10)
    """Binary tasks: served predictions per model version behind the label-free (CBPE)
    performance estimate (docs/drift.md)."""
    estimate_min_accuracy: float | None = Field(None, gt=0, le=1)
    """Binary tasks: the champion's estimated accuracy below this is flagged (an
    ``estimate`` drift record with ``drifted`` true, and the WeirEstimatedAccuracyLow
    alert) before its labels come; None publishes the estimate without flagging it."""


class RetrainSpec(_Strict):
    """When and how drift leads to a retrain, shadow, promotion and rollback."""

    enabled: bool = True
    on_performance_drift: bool = True
    min_feature_drifts: int = Field(2, ge=1)
    schedule: Duration | None = None
    cooldown: Duration = 300.0
    min_fresh_labels: int = Field(500, ge=1)
    window_labels: int = Field(2000, ge=10)
    """A retrain fits on at most the newest ``window_labels`` training-log records, read
    back from Kafka (streams/history.py)."""
    window_seconds: Duration | None = None
    """And, if set, only on those logged within this long before the newest one the
    retrain saw (Kafka timestamps), e.g. ``24h``; None: by count only."""
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    shadow_labels: int = Field(500, ge=1)
    promote_margin: float = Field(0.0, ge=0)
    rollback_labels: int = Field(1000, ge=1)
    rollback_margin: float = Field(0.05, ge=0)
    keep_versions: int = Field(10, ge=1)
    """Model blobs kept in the registry besides the champion, its predecessor and the
    challenger: the newest ``keep_versions``; older ones are pruned (metadata kept)."""

    @field_validator("window_seconds")
    @classmethod
    def _window_seconds(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(
                f"retrain.window_seconds must be > 0 seconds, got {v!r}; use e.g. '24h', "
                "or remove it to window by count only (retrain.window_labels)"
            )
        return v


class PipelineSpec(_Strict):
    """A whole pipeline: topics, raw fields, features, model and the monitoring loop."""

    name: str
    task: Task
    entity_field: str = "entity_id"
    fields: Annotated[
        dict[str, Annotated[FieldSpec, BeforeValidator(_field_shorthand)]], BeforeValidator(_int_keys)
    ] = Field(min_length=1)
    features: list[FeatureSpec] = Field(min_length=1)
    lateness: Duration = 60.0
    """Events older than the entity's newest event by more than this are late."""
    late_events: Literal["dead_letter", "ignore"] = "dead_letter"
    classes: list[str] | None = None
    """For classification: the label values, if known in advance (strings)."""
    topics: TopicsSpec = Field(default_factory=TopicsSpec)
    model: ModelSpec
    labels: LabelsSpec = Field(default_factory=LabelsSpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    redis: RedisSpec = Field(default_factory=RedisSpec)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z][a-z0-9_-]{0,62}$", v):
            raise ValueError(
                f"name must match [a-z][a-z0-9_-]* (at most 63 chars), got {v!r}; "
                "it prefixes topics, Redis keys and the consumer group"
            )
        return v

    @field_validator("lateness")
    @classmethod
    def _lateness(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"lateness must be >= 0 seconds, got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineSpec:
        problems: list[str] = []
        names: set[str] = set()
        for i, f in enumerate(self.features):
            where = f"features[{i}]"
            if f.name in names:
                problems.append(f"{where}.name: duplicate feature name {f.name!r}; rename one")
            names.add(f.name)
            if f.field is None:
                continue
            if f.field not in self.fields:
                close = difflib.get_close_matches(f.field, list(self.fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    f"{where}.field: {f.field!r} is not a declared field{hint}; "
                    f"declare it under `fields` or use one of {sorted(self.fields)}"
                )
            elif self.fields[f.field].type == "categorical" and f.agg in NUMERIC_AGGS:
                problems.append(
                    f"{where}.agg: {f.agg!r} needs a numeric field but {f.field!r} is "
                    "categorical; use raw, count, last or distinct"
                )
        if self.drift.features:
            for j, name in enumerate(self.drift.features):
                if name not in names:
                    problems.append(
                        f"drift.features[{j}]: {name!r} is not a feature; use one of {sorted(names)}"
                    )
        for j, name in enumerate(self.model.features or []):
            if name not in names:
                close = difflib.get_close_matches(name, sorted(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    f"model.features[{j}]: {name!r} is not a feature{hint}; use one of {sorted(names)}"
                )
        if self.model.features is not None and not self.model.features:
            problems.append("model.features: empty; list the features the model reads, or remove it")
        if self.task == "regression" and self.classes:
            problems.append("classes: a regression task has no classes; remove `classes`")
        if problems:
            raise ValueError("\n".join(problems))
        # Fill topic defaults from the pipeline name.
        topics = self.topics
        filled = {
            role: (name or f"weir.{self.name}.{role.replace('_', '-')}")
            for role, name in topics.names().items()
        }
        object.__setattr__(self, "topics", topics.model_copy(update=filled))
        if not self.model.name:
            object.__setattr__(self, "model", self.model.model_copy(update={"name": self.name}))
        return self

    # -- helpers ------------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def consumer_group(self) -> str:
        return f"weir-{self.name}"

    @property
    def redis_prefix(self) -> str:
        """``weir:{<name>}``: the braces are a Redis Cluster hash tag, so every key of the
        pipeline is in one slot (its scripts, pipelines and transactions then run on one
        node, docs/scaling.md); on a single Redis they are just part of the name."""
        return f"weir:{{{self.name}}}"

    def spec_hash(self) -> str:
        """sha256 of the canonical spec: recorded with every model version."""
        # The ``redis`` section left out while it is the default: the hashes of the specs
        # written before it existed stay what they were (model versions, checkpoints).
        exclude = {"redis"} if self.redis == RedisSpec() else None
        canon = self.model_dump_json(by_alias=True, exclude=exclude)
        return hashlib.sha256(canon.encode()).hexdigest()


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "constrained-")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _explain(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for err in exc.errors():
        # Drop pydantic's validator tags ('function-before[...]') from the path.
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        where = _format_loc(loc)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            parent_known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(key, parent_known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {sorted(parent_known)}"
            problems.append(f"{where}: unknown key; {hint}")
            continue
        if err["type"] == "missing":
            problems.append(f"{where}: required key is missing; add it (see docs/spec.md)")
            continue
        if "\n" in msg:  # cross checks already carry their paths
            problems.extend(msg.splitlines())
            continue
        problems.append(f"{where}: {msg} (got {err.get('input')!r})")
    return problems


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: Any = PipelineSpec
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            model = None
            break
        ann = field.annotation
        model = _model_in(ann)
    if model is None or not hasattr(model, "model_fields"):
        return []
    return [(info.alias or name) for name, info in model.model_fields.items()]


def _model_in(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def parse_spec(data: Any, source: str = "<spec>") -> PipelineSpec:
    """Validate an already-parsed spec mapping."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: a spec must be a YAML mapping at the top level, got {type(data).__name__}"
        )
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = _explain(exc)
        raise SpecError(f"{source} is invalid:\n  " + "\n  ".join(problems), problems=problems) from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a spec file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file {str(p)!r} does not exist; pass the path of a YAML spec")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML: {exc}") from None
    return parse_spec(data, str(p))
