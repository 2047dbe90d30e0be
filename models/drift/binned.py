"""Binned windows: reference counts vs. the counts of a sliding window, over fixed bins.

Nothing here keeps a stream's values. A numeric statistic keeps the first
``reference_size`` values only until it has fixed its bin edges (their quantiles),
then works on bin indices: reference counts per bin, and the counts of a sliding
window of the last ``window`` values (a ring buffer of small ints). A categorical
statistic does the same over at most ``max_categories`` categories (the rest are
``"__other__"``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from models.drift.base import DriftError, DriftStatistic, _cat, _num
from models.drift.statistics import _DISTANCES, chi_square, quantile_edges
from weir.contracts import DriftKind

Method = Literal["psi", "ks", "js"]

#: The category every value outside the reference's most frequent ones is counted as.
OTHER = "__other__"


class _BinnedDrift(DriftStatistic):
    """Reference counts vs. the counts of a sliding window, both over fixed bins."""

    def __init__(
        self,
        name: str,
        *,
        method: Method = "psi",
        reference_size: int = 1000,
        window: int = 1000,
        min_samples: int = 200,
        threshold: float = 0.2,
        kind: DriftKind = "feature",
    ) -> None:
        if method not in _DISTANCES:
            raise DriftError(f"method must be one of psi, ks, js, got {method!r}")
        if window < 1 or reference_size < 1:
            raise DriftError(f"window and reference_size must be >= 1, got {window!r} and {reference_size!r}")
        self.name = name
        self.method = method
        self.statistic = method
        self.reference_size = reference_size
        self.window = window
        self.min_samples = min_samples
        self.threshold = threshold
        self.kind = kind
        self.reset()

    # -- subclasses: fix the bins from the reference values, map a value to a bin --
    def _fix_bins(self, values: list[Any]) -> int:
        raise NotImplementedError

    def _bin(self, x: Any) -> int:
        raise NotImplementedError

    def _bins_many(self, values: Sequence[Any]) -> Any:
        """Bin indices of many values (a numpy int array); subclasses vectorise this."""
        import numpy as np

        return np.fromiter((self._bin(v) for v in values), dtype=np.int64, count=len(values))

    def reset(self) -> None:
        import numpy as np

        self._pending: list[Any] | None = []
        self._ref: list[int] = []
        self._cur: Any = np.zeros(0, dtype=np.int64)
        # The window as a ring of bin indices (small ints, not values); _pos is the
        # oldest slot once it is full.
        self._ring: Any = np.zeros(self.window, dtype=np.int32)
        self._filled = 0
        self._pos = 0

    def set_reference(self, values: Iterable[Any]) -> None:
        """Fix the bins and reference counts from given values (e.g. the training data)."""
        self.reset()
        vals = list(values)
        if not vals:
            raise DriftError(f"{self.name}: a reference needs at least one value, got none")
        self._freeze(vals)

    def _freeze(self, vals: list[Any]) -> None:
        import numpy as np

        n_bins = self._fix_bins(vals)
        self._ref = np.bincount(self._bins_many(vals), minlength=n_bins).tolist()
        self._cur = np.zeros(n_bins, dtype=np.int64)
        self._pending = None  # the raw reference values are dropped here

    def update(self, x: Any) -> None:
        if self._pending is not None:
            self._pending.append(x)
            if len(self._pending) >= self.reference_size:
                self._freeze(self._pending)
            return
        b = self._bin(x)
        self._cur[b] += 1
        if self._filled < self.window:
            self._ring[self._filled] = b
            self._filled += 1
        else:
            self._cur[self._ring[self._pos]] -= 1
            self._ring[self._pos] = b
            self._pos = (self._pos + 1) % self.window

    def update_many(self, values: Sequence[Any]) -> None:
        """Feed many values at once (vectorised: what the monitor does per consumed batch).

        Same result as calling :meth:`update` on each, in order.
        """

        vals = values
        if self._pending is not None:
            need = self.reference_size - len(self._pending)
            head = vals[:need]
            self._pending.extend(head.tolist() if hasattr(head, "tolist") else head)
            vals = vals[need:]
            if len(self._pending) < self.reference_size:
                return
            self._freeze(self._pending)
        if not len(vals):
            return
        self.push_bins(self._bins_many(vals))

    def push_bins(self, b: Any) -> None:
        """Slide the window over already-binned values (a numpy int array, in order)."""
        import numpy as np

        n_bins = len(self._cur)
        w = self.window
        if self._filled < w:
            k = min(w - self._filled, len(b))
            self._ring[self._filled : self._filled + k] = b[:k]
            self._cur += np.bincount(b[:k], minlength=n_bins)
            self._filled += k
            b = b[k:]
            if not len(b):
                return
        if len(b) >= w:
            self._ring[:] = b[-w:]
            self._cur = np.bincount(b[-w:], minlength=n_bins).astype(np.int64)
            self._pos = 0
            return
        # Overwrite the oldest len(b) slots: at most two contiguous slices of the ring.
        pos, m = self._pos, len(b)
        first = min(m, w - pos)
        old = self._ring[pos : pos + first]
        if first < m:
            old = np.concatenate((old, self._ring[: m - first]))
        # One bincount for in and out: the old bins counted in a second block.
        both = np.bincount(np.concatenate((b, old + n_bins)), minlength=2 * n_bins)
        self._cur += both[:n_bins] - both[n_bins:]
        self._ring[pos : pos + first] = b[:first]
        if first < m:
            self._ring[: m - first] = b[first:]
        self._pos = (pos + m) % w

    @property
    def has_reference(self) -> bool:
        return self._pending is None

    @property
    def n_samples(self) -> int:
        return self._filled

    @property
    def ready(self) -> bool:
        return self._pending is None and self._filled >= self.min_samples

    def value(self) -> float:
        if not self.ready:
            return math.nan
        return _DISTANCES[self.method](self._ref, self._cur.tolist())

    def counts(self) -> tuple[list[int], list[int]]:
        """(reference, current) counts per bin."""
        return list(self._ref), self._cur.tolist()


class NumericDrift(_BinnedDrift):
    """Drift of a numeric stream over quantile bins of its reference.

    Missing values (None, NaN) get a bin of their own, so a rise in missing
    values is drift too.
    """

    def __init__(self, name: str, *, bins: int = 10, **kw: Any) -> None:
        if bins < 2:
            raise DriftError(f"bins must be >= 2, got {bins!r}")
        self.bins = bins
        self._edges: list[float] = []
        super().__init__(name, **kw)

    def _fix_bins(self, values: list[Any]) -> int:
        import numpy as np

        arr = self._floats(values)
        if arr is None:
            arr = np.asarray([_num(v) for v in values], dtype=float)
        self._edges = quantile_edges(arr[np.isfinite(arr)].tolist(), self.bins)
        self._edges_arr = np.asarray(self._edges, dtype=float)
        return len(self._edges) + 2  # value bins + the missing bin

    def _bin(self, x: Any) -> int:
        v = _num(x)
        if v is None:
            return len(self._edges) + 1
        return bisect.bisect_right(self._edges, v)

    @staticmethod
    def _floats(values: Sequence[Any]) -> Any:
        """Values as a float array (None -> NaN), or None if some value is not a number."""
        import numpy as np

        arr = values if isinstance(values, np.ndarray) else np.asarray(values)
        if arr.dtype.kind in "fiub":
            return arr.astype(float, copy=False)
        # None (missing) makes an object array; a string (a producer bug) must count as
        # missing, as update() does, not be parsed: per value then.
        if arr.dtype.kind != "O" or any(isinstance(v, str) for v in values):
            return None
        try:
            return arr.astype(float)
        except (TypeError, ValueError):
            return None

    def _bins_many(self, values: Sequence[Any]) -> Any:
        import numpy as np

        arr = self._floats(values)
        if arr is None:
            return super()._bins_many(values)
        out = np.searchsorted(self._edges_arr, arr, side="right")
        finite = np.isfinite(arr)  # NaN (missing) and inf get the missing bin, as in _bin
        if not finite.all():
            out[~finite] = len(self._edges) + 1
        return out

    @property
    def edges(self) -> list[float]:
        return list(self._edges)

    def detail(self) -> dict[str, Any]:
        return {"n": self.n_samples, "bins": len(self._ref)}


class CategoricalDrift(_BinnedDrift):
    """Drift of a categorical stream over the reference's most frequent categories.

    At most ``max_categories`` categories get a bin; every other value (also one
    first seen after the reference) counts as ``"__other__"``. ``ks`` has no
    meaning on unordered categories, so it is read as ``js``. The chi-square test
    of the window against the reference's shares is reported in ``detail``.
    """

    def __init__(self, name: str, *, max_categories: int = 20, **kw: Any) -> None:
        if max_categories < 1:
            raise DriftError(f"max_categories must be >= 1, got {max_categories!r}")
        self.max_categories = max_categories
        self._index: dict[str, int] = {}
        super().__init__(name, **kw)
        if self.method == "ks":
            self.method = "js"
            self.statistic = "js"

    def _fix_bins(self, values: list[Any]) -> int:
        freq: dict[str, int] = {}
        for v in values:
            k = _cat(v)
            freq[k] = freq.get(k, 0) + 1
        # Ties broken by name so the bins do not depend on arrival order.
        top = sorted(freq, key=lambda k: (-freq[k], k))[: self.max_categories]
        self._index = {k: i for i, k in enumerate(sorted(top))}
        return len(self._index) + 1  # + __other__

    def _bin(self, x: Any) -> int:
        return self._index.get(_cat(x), len(self._index))

    def _bins_many(self, values: Sequence[Any]) -> Any:
        import numpy as np

        # Served values repeat (classes, categories): map each distinct raw value once.
        # (True, 1 and 1.0 hash alike and canonicalise alike, so one key serves them.)
        seen = self._seen
        out = []
        for v in values:
            b = seen.get(v)
            if b is None:
                b = seen[v] = self._bin(v)
                if len(seen) > 10 * self.max_categories + 100:
                    seen.clear()  # unbounded distinct values: keep the cache small
            out.append(b)
        return np.asarray(out, dtype=np.int64)

    def reset(self) -> None:
        self._seen: dict[Any, int] = {}
        super().reset()

    @property
    def categories(self) -> list[str]:
        return [*self._index, OTHER]

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {"n": self.n_samples, "categories": len(self._ref)}
        if self.ready:
            stat, dof, p = chi_square(self._ref, self._cur.tolist())
            d["chi2"] = round(stat, 6)
            d["chi2_dof"] = dof
            d["chi2_p"] = p if math.isfinite(p) else None
        return d
