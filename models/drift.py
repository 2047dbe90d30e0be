"""Drift statistics over fixed bins: features, predictions and performance.

Nothing here keeps a stream's values. A numeric statistic keeps the first
``reference_size`` values only until it has fixed its bin edges (their quantiles),
then works on bin indices: reference counts per bin, and the counts of a sliding
window of the last ``window`` values (a ring buffer of small ints). A categorical
statistic does the same over at most ``max_categories`` categories (the rest are
``"__other__"``). Performance drift runs River's ADWIN or Page-Hinkley on each
label's loss (0/1 error for classification, absolute error for regression).

Every check returns a :class:`DriftRecord`, the JSON contract of the drift topic
(see ``docs/drift.md``). No statistic gives a verdict before ``min_samples``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time as _time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from weir.contracts import DriftKind, DriftRecord
from weir.errors import WeirError

if TYPE_CHECKING:
    from weir.spec import PipelineSpec

Method = Literal["psi", "ks", "js"]

#: Added to every bin's share so an empty bin gives a finite PSI (log of 0 otherwise).
EPSILON = 1e-4
#: The category every value outside the reference's most frequent ones is counted as.
OTHER = "__other__"
MISSING = "__missing__"


class DriftError(WeirError):
    """A drift statistic was configured or fed wrongly."""


# --------------------------------------------------------------------------------------
# Pure maths over counts
# --------------------------------------------------------------------------------------


def _shares(counts: Sequence[float], eps: float) -> list[float]:
    total = float(sum(counts))
    k = len(counts)
    if total <= 0:
        return [1.0 / k] * k
    return [(c / total + eps) / (1.0 + k * eps) for c in counts]


def psi(reference: Sequence[float], current: Sequence[float], eps: float = EPSILON) -> float:
    """Population stability index of two binned distributions (counts per bin).

    ``sum((c - r) * ln(c / r))`` over the bins' shares, each share smoothed by
    ``eps`` so an empty bin stays finite. 0 means identical; 0.1 is a small shift,
    0.2 and above a significant one (the usual rule of thumb).

    Examples:
        >>> psi([50, 50], [50, 50])
        0.0
        >>> round(psi([50, 50], [90, 10], eps=0), 4)  # 0.4*ln(1.8) + 0.4*ln(5)
        0.8789
        >>> round(psi([10, 20, 30, 40], [40, 30, 20, 10], eps=0), 4)
        0.9129
        >>> psi([100, 0], [100, 0]) == 0.0 and psi([100, 0], [50, 50]) < 10  # empty bin: finite
        True
    """
    _same_length(reference, current)
    r = _shares(reference, eps)
    c = _shares(current, eps)
    return max(0.0, sum((ci - ri) * math.log(ci / ri) for ri, ci in zip(r, c, strict=True)))


def js_distance(reference: Sequence[float], current: Sequence[float]) -> float:
    """Jensen-Shannon distance (base 2, so in [0, 1]) of two binned distributions.

    The square root of the JS divergence: symmetric, bounded and finite on empty
    bins without smoothing.

    Examples:
        >>> js_distance([50, 50], [50, 50])
        0.0
        >>> js_distance([1, 0], [0, 1])
        1.0
        >>> round(js_distance([50, 50], [90, 10]), 4)  # = scipy's jensenshannon(base=2)
        0.3831
    """
    _same_length(reference, current)
    r = _shares(reference, 0.0)
    c = _shares(current, 0.0)
    div = 0.0
    for ri, ci in zip(r, c, strict=True):
        m = (ri + ci) / 2
        if ri > 0:
            div += 0.5 * ri * math.log2(ri / m)
        if ci > 0:
            div += 0.5 * ci * math.log2(ci / m)
    return math.sqrt(min(1.0, max(0.0, div)))


def ks_statistic(reference: Sequence[float], current: Sequence[float]) -> float:
    """Kolmogorov-Smirnov statistic from binned CDFs: the largest CDF gap at a bin edge.

    A lower bound of the exact KS statistic (gaps inside a bin are not seen).

    Examples:
        >>> ks_statistic([50, 50], [50, 50])
        0.0
        >>> ks_statistic([50, 50], [90, 10])
        0.4
    """
    _same_length(reference, current)
    r = _shares(reference, 0.0)
    c = _shares(current, 0.0)
    gap = cr = cc = 0.0
    for ri, ci in zip(r, c, strict=True):
        cr += ri
        cc += ci
        gap = max(gap, abs(cr - cc))
    return round(gap, 12)


def chi_square(reference: Sequence[float], current: Sequence[float]) -> tuple[float, int, float]:
    """Chi-square goodness of fit of the current counts to the reference's shares.

    Returns ``(statistic, degrees_of_freedom, p_value)``; reference shares are
    smoothed by :data:`EPSILON` so a category unseen in the reference is finite.

    Examples:
        >>> stat, dof, p = chi_square([50, 50], [50, 50])
        >>> stat, dof, round(p, 3)
        (0.0, 1, 1.0)
    """
    _same_length(reference, current)
    r = _shares(reference, EPSILON)
    n = float(sum(current))
    if n <= 0:
        return 0.0, max(1, len(r) - 1), 1.0
    stat = sum((ci - n * ri) ** 2 / (n * ri) for ri, ci in zip(r, current, strict=True))
    dof = max(1, len(r) - 1)
    try:
        from scipy.special import chdtrc  # chi2.sf as a bare ufunc: ~40x cheaper

        p = float(chdtrc(dof, stat))
    except ImportError:  # scipy comes with river; keep the statistic usable without it
        p = math.nan
    return stat, dof, p


def _same_length(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b) or not a:
        raise DriftError(
            f"binned distributions must have the same non-zero length, got {len(a)} and {len(b)}"
        )


_DISTANCES = {"psi": psi, "js": js_distance, "ks": ks_statistic}


def quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    """Interior bin edges at the ``bins``-quantiles of ``values`` (duplicates dropped).

    Examples:
        >>> quantile_edges(list(range(100)), 4)
        [24.75, 49.5, 74.25]
        >>> quantile_edges([1.0] * 10, 4)
        [1.0]
    """
    import numpy as np

    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return []
    qs = np.quantile(arr, [i / bins for i in range(1, bins)])
    return sorted({float(q) for q in qs})


# --------------------------------------------------------------------------------------
# Statistics: one interface
# --------------------------------------------------------------------------------------


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


def _num(x: Any) -> float | None:
    # A numeric string parses (as numpy does in the batch path); anything else is missing.
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


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


def _cat(x: Any) -> str:
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


Detector = Literal["adwin", "page_hinkley"]


def make_detector(detector: Detector, params: dict[str, float] | None = None) -> Any:
    """A fresh River drift detector by the spec's name (imported by name)."""
    params = dict(params or {})
    if detector == "adwin":
        from river.drift import ADWIN

        for k in ("clock", "max_buckets", "min_window_length", "grace_period"):
            if k in params:
                params[k] = int(params[k])  # type: ignore[assignment]
        return ADWIN(**params)
    if detector == "page_hinkley":
        from river.drift import PageHinkley

        if "min_instances" in params:
            params["min_instances"] = int(params["min_instances"])  # type: ignore[assignment]
        # A falling loss is no reason to retrain: watch for increases only.
        kwargs: dict[str, Any] = {"mode": "up", **params}
        return PageHinkley(**kwargs)
    raise DriftError(f"detector must be 'adwin' or 'page_hinkley', got {detector!r}")


