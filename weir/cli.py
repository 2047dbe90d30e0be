"""The ``weir`` command line.

Each subcommand lives in its own module under :mod:`weir.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import weir
import weir.commands
from weir.errors import WeirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weir",
        description="Streaming inference and online monitoring for River models.",
    )
    parser.add_argument("--version", action="version", version=f"weir {weir.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(weir.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"weir.commands.{mod.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # everything after -- goes to the wrapped tool (Faust's worker)
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except WeirError as exc:
        print(f"weir: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
