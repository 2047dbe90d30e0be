"""The interface every drift statistic follows, and how values are read.

A statistic is fed values one at a time (``update``) or a batch at once, gives no
verdict before ``min_samples``, and reports each check as a
:class:`~weir.contracts.DriftRecord` (the drift topic's record).
"""

from __future__ import annotations

import math
import time as _time
from typing import Any

from weir.contracts import DriftKind, DriftRecord
from weir.errors import WeirError

#: The category a missing value (None) is counted as.
MISSING = "__missing__"


class DriftError(WeirError):
    """A drift statistic was configured or fed wrongly."""


class DriftStatistic:
    """The interface every drift statistic follows (see the contract tests).

    ``update(x)`` feeds one value; ``ready`` says whether a verdict may be given
    (reference fixed and ``min_samples`` in the current window); ``value()`` is the
    statistic (NaN when not ready); ``drifted`` compares it with ``threshold``;
    ``record(...)`` wraps the check as a :class:`DriftRecord`; ``reset()`` forgets
    everything, reference included.
    """

    kind: DriftKind
    name: str
    statistic: str
    threshold: float
    min_samples: int

    def update(self, x: Any) -> None:
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def n_samples(self) -> int:
        """Values in the current window (or since the last reset, for detectors)."""
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError

    @property
    def drifted(self) -> bool:
        return self.ready and self.value() > self.threshold

    def detail(self) -> dict[str, Any]:
        return {"n": self.n_samples}

    def reset(self) -> None:
        raise NotImplementedError

    def record(self, pipeline: str, model_version: str | None, now: float | None = None) -> DriftRecord:
        ready = self.ready
        value = self.value() if ready else math.nan
        return DriftRecord(
            time=_time.time() if now is None else now,
            pipeline=pipeline,
            model_version=model_version,
            kind=self.kind,
            name=self.name,
            statistic=self.statistic,
            value=value,
            threshold=self.threshold,
            drifted=ready and value > self.threshold,
            detail={**self.detail(), "ready": ready},
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, statistic={self.statistic!r})"


def _num(x: Any) -> float | None:
    # A numeric string parses (as numpy does in the batch path); anything else is missing.
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _cat(x: Any) -> str:
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)
