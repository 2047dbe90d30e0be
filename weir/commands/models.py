"""``weir models SPEC list | show ID | promote ID | rollback``: the model registry."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, show, promote or roll back model versions")
    p.add_argument("spec", help="path of the pipeline YAML")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every version, its aliases and headline metadata")
    show = actions.add_parser("show", help="one version's full metadata (JSON)")
    show.add_argument("version", help="version id, e.g. v3")
    promote = actions.add_parser("promote", help="point the champion alias at a version")
    promote.add_argument("version", help="version id, e.g. v3")
    actions.add_parser("rollback", help="point the champion back at its previous version")
    p.set_defaults(func=run)


def _registry(spec_path: str) -> Any:
    from models.registry import ModelRegistry, registry_key
    from streams.admin import check_redis
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(spec_path)
    settings = get_settings()
    check_redis(settings, spec=spec)  # an unreachable Redis is one line naming it (password hidden)
    return ModelRegistry(settings.redis(), spec, key=registry_key(settings))


def _ago(ts: float) -> str:
    s = max(0.0, time.time() - ts)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def run(args: argparse.Namespace) -> int:
    reg = _registry(args.spec)
    if args.action == "list":
        champion, challenger = reg.alias("champion"), reg.alias("challenger")
        versions = reg.list()
        if not versions:
            print("no model versions yet; the learner creates v1 when it first starts")
            return 0
        print(f"{'id':<6} {'alias':<11} {'parent':<7} {'trigger':<10} {'created':<10} reason")
        for v in versions:
            alias = "champion" if v.id == champion else "challenger" if v.id == challenger else ""
            print(
                f"{v.id:<6} {alias:<11} {v.parent or '-':<7} {v.trigger:<10} {_ago(v.created):<10} {v.reason}"
            )
        snap = reg.latest_snapshot()
        print(f"latest snapshot: {snap or '(none)'}")
        return 0
    if args.action == "show":
        import dataclasses

        v = reg.get(args.version)
        out = dataclasses.asdict(v)
        out["aliases"] = [a for a in ("champion", "challenger") if reg.alias(a) == v.id]
        print(json.dumps(out, indent=2, default=str))
        return 0
    if args.action == "promote":
        before = reg.alias("champion")
        reg.set_alias("champion", args.version)
        print(f"champion: {before or '(none)'} -> {args.version}; the learner follows at its next snapshot")
        return 0
    before = reg.alias("champion")
    target = reg.rollback("champion")
    print(f"champion rolled back: {before} -> {target}; the learner follows at its next snapshot")
    return 0
