"""``weir produce``: replay a file or a River data set into the events and labels topics.

Sources:

* a file: ``.csv``, ``.parquet``, ``.jsonl``/``.ndjson`` with one column per spec field, and
  optionally ``event_id``, ``entity_id``, ``ts`` and the label column (``--label-column``);
* ``river:NAME[?k=v&...]``: a bundled River data set or synthetic generator, e.g.
  ``river:Phishing``, ``river:Bananas``, ``river:synth.Agrawal?classification_function=0&seed=42``,
  ``river:synth.SEA?variant=0&seed=1``, and the drifting presets
  ``river:agrawal-drift?position=5000&before=6&after=7&seed=42`` and
  ``river:sea-drift?position=5000&before=0&after=3&seed=42`` (abrupt concept change).

Labels go to the labels topic ``--label-delay`` seconds (wall clock) after their event,
carrying ``ts = event ts + delay``.

Source rows are matched to the spec's fields by name; integer keys (River's SEA keys its
features ``0, 1, 2``) are read as their string form, so the spec declares ``"0"``. Before
anything is sent, the first :data:`CHECK_ROWS` rows are read and checked
(:func:`check_source`): a required spec field the source does not have, or that none of those
rows fills, is a :class:`FieldMismatch` naming the field, the source's fields and the fix;
a source field the spec does not declare is warned about once. While producing, the progress
line shows the share of events with a required field the source could not fill (missing,
NaN, or not of the field's type): the worker dead-letters those with ``missing_field``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weir.contracts import encode_event, encode_label
from weir.errors import WeirError
from weir.settings import Settings
from weir.spec import PipelineSpec
from weir.types import Event

log = logging.getLogger("weir.produce")

Row = tuple[dict[Any, Any], Any]

#: Rows read and checked before anything is sent: if none of them fills a required field,
#: ``weir produce`` stops with :class:`FieldMismatch` (every event would be dead-lettered).
CHECK_ROWS = 1000


class SourceError(WeirError):
    """A replay source could not be read."""


class FieldMismatch(SourceError):
    """The source's fields do not give the spec's required fields."""


_DRIFT_PRESETS = {"agrawal-drift", "sea-drift"}


def _parse_params(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in urllib.parse.parse_qsl(query):
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def river_source(uri: str) -> Iterable[Row]:
    """Rows ``(x, y)`` from a ``river:`` source URI."""
    body = uri.removeprefix("river:")
    name, _, query = body.partition("?")
    params = _parse_params(query)
    from river import datasets
    from river.datasets import synth

    before: Any
    after: Any
    if name in _DRIFT_PRESETS:
        position = int(params.pop("position", 5000))
        seed = int(params.pop("seed", 42))
        width = int(params.pop("width", 1))
        if name == "agrawal-drift":
            before = synth.Agrawal(classification_function=int(params.pop("before", 6)), seed=seed)
            after = synth.Agrawal(classification_function=int(params.pop("after", 7)), seed=seed + 1)
        else:
            before = synth.SEA(variant=int(params.pop("before", 0)), seed=seed)
            after = synth.SEA(variant=int(params.pop("after", 3)), seed=seed + 1)
        if params:
            raise SourceError(f"{uri}: unknown parameter(s) {sorted(params)} for {name}")
        if width <= 1:
            # An abrupt change. River's ConceptDriftStream(width=1) overflows math.exp
            # ~180 rows past the drift point, so switch streams ourselves.
            return itertools.chain(itertools.islice(before, position), after)
        return synth.ConceptDriftStream(before, after, position=position, width=width, seed=seed)
    module: Any = datasets
    attr = name
    if name.startswith("synth."):
        module, attr = synth, name.removeprefix("synth.")
    cls = getattr(module, attr, None)
    if cls is None:
        known = sorted(n for n in dir(datasets) if n[:1].isupper()) + [
            f"synth.{n}" for n in dir(synth) if n[:1].isupper()
        ]
        raise SourceError(f"{uri}: no River data set {name!r}; known: {', '.join(known)}")
    try:
        return cls(**params)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise SourceError(f"{uri}: bad parameters for {name}: {exc}") from None


def file_source(path: str, label_column: str) -> Iterable[Row]:
    """Rows ``(x, y)`` from a CSV, Parquet or JSON-lines file (``x`` keeps id columns)."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise SourceError(f"source file {path!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(p)
    elif suffix in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        df = pd.read_json(p, lines=True)
    else:
        raise SourceError(f"{path}: unknown file type {suffix!r}; use .csv, .parquet or .jsonl")
    records = df.to_dict("records")
    return ((r, r.pop(label_column, None)) for r in records)


def open_source(source: str, label_column: str = "label") -> Iterable[Row]:
    if source.startswith("river:"):
        return river_source(source)
    return file_source(source, label_column)


def _plain(v: Any) -> Any:
    """A numpy scalar (pandas or River sources) as the Python value; anything else as is."""
    return v.item() if hasattr(v, "item") else v


def by_name(x: dict[Any, Any]) -> dict[str, Any]:
    """A source row keyed by field name: integer keys (River's SEA) as their string form,
    numpy scalars as Python values.

    Examples:
        >>> import numpy as np
        >>> by_name({0: np.float64(1.5), "b": 2})
        {'0': 1.5, 'b': 2}
    """
    return {k if isinstance(k, str) else str(k): _plain(v) for k, v in x.items()}


def _id_columns(spec: PipelineSpec) -> set[str]:
    """Columns ``weir produce`` reads as the event's envelope, not as ``data`` fields."""
    return {"event_id", "entity_id", spec.entity_field, "ts"}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _coerce_value(ftype: str, v: Any) -> Any:
    """``v`` (from a row :func:`by_name`) as the spec's field type, or None when it is
    missing or cannot be one."""
    if _missing(v):
        return None
    if ftype == "numeric":
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if math.isfinite(f) else None
    if ftype == "boolean":
        if isinstance(v, str):
            return {"true": True, "false": False, "1": True, "0": False}.get(v.strip().lower())
        return bool(v) if isinstance(v, bool | int | float) else None
    return str(v)


def _coerce(spec: PipelineSpec, x: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The event's ``data`` from a row keyed by name, and the required fields left unfilled."""
    data: dict[str, Any] = {}
    unfilled: list[str] = []
    for name, f in spec.fields.items():
        v = _coerce_value(f.type, x.get(name))
        data[name] = v
        if v is None and f.required:
            unfilled.append(name)
    return data, unfilled


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_source(spec: PipelineSpec, head: list[Row], source: str) -> list[str]:
    """Check the first rows of a source against the spec before anything is sent.

    Returns the source's fields that the spec does not declare (not sent), after one
    warning naming them. Raises :class:`FieldMismatch` when a required spec field is not among the
    source's fields, or when every row of ``head`` leaves some required field unfilled.
    """
    if not head:
        raise SourceError(f"source {source!r} has no rows; nothing to send")
    ids = _id_columns(spec)
    seen: dict[str, None] = {}
    for x, _ in head:
        seen.update(dict.fromkeys(by_name(x)))
    have = [k for k in seen if k not in ids]
    required = [n for n, f in spec.fields.items() if f.required]
    absent = [n for n in required if n not in seen]
    if absent:
        example = have[0] if have else "x"
        raise FieldMismatch(
            f"spec {spec.name!r} requires field(s) {_names(absent)}, which source {source!r} does "
            f"not have; the source's fields are {_names(have) or 'none'}. Every event would be "
            f"dead-lettered (missing_field). Fix: name the spec's fields after the source's "
            f"(e.g. `fields: {{'{example}': numeric}}`; quote names that are numbers), or mark "
            "the field `required: false`"
        )
    unfilled: dict[str, int] = {}
    all_missing = True
    for x, _ in head:
        _, gaps = _coerce(spec, by_name(x))
        for name in gaps:
            unfilled[name] = unfilled.get(name, 0) + 1
        all_missing = all_missing and bool(gaps)
    if all_missing:
        worst = sorted(unfilled, key=lambda n: -unfilled[n])
        sample = {n: by_name(head[0][0]).get(n) for n in worst[:3]}
        raise FieldMismatch(
            f"the first {len(head)} rows of source {source!r} all leave a required field empty "
            f"({', '.join(f'{n!r} in {unfilled[n]} rows' for n in worst)}; first row: {sample}): "
            "missing, NaN, or not of the field's type in the spec. Every event would be "
            "dead-lettered (missing_field); nothing was sent. Fix: correct the field's `type` "
            "in the spec or the source's values, or mark the field `required: false`"
        )
    unused = [k for k in have if k not in spec.fields]
    if unused:
        log.warning(
            "source %r has field(s) %s that spec %r does not declare: they are not sent "
            "(declare them under `fields` to use them)",
            source,
            _names(unused),
            spec.name,
        )
    return unused


@dataclass
class Message:
    topic: str
    key: bytes | None
    value: bytes
    malformed: bool = False
    """A deliberately broken message (``bad_every``), for the dead-letter path."""
    unfilled: tuple[str, ...] = ()
    """Required fields the source row could not fill (sent as null: dead-lettered)."""


def build_messages(
    spec: PipelineSpec,
    rows: Iterable[Row],
    *,
    run_id: str,
    entities: int = 1000,
    start_ts: float | None = None,
    time_step: float | None = None,
    bad_every: int = 0,
    label_delay: float | None = None,
) -> Iterator[tuple[Message, Message | None, float]]:
    """Event messages with their label messages and event times. Pure and deterministic.

    With ``time_step`` event times are ``start_ts + i * time_step``; without it they are
    the wall clock when the message is built (live replay). With ``label_delay`` each
    label carries ``ts = event ts + label_delay``. A row's fields are matched to the spec's
    by name (:func:`by_name`); the entity id is written under the spec's ``entity_field``.
    """
    t = spec.topics
    for i, (raw_x, y) in enumerate(rows):
        if bad_every and i and i % bad_every == 0:
            yield Message(t.events, b"bad", _malformed(i // bad_every), malformed=True), None, 0.0
        x = by_name(raw_x)
        event_id = _id_value(x.get("event_id"), f"{run_id}-{i}")
        entity_value = x.get(spec.entity_field)
        if _missing(entity_value):
            entity_value = x.get("entity_id")
        entity = _id_value(entity_value, f"c{i % entities}")
        if not _missing(x.get("ts")):
            ts = x["ts"]
        elif time_step is not None:
            ts = (start_ts if start_ts is not None else time.time()) + i * time_step
        else:
            ts = time.time()
        data, unfilled = _coerce(spec, x)
        body = encode_event(Event(event_id, entity, ts, data), spec.entity_field)
        event_msg = Message(t.events, entity.encode(), body, unfilled=tuple(unfilled))
        event_ts = float(ts) if isinstance(ts, int | float) else 0.0
        label_msg = None
        if y is not None:
            label_ts = (event_ts or time.time()) + label_delay if label_delay is not None else None
            label_msg = Message(t.labels, event_id.encode(), encode_label(event_id, _plain(y), label_ts))
        yield event_msg, label_msg, event_ts


def _id_value(v: Any, default: str) -> str:
    if _missing(v) or v == "":
        return default
    if isinstance(v, float) and v.is_integer():  # a CSV id column read as floats
        v = int(v)
    return str(v)


_BAD = [
    b"this is not json",
    b'{"event_id": "x", "entity_id": "c1", "ts": NaN, "data": {}}',
    b'{"event_id": "x", "entity_id": "c1", "ts": 1, "data": {}}',
    b'{"entity_id": "c1"}',
    b"[]",
]


def _malformed(i: int) -> bytes:
    return _BAD[i % len(_BAD)]


def produce(
    spec: PipelineSpec,
    settings: Settings,
    source: str,
    *,
    rate: float = 0.0,
    limit: int | None = None,
    label_delay: float = 5.0,
    labels: bool = True,
    entities: int = 1000,
    time_step: float | None = None,
    start_ts: float | None = None,
    bad_every: int = 0,
    label_column: str = "label",
    run_id: str | None = None,
    progress: bool = True,
    stop: Any = None,
) -> dict[str, Any]:
    """Replay ``source`` into Kafka at ``rate`` events/s (0 = as fast as possible).

    The first :data:`CHECK_ROWS` rows are checked against the spec first
    (:func:`check_source`): a :class:`FieldMismatch` is raised before anything is sent.
    The summary counts the events sent with a required field left empty (``unfilled``).
    """
    from confluent_kafka import Producer
    from tqdm import tqdm

    rows: Iterable[Row] = open_source(source, label_column)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    it = iter(rows)
    head = list(itertools.islice(it, CHECK_ROWS))
    unused = check_source(spec, head, source)
    rows = itertools.chain(head, it)
    run_id = run_id or f"r{int(time.time())}"
    conf = settings.producer_config()  # acks=all, idempotent
    conf.update({"linger.ms": 10, "compression.type": "lz4"})
    producer = Producer(conf)
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    pending: list[tuple[float, int, Message]] = []
    n_events = n_labels = n_bad = n_unfilled = 0
    unfilled_by_field: dict[str, int] = {}
    t0 = time.time()
    bar = tqdm(total=limit, unit="ev", disable=not progress, desc=f"producing {source}")
    seq = itertools.count()

    def send(m: Message) -> None:
        while True:
            try:
                producer.produce(m.topic, m.value, m.key, on_delivery=on_delivery)
                return
            except BufferError:
                producer.poll(0.05)

    def due_labels(now: float) -> None:
        nonlocal n_labels
        while pending and pending[0][0] <= now:
            _, _, m = heapq.heappop(pending)
            send(m)
            n_labels += 1

    for ev_msg, lab_msg, _ts in build_messages(
        spec,
        rows,
        run_id=run_id,
        entities=entities,
        start_ts=start_ts,
        time_step=time_step,
        bad_every=bad_every,
        label_delay=label_delay,
    ):
        if stop is not None and stop.is_set():
            break
        if rate > 0:
            target = t0 + (n_events + n_bad) / rate
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
        send(ev_msg)
        bar.update(1)
        if ev_msg.malformed:
            n_bad += 1
            continue
        n_events += 1
        if ev_msg.unfilled:
            n_unfilled += 1
            for name in ev_msg.unfilled:
                unfilled_by_field[name] = unfilled_by_field.get(name, 0) + 1
        if progress and n_events % 100 == 1:
            bar.set_postfix_str(f"unfilled {n_unfilled / n_events:.1%}", refresh=False)
        if labels and lab_msg is not None:
            heapq.heappush(pending, (time.time() + label_delay, next(seq), lab_msg))
        due_labels(time.time())
        producer.poll(0)
    if progress and n_events:
        bar.set_postfix_str(f"unfilled {n_unfilled / n_events:.1%}", refresh=False)
    bar.close()
    if n_unfilled:
        log.warning(
            "%d of %d events (%.1f%%) left a required field empty (%s): the worker dead-letters them "
            "with reason missing_field",
            n_unfilled,
            n_events,
            100.0 * n_unfilled / n_events,
            ", ".join(f"{k!r} {v}" for k, v in sorted(unfilled_by_field.items())),
        )
    while pending and not (stop is not None and stop.is_set()):
        due_labels(time.time())
        producer.poll(0.05)
    left = producer.flush(30)
    if left or errors:
        raise WeirError(
            f"{left} message(s) not delivered to {settings.kafka_bootstrap}; errors: {errors[:3]}"
        )
    elapsed = time.time() - t0
    return {
        "events": n_events,
        "labels": n_labels,
        "malformed": n_bad,
        "unfilled": n_unfilled,
        "unused_fields": unused,
        "seconds": round(elapsed, 3),
        "events_per_second": round(n_events / elapsed, 1) if elapsed else None,
        "run_id": run_id,
    }
