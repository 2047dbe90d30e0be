"""``weir config``: show the settings in force (secrets masked)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the WEIR_* settings in force (secrets masked)")
    p.add_argument("--markdown", action="store_true", help="print the reference table instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weir.settings import load_settings, settings_markdown

    if args.markdown:
        print(settings_markdown())
        return 0
    for k, v in load_settings().safe_dump().items():
        print(f"WEIR_{k.upper()}={v}")
    return 0