def loss(task: str, y_true: Any, y_pred: Any) -> float:
    """A label's loss: 0/1 error for classification, absolute error for regression.

    A missing prediction (an untrained model serves none) is not scored: NaN, which
    :class:`PerformanceDrift` skips, as ``models.evaluation.OnlineEvaluator`` does.

    Examples:
        >>> loss("binary", "1", True), loss("binary", "0", "1"), loss("regression", 2.0, 3.5)
        (0.0, 1.0, 1.5)
    """
    if y_pred is None:
        return math.nan
    if task == "regression":
        p, t = _num(y_pred), _num(y_true)
        return math.nan if p is None or t is None else abs(t - p)
    return 0.0 if same_label(y_true, y_pred) else 1.0


def same_label(a: Any, b: Any) -> bool:
    """Class labels compared by canonical string: True == 1 == "1" == 1.0."""
    return _cat(a) == _cat(b)


class PerformanceDrift(DriftStatistic):
    """Performance drift: a River detector (ADWIN or Page-Hinkley) on each label's loss.

    ``update(loss)`` feeds one loss. A detection latches ``drifted`` until
    :meth:`acknowledge` or :meth:`reset`; no detection counts before
    ``min_samples`` losses since the last reset. ``value()`` is the mean loss of
    the last ``window`` labels (a sliding mean, for the dashboards);
    ``threshold`` is the detector's sensitivity (ADWIN ``delta``, Page-Hinkley
    ``threshold``), reported for the record.
    """

    kind: DriftKind = "performance"

    def __init__(
        self,
        name: str = "loss",
        *,
        detector: Detector = "adwin",
        detector_params: dict[str, float] | None = None,
        min_samples: int = 200,
        window: int = 1000,
    ) -> None:
        self.name = name
        self.detector = detector
        self.detector_params = dict(detector_params or {})
        self.statistic = detector
        self.min_samples = min_samples
        self.window = window
        probe = make_detector(detector, self.detector_params)
        self.threshold = float(probe.delta if detector == "adwin" else probe.threshold)
        self.reset()

    def reset(self) -> None:
        self._det = make_detector(self.detector, self.detector_params)
        self._n = 0
        self._seen = 0
        self._ring: list[float] = []
        self._pos = 0
        self._sum = 0.0
        self._latched = False
        self.detections: list[int] = []
        self.improvements: list[int] = []
        self.last_detection: int | None = None

    def update(self, x: Any) -> bool:  # type: ignore[override]
        """Feed one loss; True when this update is a detection (NaN is skipped)."""
        v = _num(x)
        if v is None:
            return False
        self._n += 1
        self._seen += 1
        if len(self._ring) < self.window:
            self._ring.append(v)
        else:
            self._sum -= self._ring[self._pos]
            self._ring[self._pos] = v
            self._pos = (self._pos + 1) % self.window
        self._sum += v
        before = getattr(self._det, "estimation", None)
        self._det.update(v)
        # ADWIN flags a change either way; a falling loss (a model still warming up, or
        # recovering) is an improvement, counted but not a drift to act on.
        falling = before is not None and self.detector == "adwin" and self._det.estimation <= before
        if self._det.drift_detected and falling:
            self.improvements.append(self._seen)
            return False
        if self._det.drift_detected and self._n >= self.min_samples:
            self._latched = True
            self.last_detection = self._seen
            self.detections.append(self._seen)
            return True
        return False

    def acknowledge(self) -> None:
        """Clear the latched detection; the detector keeps its state."""
        self._latched = False

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def ready(self) -> bool:
        return self._n >= self.min_samples

    def value(self) -> float:
        return self._sum / len(self._ring) if self._ring else math.nan

    @property
    def drifted(self) -> bool:
        return self._latched

    def record(self, pipeline: str, model_version: str | None, now: float | None = None) -> DriftRecord:
        rec = super().record(pipeline, model_version, now)
        rec.value = self.value()
        rec.drifted = self._latched
        return rec

    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {"n": self._n, "detections": len(self.detections)}
        if self.last_detection is not None:
            d["last_detection_at"] = self.last_detection
        est = getattr(self._det, "estimation", None)
        if est is not None:
            d["estimation"] = float(est)
        return d


