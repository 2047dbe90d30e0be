"""The domain types, named once and used everywhere.

These are the in-process shapes; the wire contracts (JSON on Kafka) are in
:mod:`weir.contracts` and documented in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

#: A raw field value after validation.
Value: TypeAlias = float | str | bool | None
#: A feature value as served: numbers, categorical strings, or None when undefined.
FeatureValue: TypeAlias = float | str | None
#: The feature vector served to the model, by feature name.
FeatureVector: TypeAlias = dict[str, FeatureValue]
#: A label: class (bool/int/str) or target (float).
LabelValue: TypeAlias = bool | int | float | str


@dataclass(slots=True)
class Event:
    """A validated event: what upstream producers publish to the events topic."""

    event_id: str
    entity_id: str
    ts: float
    data: dict[str, Value]


@dataclass(slots=True)
class Label:
    """A validated delayed label for an earlier event."""

    event_id: str
    label: LabelValue
    ts: float


#: The predictions topic's record version (weir.contracts): 2 added ``freshness`` and
#: ``model_age``; a record without ``record_version`` is version 1.
PREDICTION_RECORD_VERSION = 2


@dataclass(slots=True)
class Prediction:
    """What Weir publishes for every scored event."""

    event_id: str
    entity_id: str
    ts: float
    model: str
    model_version: str
    prediction: LabelValue | None
    proba: dict[str, float] | None
    features: FeatureVector
    scored_at: float
    #: Each windowed feature's age in event-time seconds, None when it had no contribution
    #: in its window (features.freshness); empty when unknown.
    freshness: dict[str, float | None] = field(default_factory=dict)
    #: Seconds since the model snapshot that scored it was taken (0 for a live model).
    model_age: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "entity_id": self.entity_id,
            "ts": self.ts,
            "model": self.model,
            "model_version": self.model_version,
            "prediction": self.prediction,
            "proba": self.proba,
            "features": self.features,
            "scored_at": self.scored_at,
            "freshness": self.freshness,
            "model_age": self.model_age,
            "record_version": PREDICTION_RECORD_VERSION,
        }


@dataclass(slots=True)
class DeadLetter:
    """A message that broke its contract, with why and where it came from.

    ``value`` and ``key`` are the whole original; the wire record
    (:func:`weir.contracts.encode_dead_letter`) copies a capped part of them, with the
    original's size and sha256.
    """

    reason: str
    detail: str
    topic: str
    partition: int | None
    offset: int | None
    value: bytes | None
    key: bytes | None = None
    at: float = 0.0


def version_of(model_version: str) -> str:
    """The registry version a model version id belongs to: a snapshot id ``v3.17`` counts
    for version ``v3``; a plain version id is returned as is.

    Snapshot ids change every few seconds (as a metric label each would be a new series
    forever); registry versions change only on retrain, promotion or rollback.

    Examples:
        >>> version_of("v1.42"), version_of("v3")
        ('v1', 'v3')
    """
    return model_version.split(".", 1)[0]


@dataclass(slots=True)
class ModelVersion:
    """A stored model version's metadata (the blob is stored beside it)."""

    id: str
    model: str
    parent: str | None
    created: float
    trigger: str
    reason: str
    blob_sha256: str
    river_version: str
    spec_hash: str
    meta: dict[str, Any] = field(default_factory=dict)
