"""``weir produce SPEC SOURCE``: replay a file or River data set into the pipeline's topics."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "produce",
        help="replay a CSV/Parquet/JSONL file or a River data set into the events and labels topics",
        description="SOURCE is a file path or river:NAME[?k=v&...], e.g. river:Phishing, "
        "river:synth.Agrawal?seed=1, river:agrawal-drift?position=5000",
    )
    p.add_argument("spec", help="path of the pipeline YAML")
    p.add_argument("source", help="file path or river:NAME[?params]")
    p.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many events")
    p.add_argument("--label-delay", type=float, default=5.0, help="seconds between an event and its label")
    p.add_argument("--no-labels", action="store_true", help="send no labels")
    p.add_argument("--entities", type=int, default=1000, help="entity ids to spread rows over")
    p.add_argument(
        "--time-step", type=float, default=None, help="event-time seconds between rows (default: wall clock)"
    )
    p.add_argument(
        "--start-ts", type=float, default=None, help="event time of the first row (with --time-step)"
    )
    p.add_argument("--label-column", default="label", help="label column of a file source")
    p.add_argument("--bad-every", type=int, default=0, help="insert a malformed message every N events")
    p.add_argument("--run-id", default=None, help="prefix of generated event ids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from streams.admin import ensure_topics
    from streams.produce import produce
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    settings = get_settings()
    ensure_topics(settings, spec)
    summary = produce(
        spec,
        settings,
        args.source,
        rate=args.rate,
        limit=args.limit,
        label_delay=args.label_delay,
        labels=not args.no_labels,
        entities=args.entities,
        time_step=args.time_step,
        start_ts=args.start_ts,
        bad_every=args.bad_every,
        label_column=args.label_column,
        run_id=args.run_id,
        progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return 0
