"""Pure maths over binned counts: PSI, Jensen-Shannon, KS, chi-square, quantile bins."""

from __future__ import annotations

import math
from collections.abc import Sequence

from models.drift.base import DriftError

#: Added to every bin's share so an empty bin gives a finite PSI (log of 0 otherwise).
EPSILON = 1e-4


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
