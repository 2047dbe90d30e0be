"""Durations written as ``'30s'``, ``'5m'``, ``'1h'``, ``'1d'`` or a number of seconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: str | float | int) -> float:
    """Seconds in a duration.

    Examples:
        >>> parse_duration("5m")
        300.0
        >>> parse_duration(90)
        90.0
        >>> parse_duration("250ms")
        0.25
    """
    if isinstance(value, bool):
        raise ValueError(f"a duration must be like '30s', '5m', '1h', '1d', got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    m = _RX.match(str(value))
    if not m:
        raise ValueError(
            f"a duration must be like '30s', '5m', '1h', '1d' or a number of seconds, got {value!r}"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """The shortest exact label for a duration, used in feature and metric names.

    Examples:
        >>> format_duration(3600)
        '1h'
        >>> format_duration(90)
        '90s'
    """
    for unit in ("d", "h", "m", "s"):
        n = seconds / _UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{int(seconds * 1000)}ms"
