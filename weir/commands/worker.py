"""``weir worker SPEC``: run a scoring worker (Faust), or the learner with ``--role learner``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run a scoring worker; arguments after -- go to Faust's worker (e.g. -- -l debug)",
        description="Roles: all (one process scores with the live model and learns), "
        "scorer (scores, follows the learner's snapshots; run many), learner (joins labels, "
        "learns, publishes snapshots; run one).",
    )
    p.add_argument("spec", help="path of the pipeline YAML")
    p.add_argument("--role", choices=["all", "scorer", "learner"], default="all")
    p.add_argument(
        "--metrics-port", type=int, default=None, help="port of /metrics (default WEIR_METRICS_PORT)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    settings = get_settings()
    extra = list(getattr(args, "passthrough", [])) or None
    if args.role == "learner":
        from streams.learner import run_learner

        return run_learner(spec, settings, metrics_port=args.metrics_port)
    from streams.worker import run_worker

    return run_worker(spec, settings, role=args.role, faust_args=extra, metrics_port=args.metrics_port)
