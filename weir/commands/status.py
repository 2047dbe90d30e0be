"""``weir status SPEC``: model versions, learning progress, online metrics and join counters."""

from __future__ import annotations

import argparse
import time
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="what the learner reports: versions, labels, metrics, joins")
    p.add_argument("spec", help="path of the pipeline YAML")
    p.add_argument("--json", action="store_true", help="print the raw status JSON")
    p.set_defaults(func=run)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def run(args: argparse.Namespace) -> int:
    import orjson

    from models.learner import status_key
    from models.registry import ModelRegistry, registry_key
    from streams.admin import check_redis
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    settings = get_settings()
    check_redis(settings, spec=spec)  # an unreachable Redis is one line naming it (password hidden)
    client = settings.redis()
    raw = client.get(status_key(spec))
    status: dict[str, Any] = orjson.loads(raw) if raw else {}
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        return 0
    reg = ModelRegistry(client, spec, key=registry_key(settings))
    now = time.time()
    print(f"pipeline {spec.name} ({spec.task}), model {spec.model.name}")
    print(f"  champion: {reg.alias('champion') or '-'}   challenger: {reg.alias('challenger') or '-'}")
    print(f"  versions: {', '.join(v.id for v in reg.list()) or '(none)'}")
    sid = reg.latest_snapshot()
    if sid:
        meta = reg.snapshot_meta(sid)
        print(
            f"  latest snapshot: {sid}, {meta['labels_learned']} labels learned, "
            f"{now - meta['created']:.1f}s old"
        )
    else:
        print("  latest snapshot: (none)")
    if not status:
        print("  learner: no status yet (is `weir worker SPEC --role learner` running?)")
        return 0
    print(f"  learner: {learner_line(status, now)}")
    joins = status.get("joins", {})
    print(
        "  joins (this run): "
        + (", ".join(f"{k}={v}" for k, v in sorted(joins.items())) or "(none)")
        + f"; expiries (no label within horizon)={status.get('expiries', 0)}"
    )
    for version, vals in sorted(status.get("metrics", {}).items()):
        name = "all versions" if version == "*" else version
        overall = ", ".join(f"{k}={_fmt(v)}" for k, v in vals["all"].items())
        rolling = ", ".join(f"{k}={_fmt(v)}" for k, v in vals["rolling"].items())
        print(f"  {name} (n={vals['n']}): {overall}")
        print(f"    rolling: {rolling}")
    return 0


def learner_line(status: dict[str, Any], now: float) -> str:
    """The learner's counts: labels learned by every run (restored from the snapshots), and
    this run's (since its start: seen, learned). A status written before the start count was
    kept has the totals only.

    >>> learner_line({"version_id": "v1", "labels_learned": 30000, "labels_learned_at_start": 18061,
    ...               "labels_seen": 11939, "updated": 9.5}, now=10.0)
    'version v1, 30000 labels learned in all; this run: 11939 seen, 11939 learned; status 0.5s old'
    >>> learner_line({"version_id": "v1", "labels_learned": 7, "labels_seen": 7, "updated": 10.0}, now=10.0)
    'version v1, 7 labels learned in all; this run: 7 seen; status 0.0s old'
    """
    run = f"{status['labels_seen']} seen"
    start = status.get("labels_learned_at_start")
    if start is not None:
        run += f", {status['labels_learned'] - start} learned"
    return (
        f"version {status['version_id']}, {status['labels_learned']} labels learned in all; "
        f"this run: {run}; status {now - status['updated']:.1f}s old"
    )
