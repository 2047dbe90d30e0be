"""``weir report SPEC``: a self-contained HTML report from the drift and training-log topics."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML report: rolling accuracy, drift per feature, retrains")
    p.add_argument("spec", help="path of the pipeline YAML")
    p.add_argument("--out", default=None, help="output file (default WEIR_DATA_DIR/report-<name>.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streams.admin import check_broker
    from streams.report import write_report
    from weir.settings import get_settings
    from weir.spec import load_spec

    spec = load_spec(args.spec)
    settings = get_settings()
    check_broker(settings)
    out = args.out or str(Path(settings.data_dir) / f"report-{spec.name}.html")
    print(f"wrote {write_report(spec, settings, out)}")
    return 0
