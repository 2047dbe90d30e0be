"""``weir backfill SPEC --from TIME [--to TIME]``: training examples rebuilt from raw events.

A retrain normally fits on the training log: the features as they were served. After a
change of the spec's features (a new aggregate, a longer window) the log has none of the
new features; ``weir backfill`` rebuilds them from the raw events with the offline engine
(:func:`features.offline.compute_offline`, tested equal to the online store), joins the
labels, and writes training-log records (JSON lines, one :class:`~weir.contracts.TrainingRecord`
per labelled event with ``ts`` in ``[--from, --to)``, ``model_version`` ``"backfill"`` and
no prediction) to ``--out``. ``models.retrain.load_backfill(path)`` reads them back as a
training-log frame for :func:`models.retrain.fit_challenger`; ``--fit`` does that at once
and saves the challenger as a registry version (trigger ``backfill``, the file's sha256 in
its lineage, no alias moved: promote it with ``weir models promote``).

The events topic is read from its oldest retained record to its end at the start (the
features of an event at ``--from`` need the events of its longest window before it, and
arrival order decides duplicates and late events, as online). Invalid events are skipped
as the scorer dead-letters them; late and duplicate deliveries give no example (online they
serve none, or the first one's features). See docs/learning.md, "Backfill".
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from weir.errors import SpecError

if TYPE_CHECKING:
    import pandas as pd

    from weir.settings import Settings
    from weir.spec import PipelineSpec
    from weir.types import Event, Label

log = logging.getLogger("weir.backfill")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backfill",
        help="rebuild training examples from raw events with the offline feature engine",
        description="Reads the events and labels topics, computes every event's features "
        "offline (as the online store would have served them), joins the labels and "
        "writes training-log records (JSON lines) for the events with ts in [--from, --to).",
    )
    p.add_argument("spec", help="path of the pipeline YAML")
    p.add_argument(
        "--from",
        dest="t_from",
        required=True,
        help="first event time: epoch seconds, ISO-8601 (UTC if no offset) or a duration ago (24h)",
    )
    p.add_argument("--to", dest="t_to", default=None, help="end of the event times (excluded); default now")
    p.add_argument("--out", default=None, help="output file (default backfill-<pipeline>-<from>-<to>.jsonl)")
    p.add_argument(
        "--fit",
        action="store_true",
        help="also fit a challenger on it and save it as a registry version (no alias moved)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to read each topic (300)")
    p.set_defaults(func=run)


def parse_time(value: str, option: str, now: float | None = None) -> float:
    """``--from``/``--to`` as epoch seconds: a number, ISO-8601 or a duration ago.

    Examples:
        >>> parse_time("1700000000", "--from")
        1700000000.0
        >>> parse_time("2023-11-14T22:13:20", "--from")
        1700000000.0
        >>> parse_time("1h", "--from", now=7200.0)
        3600.0
    """
    from weir.durations import parse_duration

    now = time.time() if now is None else now
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return now - float(parse_duration(value))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise SpecError(
            f"{option} {value!r} is not a time; give epoch seconds (1700000000), ISO-8601 "
            "(2023-11-14T22:13:20Z) or a duration ago (24h)"
        ) from None
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def backfill_records(
    spec: PipelineSpec,
    events: list[Event],
    labels: dict[str, Label],
    t_from: float,
    t_to: float,
) -> list[dict[str, Any]]:
    """Training-log records of the labelled events with ``t_from <= ts < t_to``, their
    features computed offline from ``events`` (every delivery, in arrival order per
    entity). Pure: the parity test and the command call it."""
    from features.offline import compute_offline
    from weir.contracts import Example

    if not events:
        return []
    offline = compute_offline(spec, events_frame(spec, events))
    names = spec.feature_names
    status = offline["status"].tolist()
    columns = {n: offline[n].tolist() for n in names}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, e in enumerate(events):
        if status[i] != "ok" or not (t_from <= e.ts < t_to) or e.event_id in seen:
            continue
        seen.add(e.event_id)
        lab = labels.get(e.event_id)
        if lab is None:
            continue
        features = {n: _plain(columns[n][i]) for n in names}
        example = Example(e.event_id, e.entity_id, e.ts, lab.ts, features, lab.label, None, None, "backfill")
        out.append(example.to_record())
    return out


def events_frame(spec: PipelineSpec, events: list[Event]) -> pd.DataFrame:
    """The offline engine's input: one row per delivery, the field values as carried."""
    import pandas as pd

    frame = pd.DataFrame({"event_id": [e.event_id for e in events]})
    frame["entity_id"] = [e.entity_id for e in events]
    frame["ts"] = [float(e.ts) for e in events]
    for name, f in spec.fields.items():
        values = [e.data.get(name) for e in events]
        frame[name] = pd.Series(values, dtype=float if f.type == "numeric" else object)
    return frame


