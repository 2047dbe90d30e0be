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
"""

from __future__ import annotations

import heapq
import itertools
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from weir.errors import WeirError
from weir.settings import Settings
from weir.spec import PipelineSpec

Row = tuple[dict[str, Any], Any]


class SourceError(WeirError):
    """A replay source could not be read."""


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


def _coerce(spec: PipelineSpec, x: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, f in spec.fields.items():
        v = x.get(name)
        if v is None or (isinstance(v, float) and v != v):
            data[name] = None
        elif f.type == "numeric":
            data[name] = float(v)
        elif f.type == "boolean":
            data[name] = bool(v)
        else:
            data[name] = str(v)
    return data


def _label(y: Any) -> Any:
    if hasattr(y, "item"):
        y = y.item()
    return y


@dataclass
class Message:
    topic: str
    key: bytes | None
    value: bytes
    malformed: bool = False
    """A deliberately broken message (``bad_every``), for the dead-letter path."""


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
    label carries ``ts = event ts + label_delay``.
    """
    t = spec.topics
    for i, (x, y) in enumerate(rows):
        if bad_every and i and i % bad_every == 0:
            yield Message(t.events, b"bad", _malformed(i // bad_every), malformed=True), None, 0.0
        event_id = str(x.get("event_id") or f"{run_id}-{i}")
        entity = str(x.get("entity_id") or f"c{i % entities}")
        if "ts" in x and x["ts"] is not None:
            ts = x["ts"]
        elif time_step is not None:
            ts = (start_ts if start_ts is not None else time.time()) + i * time_step
        else:
            ts = time.time()
        ev = {"event_id": event_id, "entity_id": entity, "ts": ts, "data": _coerce(spec, x)}
        event_msg = Message(t.events, entity.encode(), orjson.dumps(ev))
        event_ts = float(ts) if isinstance(ts, int | float) else 0.0
        label_msg = None
        if y is not None:
            lab: dict[str, Any] = {"event_id": event_id, "label": _label(y)}
            if label_delay is not None:
                lab["ts"] = (event_ts or time.time()) + label_delay
            label_msg = Message(t.labels, event_id.encode(), orjson.dumps(lab))
        yield event_msg, label_msg, event_ts


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
    """Replay ``source`` into Kafka at ``rate`` events/s (0 = as fast as possible)."""
    from confluent_kafka import Producer
    from tqdm import tqdm

    rows = open_source(source, label_column)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    run_id = run_id or f"r{int(time.time())}"
    conf = settings.confluent_config()
    conf.update({"linger.ms": 10, "compression.type": "lz4", "enable.idempotence": True})
    producer = Producer(conf)
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    pending: list[tuple[float, int, Message]] = []
    n_events = n_labels = n_bad = 0
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
        if labels and lab_msg is not None:
            heapq.heappush(pending, (time.time() + label_delay, next(seq), lab_msg))
        due_labels(time.time())
        producer.poll(0)
    bar.close()
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
        "seconds": round(elapsed, 3),
        "events_per_second": round(n_events / elapsed, 1) if elapsed else None,
        "run_id": run_id,
    }
