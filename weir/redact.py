"""Keep secrets out of everything Weir shows: messages, logs, ``weir config``, tracebacks.

Two nets, both cheap:

* :func:`redact_url` hides the password of one URL (Redis, Kafka, Grafana, Prometheus),
  used where a message names a server;
* :func:`redact_text` hides every ``scheme://user:password@`` in free text, and every
  secret value registered with :func:`register_secret` (``WEIR_REDIS_PASSWORD``,
  ``WEIR_KAFKA_SASL_PASSWORD``, ``WEIR_MODEL_KEY``, ``GRAFANA_TOKEN``...). The CLI
  registers them at start, redacts its error output with it and installs
  :func:`install_log_redaction`, so a log line from any library is redacted before a
  handler sees it, and :func:`install_excepthooks` for the tracebacks Python prints
  itself (a thread's uncaught exception).

Examples:
    >>> redact_url("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    >>> redact_url("http://admin:pw@grafana:3000/d/x")
    'http://admin:***@grafana:3000/d/x'
    >>> redact_text("Redis at redis://u:p4ss@h:6379/0 is down; Grafana http://a:b@g:3000")
    'Redis at redis://u:***@h:6379/0 is down; Grafana http://a:***@g:3000'
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

#: ``scheme://user:password@`` (or ``scheme://:password@``): the password part is group 2.
_URL_CREDS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*:)([^\s/@]+)(@)")

#: Environment variables whose value is a secret whatever its shape.
SECRET_ENV: tuple[str, ...] = (
    "WEIR_REDIS_PASSWORD",
    "WEIR_KAFKA_SASL_PASSWORD",
    "WEIR_MODEL_KEY",
    "GRAFANA_TOKEN",
    "GRAFANA_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "REDIS_PASSWORD",
)
#: Secrets shorter than this are not searched for in free text: masking every "a" or
#: "1" in a message would make it unreadable and protect nothing.
_MIN_SECRET = 4

_secrets: set[str] = set()


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for messages and logs).

    Examples:
        >>> redact_url("redis://:s3cret@cache:6379/0")
        'redis://:***@cache:6379/0'
        >>> redact_url("redis://127.0.0.1:6379/0")
        'redis://127.0.0.1:6379/0'
        >>> redact_url("rediss://weir:pa:ss@cache")
        'rediss://weir:***@cache'
    """
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:  # an unparsable URL: fall back to the pattern
        return _URL_CREDS.sub(rf"\1{MASK}\3", url)
    if password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def register_secret(value: str | None) -> None:
    """Hide ``value`` (and a URL's password) wherever :func:`redact_text` runs."""
    if not value:
        return
    if len(value) >= _MIN_SECRET:
        _secrets.add(value)
    if "://" in value:
        try:
            password = urllib.parse.urlsplit(value).password
        except ValueError:
            password = None
        if password:
            register_secret(urllib.parse.unquote(password))
            register_secret(password)


def register_env_secrets(env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> None:
    """Register the secret environment variables and the passwords of every URL-valued one."""
    env = os.environ if env is None else env
    for name in (*SECRET_ENV, *extra):
        register_secret(env.get(name))
    for value in env.values():
        if "://" in value and "@" in value:
            register_secret(value)


def redact_text(text: str) -> str:
    """``text`` with URL passwords and every registered secret replaced by ``***``."""
    if not text:
        return text
    out = _URL_CREDS.sub(rf"\1{MASK}\3", text)
    # Longest first, so a secret containing another is masked whole.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def install_excepthooks() -> None:
    """Redact the tracebacks Python prints itself: an uncaught exception, a thread's."""
    import sys
    import threading
    import traceback

    def excepthook(exc_type: Any, exc: Any, tb: Any) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(redact_text(text))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        sys.stderr.write(redact_text(f"Exception in thread {name}:\n{text}"))

    sys.excepthook = excepthook
    threading.excepthook = thread_hook


def install_log_redaction() -> None:
    """Redact every log record at creation (any logger, any handler, Faust's too).

    A record factory runs before handlers and formatters, so a library that installs
    its own handlers (Faust's worker does) still gets redacted records. The message is
    formatted once, redacted and stored without its args; an exception's text is
    formatted and redacted the same way.
    """
    current = logging.getLogRecordFactory()
    if getattr(current, "_weir_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: let logging report it as usual
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    factory._weir_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