# --------------------------------------------------------------------------------------
# A pipeline's statistics together (pure: the monitor process and the bench use it)
# --------------------------------------------------------------------------------------


@dataclass
class DriftSuite:
    """All drift statistics of one pipeline, fed from prediction and training-log messages.

    Feature kinds come from the spec: a feature over a categorical field with
    ``raw``/``last`` is categorical, everything else numeric. Prediction drift is
    categorical over the predicted class (classification) or numeric over the
    predicted value (regression).
    """

    spec: PipelineSpec
    features: dict[str, _BinnedDrift] = field(default_factory=dict)
    prediction: _BinnedDrift | None = None
    performance: PerformanceDrift | None = None

    def __post_init__(self) -> None:
        self._drifted: set[str] = set()
        d = self.spec.drift
        common: dict[str, Any] = {
            "method": d.method,
            "reference_size": d.reference_size,
            "window": d.window,
            "min_samples": d.min_samples,
            "threshold": d.threshold,
        }
        watched = d.features if d.features is not None else self.spec.feature_names
        cats = categorical_features(self.spec)
        for name in watched:
            if name in cats:
                self.features[name] = CategoricalDrift(name, kind="feature", **common)
            else:
                self.features[name] = NumericDrift(name, bins=d.bins, kind="feature", **common)
        if self.spec.task == "regression":
            self.prediction = NumericDrift("prediction", bins=d.bins, kind="prediction", **common)
        else:
            self.prediction = CategoricalDrift("prediction", kind="prediction", **common)
        self.performance = PerformanceDrift(
            "loss",
            detector=d.detector,
            detector_params=d.detector_params,
            min_samples=d.min_samples,
            window=d.window,
        )

    def observe_prediction(self, features: dict[str, Any], prediction: Any) -> None:
        """Feed one served prediction (its features as served and its predicted value)."""
        for name, stat in self.features.items():
            stat.update(features.get(name))
        if self.prediction is not None:
            self.prediction.update(prediction)

    def observe_predictions(self, batch: Sequence[tuple[dict[str, Any], Any]]) -> None:
        """Feed many served predictions ``(features, prediction)`` at once (vectorised)."""
        if not batch:
            return
        numeric = self._numeric_names
        if numeric:
            cols = self._numeric_matrix([f for f, _ in batch], numeric)
            stats = [self.features[n] for n in numeric]
            if cols is not None and all(s.has_reference for s in stats):
                # All references fixed: bin every column here, skipping per-column checks.
                import numpy as np

                finite = np.isfinite(cols)
                all_finite = bool(finite.all())
                for j, st in enumerate(stats):
                    assert isinstance(st, NumericDrift)
                    b = np.searchsorted(st._edges_arr, cols[:, j], side="right")
                    if not all_finite:
                        b[~finite[:, j]] = len(st._edges) + 1
                    st.push_bins(b)
            else:
                for j, name in enumerate(numeric):
                    col = cols[:, j] if cols is not None else [f.get(name) for f, _ in batch]
                    self.features[name].update_many(col)
        for name in self._other_names:
            self.features[name].update_many([f.get(name) for f, _ in batch])
        if self.prediction is not None:
            # No prediction (a model that has learned nothing yet serves none) is not a
            # class or a value: counting it would make the warm-up the reference.
            self.prediction.update_many([p for _, p in batch if p is not None])

    @property
    def _numeric_names(self) -> list[str]:
        return [n for n, s in self.features.items() if isinstance(s, NumericDrift)]

    @property
    def _other_names(self) -> list[str]:
        return [n for n, s in self.features.items() if not isinstance(s, NumericDrift)]

    @staticmethod
    def _numeric_matrix(feats: list[dict[str, Any]], names: list[str]) -> Any:
        """Rows x numeric features as one float array (None -> NaN), or None when a value
        is not a number or a key is absent (then the per-feature path decides)."""
        import operator

        import numpy as np

        get = operator.itemgetter(*names)
        k = len(names)
        if k > 1:
            try:  # the common case, all present and numbers: no per-value Python objects kept
                flat = itertools.chain.from_iterable(map(get, feats))
                arr = np.fromiter(flat, dtype=float, count=len(feats) * k)
                return arr.reshape(len(feats), k)
            except (KeyError, TypeError, ValueError):
                pass  # a missing key, a None or a string: the careful path below
        try:
            rows = [get(f) for f in feats]
            if k == 1:
                rows = [(r,) for r in rows]
            arr = np.array(rows)
        except (KeyError, TypeError, ValueError):
            return None
        if arr.dtype.kind in "fiub":
            return arr.astype(float, copy=False)  # the common case: all numbers
        # None (missing) makes an object array; a string must count as missing, as
        # update() does, not be parsed: the per-feature path then.
        if arr.dtype.kind != "O" or any(isinstance(v, str) for r in rows for v in r):
            return None
        return arr.astype(float)

    def observe_label(self, y_true: Any, y_pred: Any) -> bool:
        """Feed one joined label; True when performance drift is detected on it."""
        assert self.performance is not None
        return self.performance.update(loss(self.spec.task, y_true, y_pred))

    def statistics(self) -> list[DriftStatistic]:
        out: list[DriftStatistic] = list(self.features.values())
        if self.prediction is not None:
            out.append(self.prediction)
        if self.performance is not None:
            out.append(self.performance)
        return out

    def check(self, model_version: str | None, now: float | None = None) -> list[DriftRecord]:
        """One record per statistic that is ready (plus a latched performance detection)."""
        now = _time.time() if now is None else now
        out = []
        for s in self.statistics():
            # ``drifted`` of a binned statistic computes its value: ask only the detector.
            if s.ready or (isinstance(s, PerformanceDrift) and s.drifted):
                out.append(s.record(self.spec.name, model_version, now))
        self._drifted = {r.name for r in out if r.kind == "feature" and r.drifted}
        return out

    def drifted_features(self) -> list[str]:
        """Features past their threshold at the latest :meth:`check`."""
        return [n for n in self.features if n in self._drifted]

    def rebase(self) -> None:
        """Forget the references: after a promotion the new champion's data is the reference."""
        for s in self.features.values():
            s.reset()
        if self.prediction is not None:
            self.prediction.reset()
        if self.performance is not None:
            self.performance.reset()


def categorical_features(spec: PipelineSpec) -> set[str]:
    """Names of the spec's features whose values are categories (strings)."""
    out: set[str] = set()
    for f in spec.features:
        is_copy = f.field is not None and f.agg in ("raw", "last")
        if is_copy and spec.fields[f.field].type == "categorical":  # type: ignore[index]
            out.add(f.name)
    return out
