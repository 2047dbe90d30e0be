"""One root exception for everything Weir raises on purpose.

Every message names the field or thing at fault, shows the bad value and says
the fix, e.g. ``window must be > 0 seconds, got '0s': use a duration like '5m'``.
Each package has its own subclass so callers can catch one area at a time.
"""

from __future__ import annotations


class WeirError(Exception):
    """Root of every error Weir raises deliberately."""


class ConfigError(WeirError):
    """A ``WEIR_*`` environment setting is wrong."""


class SpecError(WeirError):
    """The pipeline spec (YAML) is invalid. ``problems`` lists one line per fault."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class StackError(WeirError):
    """A server (Kafka, Redis, Prometheus) is unreachable or misbehaving."""


class InvalidMessage(WeirError):
    """A message on a topic breaks its contract; it goes to the dead-letter topic.

    ``reason`` is a short machine-readable code (used as a metric label),
    the message text is the human explanation.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FeatureError(WeirError):
    """The feature engines were used wrongly (bad definition, bad backend state)."""


class ModelError(WeirError):
    """Building, loading or verifying a model failed."""


class IntegrityError(ModelError):
    """A model blob failed its sha256/HMAC check and was refused (never unpickled)."""


class ModelKeyError(IntegrityError):
    """A blob was signed with another model key: this process's key is not its pipeline's.

    A configuration error to stop on (share the key), not a bad blob to skip.
    """
