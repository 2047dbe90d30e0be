"""The ``weir`` command line.

Each subcommand lives in its own module under :mod:`weir.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed namespace and returning an exit code.

Two things hold for every command:

* secrets never reach the terminal or a log: the secret ``WEIR_*``/``GRAFANA_*``
  variables and URL passwords are registered with :mod:`weir.redact`, every log
  record is redacted at creation, and so are error messages and tracebacks;
* a closed output (``weir status SPEC | head``) ends the command quietly with the
  shell's usual status for SIGPIPE (141), not with a ``BrokenPipeError`` traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import traceback

import weir
import weir.commands
from weir.errors import WeirError
from weir.redact import install_excepthooks, install_log_redaction, redact_text, register_env_secrets

#: Exit status of a command whose output was closed: 128 + SIGPIPE, as a shell reports it.
EXIT_BROKEN_PIPE = 128 + 13


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


def _closed_output() -> int:
    # Python's recipe (docs, "Note on SIGPIPE"): point stdout at devnull so the
    # interpreter's final flush does not raise a second BrokenPipeError at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (141 when its output was closed).

    SIGPIPE keeps Python's default (ignored, so a write raises ``BrokenPipeError``):
    restoring ``SIG_DFL`` would also kill a worker whose Kafka or Redis socket drops.
    """
    try:
        return _main(argv)
    except BrokenPipeError:  # --help or usage printed into a closed pipe
        return _closed_output()


def _main(argv: list[str] | None) -> int:
    register_env_secrets()
    install_log_redaction()
    if argv is None:  # the process's own command line: its hooks are ours (not a test's)
        install_excepthooks()
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a pipe closed after the last print breaks here, inside the try
        return code
    except BrokenPipeError:
        return _closed_output()
    except WeirError as exc:
        print(f"weir: error: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug or a library error: the traceback, with secrets masked
        print(redact_text(traceback.format_exc()).rstrip(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
