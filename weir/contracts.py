"""Wire contracts: every record on Weir's topics, with its typed encode and decode.

This is the public API documented in the README: producers and consumers outside Weir
rely on these shapes. It is the bottom layer (it imports only ``weir.*``), so the data
plane (``streams/``) and the model side (``models/``) read and write one definition.

Parsing an input is pure: a bad message raises :class:`~weir.errors.InvalidMessage`
whose ``reason`` is a short code (a metric label and the dead letter's ``reason``) and
whose text names the field, the bad value and the fix.

Event (events topic, key = entity id; :func:`parse_event`, :func:`encode_event`)::

    {"event_id": str, "entity_id": str, "ts": epoch seconds | ISO-8601, "data": {field: value}}

The entity id is under the spec's ``entity_field`` (``entity_id`` by default).

Label (labels topic, key = event id; :func:`parse_label`, :func:`encode_label`)::

    {"event_id": str, "label": bool | int | float | str, "ts": epoch seconds | ISO-8601}

Prediction (predictions topic; :func:`encode_prediction`, :func:`decode_prediction`)::

    {"event_id": str, "entity_id": str, "ts": float, "model": str, "model_version": str,
     "prediction": label | null, "proba": {class: float} | null, "features": {name: value},
     "scored_at": float, "freshness": {name: seconds | null}, "model_age": seconds | null,
     "record_version": 2}

Version 2 (:data:`~weir.types.PREDICTION_RECORD_VERSION`) added ``freshness`` (each
windowed feature's age: event-time seconds from the newest event that contributed to it to
the event scored, null with none in its window; :mod:`features.freshness`), ``model_age``
(seconds since the model snapshot that scored it was taken, 0 for a live model) and
``record_version``. Only keys were added: a version-1 reader ignores them, and
:func:`decode_prediction` reads a version-1 record (no ``record_version``) with
``freshness`` ``{}`` and ``model_age`` None.

Dead letter (dead-letter topic, key = the original key, capped;
:func:`encode_dead_letter`, :func:`decode_dead_letter`)::

    {"reason": str, "detail": str, "topic": str, "partition": int, "offset": int,
     "key_b64": str | null, "value_b64": str | null, "value_text": str | null,
     "value_size": int | null, "value_sha256": hex | null, "truncated": bool, "at": float}

A dead letter always fits its topic: at most :data:`DEAD_LETTER_MAX_VALUE_BYTES` of the
original are copied; its sha256, size and topic/partition/offset find the rest.

Training log (training-log topic, one joined example; :class:`Example`,
:func:`encode_training_record`, :func:`decode_training_record`)::

    {"event_id": str, "entity_id": str, "ts": event time, "label_ts": float,
     "features": {name: value}, "label": label, "prediction": label | null,
     "proba": {class: float} | null, "model_version": str}

Drift record (drift topic, key = ``kind:name``; :class:`DriftRecord`,
:func:`encode_drift_record`, :func:`decode_drift_record`): see :class:`DriftRecord`.

Model control (model-control topic, key = the command; :func:`encode_retrain_request`,
:func:`decode_control`)::

    {"command": "retrain", "reason": str, "requested_at": float}
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict, cast

import orjson

from weir.errors import InvalidMessage
from weir.spec import PipelineSpec
from weir.types import DeadLetter, Event, FeatureVector, Label, LabelValue, Prediction, Value

MAX_ID_LEN = 256
# Epoch seconds above this are almost surely milliseconds (year 5138 otherwise).
_MS_SUSPECT = 1e11
#: orjson's nesting limit: deeper input is refused as not JSON.
_MAX_DEPTH = 1024


def _loads(raw: bytes | None) -> Any:
    if raw is None:
        raise InvalidMessage("empty", "message has no value (a tombstone?); send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            # json.loads below would raise RecursionError on such nesting (not a ValueError).
            raise InvalidMessage(
                "not_json",
                f"value nests arrays/objects deeper than {_MAX_DEPTH} levels; send a flat JSON object",
            ) from None
    # orjson refuses NaN/Infinity; tell that apart from plain garbage.
    try:
        json.loads(raw)
    except (ValueError, RecursionError) as exc:
        snippet = raw[:60]
        raise InvalidMessage("not_json", f"value is not JSON ({exc}); got {snippet!r}") from None
    raise InvalidMessage(
        "not_finite",
        "value contains NaN or Infinity, which JSON does not allow; send finite numbers",
    )


def parse_ts(value: Any, field: str, spec: PipelineSpec, now: float | None = None) -> float:
    """Epoch seconds from a number or an ISO-8601 string, within the spec's bounds."""
    if isinstance(value, bool) or value is None:
        raise InvalidMessage(
            "bad_timestamp",
            f"{field} must be epoch seconds or an ISO-8601 string, got {value!r}",
        )
    if isinstance(value, int | float):
        ts = float(value)
        if not math.isfinite(ts):
            raise InvalidMessage("not_finite", f"{field} must be finite, got {value!r}")
        if ts > _MS_SUSPECT:
            raise InvalidMessage(
                "absurd_timestamp",
                f"{field}={value!r} looks like epoch milliseconds; send seconds (divide by 1000)",
            )
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidMessage(
                "bad_timestamp",
                f"{field}={value!r} is not ISO-8601; use e.g. '2026-11-22T10:00:00Z' or epoch seconds",
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ts = dt.timestamp()
    else:
        raise InvalidMessage(
            "bad_timestamp",
            f"{field} must be epoch seconds or an ISO-8601 string, got {type(value).__name__}",
        )
    now = time.time() if now is None else now
    if ts < spec.scoring.min_ts:
        raise InvalidMessage(
            "absurd_timestamp",
            f"{field}={value!r} is before scoring.min_ts={spec.scoring.min_ts:.0f}; "
            "check the producer's clock or lower scoring.min_ts",
        )
    if ts > now + spec.scoring.max_future:
        raise InvalidMessage(
            "absurd_timestamp",
            f"{field}={value!r} is more than scoring.max_future={spec.scoring.max_future:.0f}s "
            "ahead of this worker's clock; check the producer's clock",
        )
    return ts


def _id(obj: dict[str, Any], field: str) -> str:
    v = obj.get(field)
    if type(v) is str and 0 < len(v) <= MAX_ID_LEN:  # the common case, checked first
        return v
    if v is None:
        raise InvalidMessage("missing_field", f"{field} is missing; every message needs one")
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise InvalidMessage("bad_type", f"{field} must be a string, got {type(v).__name__} {v!r}")
    s = str(v)
    if not s or len(s) > MAX_ID_LEN:
        raise InvalidMessage("bad_type", f"{field} must be 1..{MAX_ID_LEN} characters, got {len(s)}")
    return s


def _value(name: str, ftype: str, v: Any) -> Value:
    where = f"data.{name}"
    if ftype == "numeric":
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidMessage("bad_type", f"{where} must be a number, got {type(v).__name__} {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise InvalidMessage("not_finite", f"{where} must be finite, got {v!r}")
        return f
    if ftype == "boolean":
        if not isinstance(v, bool):
            raise InvalidMessage("bad_type", f"{where} must be true or false, got {type(v).__name__} {v!r}")
        return v
    # categorical
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise InvalidMessage("bad_type", f"{where} must be a string (category), got {type(v).__name__} {v!r}")
    return str(v)


#: Per spec, what parse_event reads of it for every event: pydantic attribute reads cost
#: about 0.1 µs each, a dozen per event. Keyed by id(spec); the spec is kept to check it.
_PLANS: dict[int, tuple[PipelineSpec, int, str, tuple[tuple[str, str, bool], ...]]] = {}


def _plan(spec: PipelineSpec) -> tuple[PipelineSpec, int, str, tuple[tuple[str, str, bool], ...]]:
    plan = _PLANS.get(id(spec))
    if plan is None or plan[0] is not spec:
        if len(_PLANS) > 256:  # many short-lived specs (tests): start over
            _PLANS.clear()
        fields = tuple((name, f.type, f.required) for name, f in spec.fields.items())
        plan = (spec, spec.scoring.max_event_bytes, spec.entity_field, fields)
        _PLANS[id(spec)] = plan
    return plan


def parse_event(raw: bytes | None, spec: PipelineSpec, now: float | None = None) -> Event:
    """Validate one event message. Extra keys in ``data`` are ignored."""
    _, max_bytes, entity_field, fields = _plan(spec)
    if raw is not None and len(raw) > max_bytes:
        raise InvalidMessage(
            "too_large",
            f"message is {len(raw)} bytes, over scoring.max_event_bytes="
            f"{max_bytes}; send less or raise the limit",
        )
    obj = _loads(raw)
    if not isinstance(obj, dict):
        raise InvalidMessage("not_object", f"an event must be a JSON object, got {type(obj).__name__}")
    event_id = _id(obj, "event_id")
    entity_id = _id(obj, entity_field)
    if "ts" not in obj:
        raise InvalidMessage("missing_field", "ts is missing; send epoch seconds or ISO-8601")
    ts = parse_ts(obj["ts"], "ts", spec, now)
    data = obj.get("data")
    if not isinstance(data, dict):
        raise InvalidMessage(
            "missing_field" if data is None else "bad_type",
            f"data must be an object of field values, got {type(data).__name__}",
        )
    values: dict[str, Value] = {}
    for name, ftype, required in fields:
        v = data.get(name)
        if v is None:
            if required:
                raise InvalidMessage(
                    "missing_field",
                    f"data.{name} is missing; it is a required {ftype} field "
                    "(mark it `required: false` in the spec if it may be absent)",
                )
            values[name] = None
        elif type(v) is float and ftype == "numeric":
            # The common case: a JSON float is finite (orjson refuses NaN and Infinity).
            values[name] = v
        else:
            values[name] = _value(name, ftype, v)
    return Event(event_id=event_id, entity_id=entity_id, ts=ts, data=values)


def parse_label(raw: bytes | None, spec: PipelineSpec, now: float | None = None) -> Label:
    """Validate one label message; the label's type is checked against the task."""
    obj = _loads(raw)
    if not isinstance(obj, dict):
        raise InvalidMessage("not_object", f"a label must be a JSON object, got {type(obj).__name__}")
    event_id = _id(obj, "event_id")
    if "label" not in obj or obj["label"] is None:
        raise InvalidMessage("missing_field", "label is missing; send the true value")
    y = obj["label"]
    if isinstance(y, float) and not math.isfinite(y):
        raise InvalidMessage("not_finite", f"label must be finite, got {y!r}")
    if not isinstance(y, bool | int | float | str):
        raise InvalidMessage("label_type", f"label must be a scalar, got {type(y).__name__}")
    if spec.task == "regression" and (isinstance(y, bool) or not isinstance(y, int | float)):
        raise InvalidMessage("label_type", f"a regression label must be a number, got {y!r}")
    ts = parse_ts(obj["ts"], "ts", spec, now) if "ts" in obj else (time.time() if now is None else now)
    return Label(event_id=event_id, label=y, ts=ts)


def encode_event(event: Event, entity_field: str = "entity_id") -> bytes:
    """The wire form of an event, its entity id under ``entity_field`` (the spec's).

    ``ts`` is written as given: epoch seconds, or an ISO-8601 string a source carried.

    Examples:
        >>> encode_event(Event("e1", "c7", 1.5, {"x": 2.0}), entity_field="customer")
        b'{"event_id":"e1","customer":"c7","ts":1.5,"data":{"x":2.0}}'
    """
    return orjson.dumps(
        {
            "event_id": event.event_id,
            entity_field: event.entity_id,
            "ts": event.ts,
            "data": event.data,
        }
    )


def encode_label(event_id: str, label: LabelValue, ts: float | None = None) -> bytes:
    """The wire form of a label; without ``ts`` the reader stamps its arrival time.

    Examples:
        >>> encode_label("e1", True, 12.0)
        b'{"event_id":"e1","label":true,"ts":12.0}'
        >>> encode_label("e1", 3)
        b'{"event_id":"e1","label":3}'
    """
    body: dict[str, Any] = {"event_id": event_id, "label": label}
    if ts is not None:
        body["ts"] = ts
    return orjson.dumps(body)


def encode_prediction(pred: Prediction) -> bytes:
    """The predictions topic's record (:meth:`weir.types.Prediction.to_dict`)."""
    return orjson.dumps(pred.to_dict())


def prediction_from_dict(d: dict[str, Any]) -> Prediction:
    """A :class:`~weir.types.Prediction` from its JSON object (``model``,
    ``model_version``, ``proba``, ``features`` and ``scored_at`` may be absent, and
    ``freshness`` and ``model_age`` of a version-1 record are)."""
    age = d.get("model_age")
    return Prediction(
        event_id=str(d["event_id"]),
        entity_id=str(d["entity_id"]),
        ts=float(d["ts"]),
        model=str(d.get("model", "")),
        model_version=str(d.get("model_version", "")),
        prediction=d.get("prediction"),
        proba=d.get("proba"),
        features=dict(d.get("features") or {}),
        scored_at=float(d.get("scored_at", 0.0)),
        freshness=dict(d.get("freshness") or {}),
        model_age=None if age is None else float(age),
    )


def decode_prediction(raw: bytes) -> Prediction:
    """A predictions-topic record as a :class:`~weir.types.Prediction`.

    Examples:
        >>> p = Prediction("e1", "c7", 1.0, "m", "v1", True, {"True": 0.9}, {"x": 2.0}, 1.5,
        ...                {"x_mean_1h": 0.0}, 12.5)
        >>> decode_prediction(encode_prediction(p)) == p
        True
        >>> v1 = b'{"event_id":"e1","entity_id":"c7","ts":1.0,"prediction":true,"scored_at":1.5}'
        >>> decode_prediction(v1).freshness, decode_prediction(v1).model_age
        ({}, None)
    """
    return prediction_from_dict(orjson.loads(raw))


def json_object(raw: bytes | None) -> dict[str, Any] | None:
    """A record's JSON object, or None if it is JSON but not an object (an empty value
    is ``null``). Raises ``orjson.JSONDecodeError`` if it is not JSON.

    The monitor reads the records it consumes with this: it skips what is not an object.
    """
    obj = orjson.loads(raw or b"null")
    return obj if isinstance(obj, dict) else None


# --------------------------------------------------------------------------------------
# Training log: the joined examples the learner publishes
# --------------------------------------------------------------------------------------


class TrainingRecord(TypedDict, total=False):
    """A training-log record as read back (the monitor and retrain read it leniently:
    a key may be absent)."""

    event_id: str
    entity_id: str
    ts: float
    label_ts: float
    features: FeatureVector
    label: LabelValue
    prediction: LabelValue | None
    proba: dict[str, float] | None
    model_version: str


@dataclass(slots=True)
class Example:
    """A joined training example: the served features and prediction, and the label."""

    event_id: str
    entity_id: str
    event_ts: float
    label_ts: float
    features: FeatureVector
    label: LabelValue
    prediction: LabelValue | None
    proba: dict[str, float] | None
    model_version: str

    def to_record(self) -> dict[str, Any]:
        """The training-log record (JSON on the training_log topic)."""
        return {
            "event_id": self.event_id,
            "entity_id": self.entity_id,
            "ts": self.event_ts,  # the event's time: what retraining windows and sorts on
            "label_ts": self.label_ts,
            "features": self.features,
            "label": self.label,
            "prediction": self.prediction,
            "proba": self.proba,
            "model_version": self.model_version,
        }

    @property
    def delay(self) -> float:
        return self.label_ts - self.event_ts


def encode_training_record(example: Example) -> bytes:
    """The training-log topic's record of a joined example."""
    return orjson.dumps(example.to_record())


def training_record(obj: dict[str, Any]) -> TrainingRecord:
    """A decoded JSON object read as a training-log record (no key is required)."""
    return cast(TrainingRecord, obj)


def decode_training_record(raw: bytes | None) -> TrainingRecord | None:
    """A training-log record, or None if it is not a JSON object.

    Examples:
        >>> ex = Example("e1", "c7", 1.0, 3.0, {"x": 2.0}, True, False, None, "v1.4")
        >>> rec = decode_training_record(encode_training_record(ex))
        >>> rec["ts"], rec["label"], rec["model_version"]
        (1.0, True, 'v1.4')
    """
    obj = json_object(raw)
    return None if obj is None else training_record(obj)


# --------------------------------------------------------------------------------------
# Model control: requests to the monitor
# --------------------------------------------------------------------------------------


class ControlMessage(TypedDict, total=False):
    """A model-control record as read (``command`` is ``retrain``; others are ignored)."""

    command: str
    reason: str | None
    requested_at: float


def encode_retrain_request(reason: str, requested_at: float) -> bytes:
    """The model-control record asking the monitor for a retrain (``weir retrain``).

    Examples:
        >>> encode_retrain_request("backfill", 10.0)
        b'{"command":"retrain","reason":"backfill","requested_at":10.0}'
    """
    return orjson.dumps({"command": "retrain", "reason": reason, "requested_at": requested_at})


def control_message(obj: dict[str, Any]) -> ControlMessage:
    """A decoded JSON object read as a model-control record (no key is required)."""
    return cast(ControlMessage, obj)


def decode_control(raw: bytes | None) -> ControlMessage | None:
    """A model-control record, or None if it is not a JSON object."""
    obj = json_object(raw)
    return None if obj is None else control_message(obj)


# --------------------------------------------------------------------------------------
# Drift record: the drift topic
# --------------------------------------------------------------------------------------

#: What a drift record is about; ``decision`` is a retrain/promotion/rollback decision.
DriftKind = Literal["feature", "prediction", "performance", "estimate", "decision"]


def finite_or_none(v: float) -> float | None:
    """JSON has no NaN or infinity: an undefined value goes out as null.

    Examples:
        >>> finite_or_none(0.5), finite_or_none(float("nan")), finite_or_none(float("inf"))
        (0.5, None, None)
    """
    return v if math.isfinite(v) else None


@dataclass(slots=True)
class DriftRecord:
    """One check of one statistic (or one retrain/promotion/rollback decision).

    The JSON form (:meth:`to_dict`) is the drift topic's message; its keys are
    ``time`` (epoch seconds of the check), ``pipeline``, ``model_version`` (the
    champion when checked, or null), ``kind`` (feature|prediction|performance|decision),
    ``name`` (feature name, ``prediction``, ``loss`` or the decision's name),
    ``statistic`` (psi, ks, js, adwin, page_hinkley, or the decision's trigger),
    ``value``, ``threshold``, ``drifted`` and an optional ``detail`` mapping.
    """

    time: float
    pipeline: str
    model_version: str | None
    kind: DriftKind
    name: str
    statistic: str
    value: float
    threshold: float
    drifted: bool
    detail: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": self.time,
            "pipeline": self.pipeline,
            "model_version": self.model_version,
            "kind": self.kind,
            "name": self.name,
            "statistic": self.statistic,
            "value": finite_or_none(self.value),
            "threshold": self.threshold,
            "drifted": self.drifted,
        }
        if self.detail is not None:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriftRecord:
        return cls(
            time=float(d["time"]),
            pipeline=str(d["pipeline"]),
            model_version=d.get("model_version"),
            kind=d["kind"],
            name=str(d["name"]),
            statistic=str(d["statistic"]),
            value=float(d["value"]) if d["value"] is not None else math.nan,
            threshold=float(d["threshold"]),
            drifted=bool(d["drifted"]),
            detail=d.get("detail"),
        )

    @property
    def key(self) -> bytes:
        """The drift topic's key: ``kind:name``."""
        return f"{self.kind}:{self.name}".encode()


def encode_drift_record(rec: DriftRecord) -> bytes:
    """The drift topic's record (an undefined value as null).

    Examples:
        >>> r = DriftRecord(1.0, "p", "v1", "feature", "x", "psi", float("nan"), 0.2, False)
        >>> encode_drift_record(r)
        b'{"time":1.0,"pipeline":"p","model_version":"v1","kind":"feature","name":"x","statistic":"psi","value":null,"threshold":0.2,"drifted":false}'
        >>> decode_drift_record(encode_drift_record(r)).name
        'x'
    """
    return orjson.dumps(rec.to_dict())


def decode_drift_record(raw: bytes) -> DriftRecord:
    """A drift-topic record (a null value is NaN)."""
    return DriftRecord.from_dict(orjson.loads(raw))


#: At most this many bytes of the original value are copied into a dead letter. The
#: original can be as large as the broker's ``message.max.bytes`` (about 1 MB by default),
#: and base64 makes a copy a third larger, so a whole copy may not fit the dead-letter
#: topic: the produce would fail, not the message. ``value_sha256``, ``value_size`` and
#: topic/partition/offset still identify the original, which stays in its source topic.
DEAD_LETTER_MAX_VALUE_BYTES = 64 * 1024
#: At most this many bytes of the original key are copied.
DEAD_LETTER_MAX_KEY_BYTES = 1024
#: ``value_text`` (the start of the original, if it is UTF-8) and ``detail`` are cut to this
#: many characters.
DEAD_LETTER_MAX_TEXT_CHARS = 2000
#: ``reason`` and ``topic`` are cut to this many characters (Kafka topic names have <= 249).
_MAX_NAME_CHARS = 256
#: An upper bound of an encoded dead letter's size, whatever the original: the base64 copies,
#: the texts with every character escaped (``\\u0000`` is 6 bytes), and the rest. Far below
#: Kafka's default ``message.max.bytes`` (1,048,588).
DEAD_LETTER_MAX_BYTES = 128 * 1024


def _cut_text(text: str, limit: int = DEAD_LETTER_MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _utf8_head(value: bytes, chars: int) -> str | None:
    """The first ``chars`` characters of ``value`` if its start is UTF-8, else None."""
    head = value[: 4 * chars]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut at the end of the head is not an encoding error.
        if len(head) < len(value) and exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            text = head[: exc.start].decode("utf-8", errors="strict")
        else:
            return None
    return text[:chars]


def encode_dead_letter(dl: DeadLetter) -> bytes:
    """The dead-letter record: why, where from, and a capped copy of the original.

    Always fits the dead-letter topic (at most :data:`DEAD_LETTER_MAX_BYTES`): the copy
    holds the first :data:`DEAD_LETTER_MAX_VALUE_BYTES` of the value (base64) and
    :data:`DEAD_LETTER_MAX_KEY_BYTES` of the key; ``truncated`` says whether either was
    cut. ``value_sha256`` and ``value_size`` are of the whole original, and
    ``topic``/``partition``/``offset`` find it in its source topic.
    """
    value, key = dl.value, dl.key
    value_copy = value[:DEAD_LETTER_MAX_VALUE_BYTES] if value is not None else None
    key_copy = key[:DEAD_LETTER_MAX_KEY_BYTES] if key is not None else None
    truncated = (value is not None and len(value) > DEAD_LETTER_MAX_VALUE_BYTES) or (
        key is not None and len(key) > DEAD_LETTER_MAX_KEY_BYTES
    )
    return orjson.dumps(
        {
            "reason": dl.reason[:_MAX_NAME_CHARS],
            "detail": _cut_text(dl.detail),
            "topic": dl.topic[:_MAX_NAME_CHARS],
            "partition": dl.partition,
            "offset": dl.offset,
            "key_b64": base64.b64encode(key_copy).decode() if key_copy is not None else None,
            "value_b64": base64.b64encode(value_copy).decode() if value_copy is not None else None,
            "value_text": _utf8_head(value, DEAD_LETTER_MAX_TEXT_CHARS) if value is not None else None,
            "value_size": len(value) if value is not None else None,
            "value_sha256": hashlib.sha256(value).hexdigest() if value is not None else None,
            "truncated": truncated,
            "at": dl.at or time.time(),
        }
    )


def decode_dead_letter(raw: bytes) -> dict[str, Any]:
    """A dead-letter record with ``value`` and ``key`` as bytes (the copies, maybe cut).

    Records written before the copy was capped lack ``value_size``, ``value_sha256`` and
    ``truncated``: they held the whole original, so these are filled in from it.
    """
    rec: dict[str, Any] = orjson.loads(raw)
    value = base64.b64decode(rec["value_b64"]) if rec.get("value_b64") is not None else None
    rec["value"] = value
    rec["key"] = base64.b64decode(rec["key_b64"]) if rec.get("key_b64") is not None else None
    if "value_sha256" not in rec:
        rec["value_size"] = len(value) if value is not None else None
        rec["value_sha256"] = hashlib.sha256(value).hexdigest() if value is not None else None
        rec["truncated"] = False
    return rec


def dead_letter_key(dl: DeadLetter) -> bytes | None:
    """The Kafka key to produce a dead letter with: the original key, capped like its copy."""
    return dl.key[:DEAD_LETTER_MAX_KEY_BYTES] if dl.key is not None else None