def _plain(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def read_topic(
    settings: Settings, topic: str, timeout: float, what: str
) -> list[tuple[int, int, bytes | None]]:
    """Every retained record of ``topic`` up to its end now: (partition, offset, value),
    partition by partition in offset order (an entity's events stay in arrival order)."""
    from confluent_kafka import Consumer

    from streams.history import partition_marks, read_ranges

    consumer = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"weir-backfill-{int(time.time() * 1000)}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )

    def late(n: int, total: int) -> str:
        return (
            f"could not read {what} topic {topic!r} within {timeout:g}s "
            f"({n} of {total}); raise --timeout or check Kafka"
        )

    try:
        marks = partition_marks(consumer, topic, what, "is this the pipeline's spec?")
        records = read_ranges(consumer, topic, marks, time.monotonic() + timeout, late)
        return sorted(records, key=lambda r: r[0])  # stable: offset order within a partition
    finally:
        consumer.close()


def run_backfill(
    spec: PipelineSpec, settings: Settings, t_from: float, t_to: float, timeout: float = 300.0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read the events and labels topics and rebuild the examples; (records, summary)."""
    from weir.contracts import parse_event, parse_label
    from weir.errors import InvalidMessage

    if t_to <= t_from:
        raise SpecError(f"--to ({t_to}) must be after --from ({t_from}); give a later --to")
    events: list[Event] = []
    invalid = 0
    for _, _, raw in read_topic(settings, spec.topics.events, timeout, "events"):
        try:
            events.append(parse_event(raw, spec))
        except InvalidMessage:
            invalid += 1  # the scorer dead-letters it: it has no features online either
    labels: dict[str, Label] = {}
    for _, _, raw in read_topic(settings, spec.topics.labels, timeout, "labels"):
        try:
            lab = parse_label(raw, spec)
        except InvalidMessage:
            continue
        labels.setdefault(lab.event_id, lab)  # the first label of an event is the one joined
    records = backfill_records(spec, events, labels, t_from, t_to)
    summary = {
        "source": "backfill",
        "events_read": len(events),
        "events_invalid": invalid,
        "labels_read": len(labels),
        "records": len(records),
        "from": t_from,
        "to": t_to,
    }
    return records, summary


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    """Write the records (JSON lines); returns the file's sha256."""
    import hashlib

    body = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return hashlib.sha256(body).hexdigest()


def run(args: argparse.Namespace) -> int:
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    settings = get_settings()
    now = time.time()
    t_from = parse_time(args.t_from, "--from", now)
    t_to = parse_time(args.t_to, "--to", now) if args.t_to else now
    records, summary = run_backfill(spec, settings, t_from, t_to, args.timeout)
    out = Path(args.out or f"backfill-{spec.name}-{int(t_from)}-{int(t_to)}.jsonl")
    sha = write_jsonl(out, records)
    print(
        f"{len(records)} examples ({summary['events_read']} events, {summary['events_invalid']} invalid, "
        f"{summary['labels_read']} labels) -> {out} (sha256 {sha[:12]})"
    )
    if args.fit:
        from models.registry import ModelRegistry, registry_key
        from models.retrain import fit_challenger, load_backfill

        frame = load_backfill(out, spec)
        result = fit_challenger(spec, frame)
        registry = ModelRegistry(settings.redis(), spec, key=registry_key(settings))
        version = registry.save(
            result.model,
            parent=registry.alias("champion"),
            trigger="backfill",
            reason=f"backfill of {out.name}",
            meta={**result.as_meta(), "history": {**summary, "file": str(out), "file_sha256": sha}},
            token=f"backfill-{sha[:32]}",
        )
        print(
            f"saved {version.id}: holdout {result.metric} {result.challenger_score:.4f} vs served "
            f"{result.champion_score:.4f}; promote it with `weir models {args.spec} promote {version.id}`"
        )
    return 0
