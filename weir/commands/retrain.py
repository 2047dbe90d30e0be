"""``weir retrain SPEC``: ask the monitor for a retrain; ``weir monitor SPEC``: run the monitor."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="request a manual retrain (the monitor fits a challenger and shadows it)",
        description="Sends {'command': 'retrain', 'reason': ...} to the pipeline's "
        "model-control topic; the running monitor (`weir monitor SPEC`) obeys it at once, "
        "past any cooldown, once min_fresh_labels labels have arrived since the last retrain.",
    )
    p.add_argument("spec", help="path of the pipeline YAML")
    p.add_argument("--reason", default="requested from the command line", help="why (recorded)")
    p.set_defaults(func=run_retrain)

    m = sub.add_parser(
        "monitor",
        help="run the drift monitor and retrain loop (off the scoring hot path)",
        description="Reads the predictions, training-log and model-control topics; publishes "
        "drift records to the drift topic; retrains, shadows, promotes and rolls back "
        "(see docs/drift.md). Stops cleanly on SIGTERM/SIGINT.",
    )
    m.add_argument("spec", help="path of the pipeline YAML")
    m.add_argument(
        "--metrics-port", type=int, default=None, help="port of /metrics (default WEIR_METRICS_PORT)"
    )
    m.add_argument("--check-every", type=int, default=500, help="records between two drift checks (500)")
    m.add_argument(
        "--check-seconds",
        type=float,
        default=5.0,
        help="at most this long between two drift checks while records arrive (5)",
    )
    m.set_defaults(func=run_monitor)


def run_retrain(args: argparse.Namespace) -> int:
    from streams.monitor import request_retrain
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    request_retrain(spec, get_settings(), args.reason)
    print(f"retrain requested for {spec.name!r} on {spec.topics.model_control}: {args.reason}")
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    from streams.monitor import run_monitor as run
    from weir.settings import get_settings
    from weir.spec import load_spec

    if args.check_every < 1:
        raise SystemExit(f"weir monitor: --check-every must be >= 1, got {args.check_every}")
    spec = load_spec(args.spec)
    run(
        spec,
        get_settings(),
        metrics_port=args.metrics_port,
        check_every=args.check_every,
        check_seconds=args.check_seconds,
    )
    return 0
