"""The feature engines' interface: what a computed event looks like, and what the model gets.

Both engines implement one definition (docs/features.md): the window of an event at time
``ts`` for a feature with window ``W`` is every event of the same entity that was accepted
earlier in arrival order (or is the event itself) with a timestamp in ``(ts - W, ts]``.

* :class:`~features.online.RedisFeatureStore` computes it live, one Redis round trip per batch.
* :func:`~features.offline.compute_offline` computes it for a whole stream in pandas
  (retraining, backfills) and is the reference the online engine is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from weir.errors import FeatureError
from weir.spec import FieldType, PipelineSpec
from weir.types import Event, FeatureValue, FeatureVector

Status = Literal["ok", "duplicate", "late"]

#: Seconds added to the TTL of an entity's keys beyond the longest window plus lateness,
#: so that an entity's state outlives the last moment it can still be read.
ENTITY_TTL_MARGIN = 300.0


@dataclass(slots=True)
class FeatureResult:
    """The outcome of one event.

    Attributes:
        status: ``"ok"`` (accepted and counted), ``"duplicate"`` (its ``event_id`` was
            already accepted: ``features`` are the ones served then) or ``"late"`` (older
            than the entity's watermark minus ``spec.lateness``: not stored, no features).
        features: The feature vector by feature name, ``None`` for a late event.
        freshness: Each windowed feature's age in event-time seconds (None: no
            contribution in its window), :mod:`features.freshness`; ``None`` when not
            computed (a late event, an engine or record without it).
    """

    status: Status
    features: FeatureVector | None
    freshness: dict[str, float | None] | None = None


class FeatureEngine(Protocol):
    """An online feature engine: computes a batch of events, in arrival order."""

    spec: PipelineSpec

    def compute_batch(
        self, client: Any, events: Sequence[Event], positions: Sequence[tuple[str, int, int]] | None = None
    ) -> list[FeatureResult]:
        """Compute (and record) the features of ``events``; one result per event, in order.
        ``positions`` gives each event's Kafka message ``(topic, partition, offset)``."""
        ...

    def served_features(
        self, client: Any, event_id: str, entity_id: str | None = None
    ) -> FeatureVector | None:
        """The features first served for ``event_id``, while the engine remembers it
        (``entity_id`` needed when the engine's memory is per entity bucket)."""
        ...


def to_model_input(fv: Mapping[str, FeatureValue]) -> dict[str, FeatureValue]:
    """What the River model receives: the feature vector without its undefined (None) values.

    Examples:
        >>> to_model_input({"amount": 3.0, "amount_mean_1h": None, "country": "fr"})
        {'amount': 3.0, 'country': 'fr'}
    """
    return {k: v for k, v in fv.items() if v is not None}


# -- shared definitions ------------------------------------------------------------------


def output_type(spec: PipelineSpec, feature_index: int) -> Literal["number", "string"]:
    """Whether a feature's values are numbers (float) or strings (categorical raw/last)."""
    f = spec.features[feature_index]
    categorical = f.field is not None and spec.fields[f.field].type == "categorical"
    return "string" if categorical and f.agg in ("raw", "last") else "number"


def used_fields(spec: PipelineSpec) -> list[str]:
    """The fields the features read, in declaration order: all an engine needs to keep."""
    wanted = {f.field for f in spec.features if f.field is not None}
    return [name for name in spec.fields if name in wanted]


def max_window(spec: PipelineSpec) -> float:
    """The longest window of the spec's features (0 if every feature is raw)."""
    return max((f.window for f in spec.features if f.window is not None), default=0.0)


def entity_ttl(spec: PipelineSpec) -> int:
    """TTL (s) of an entity's keys, renewed by every accepted event of the entity."""
    return math.ceil(max_window(spec) + spec.lateness + ENTITY_TTL_MARGIN)


def dedupe_seconds(spec: PipelineSpec) -> int:
    """How long (s, at least) the online engine remembers an event id and its first features.

    Kafka redeliveries are recognised by their offsets for as long as they come; this
    window is for the rest: a producer's retry under a new offset (librdkafka's
    ``delivery.timeout.ms`` is 120 s), and a caller that gives no offsets.
    """
    return max(1, math.ceil(spec.scoring.dedupe_horizon))


def check_ts(ts: Any, event_id: Any) -> float:
    """An event time as a finite float, or a :class:`FeatureError` saying what is wrong."""
    try:
        value = float(ts)
    except (TypeError, ValueError):
        raise FeatureError(f"event {event_id!r}: ts must be epoch seconds (a number), got {ts!r}") from None
    if not math.isfinite(value):
        raise FeatureError(f"event {event_id!r}: ts must be finite, got {ts!r}")
    return value


def bad_value(field: str, ftype: FieldType, value: Any, event_id: Any) -> FeatureError:
    """The error for a field value that does not fit its declared type."""
    want = {
        "numeric": "a finite number",
        "categorical": "a string",
        "boolean": "true or false",
    }[ftype]
    return FeatureError(
        f"event {event_id!r}: field {field!r} is {ftype} and must be {want}, got {value!r}; "
        "validate events against the spec before computing features"
    )


def missing_value(field: str, event_id: Any) -> FeatureError:
    """The error for a required field that is absent (or null)."""
    return FeatureError(
        f"event {event_id!r}: required field {field!r} is missing; send it, "
        "or declare it `required: false` in the spec"
    )
