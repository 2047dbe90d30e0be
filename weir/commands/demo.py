"""``weir demo SPEC``: run the scoring path live on the local stack with a terminal summary."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a worker on a drifting stream and show a live summary")
    p.add_argument("spec", help="path of the pipeline YAML (examples/demo.yaml)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic (default 60)")
    p.add_argument("--rate", type=float, default=300.0, help="events per second (default 300)")
    p.add_argument("--source", default=None, help="replay source (default: a drifting Agrawal stream)")
    p.add_argument("--label-delay", type=float, default=2.0, help="seconds before each label arrives")
    p.add_argument("--metrics-port", type=int, default=9300)
    p.add_argument("--out", default=None, help="where summary.json and accuracy.png go (default .weir/demo)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the pipeline's topics, registry and snapshots from an earlier run "
        "(default: start from nothing, deleting them)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.demo import run_demo
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    summary = run_demo(
        args.spec,
        spec,
        get_settings(),
        duration=args.duration,
        rate=args.rate,
        source=args.source,
        label_delay=args.label_delay,
        out_dir=args.out,
        metrics_port=args.metrics_port,
        resume=args.resume,
    )
    return 0 if summary["worker_exit_code"] in (0, None, -15) else 1
