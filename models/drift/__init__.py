"""Drift statistics over fixed bins: features, predictions and performance.

One module per concept:

* :mod:`models.drift.base` - the :class:`DriftStatistic` interface, :class:`DriftError`
  and how values are read (missing, numbers, categories);
* :mod:`models.drift.statistics` - the pure maths over binned counts (PSI, JS, KS,
  chi-square, quantile bin edges);
* :mod:`models.drift.binned` - binned windows: :class:`NumericDrift` and
  :class:`CategoricalDrift`, reference counts vs. a sliding window's, keeping no values;
* :mod:`models.drift.performance` - :class:`PerformanceDrift`, River's ADWIN or
  Page-Hinkley on each label's loss;
* :mod:`models.drift.suite` - :class:`DriftSuite`, all of a pipeline's statistics fed
  from prediction and training-log messages.

Every check returns a :class:`~weir.contracts.DriftRecord`, the JSON contract of the
drift topic (see ``docs/drift.md``). No statistic gives a verdict before ``min_samples``.
Every public name is importable from ``models.drift``.
"""

from __future__ import annotations

from models.drift.base import MISSING, DriftError, DriftStatistic
from models.drift.binned import OTHER, CategoricalDrift, Method, NumericDrift
from models.drift.performance import Detector, PerformanceDrift, loss, make_detector, same_label
from models.drift.statistics import EPSILON, chi_square, js_distance, ks_statistic, psi, quantile_edges
from models.drift.suite import DriftSuite, categorical_features
from weir.contracts import DriftKind, DriftRecord

__all__ = [
    "EPSILON",
    "MISSING",
    "OTHER",
    "CategoricalDrift",
    "Detector",
    "DriftError",
    "DriftKind",
    "DriftRecord",
    "DriftStatistic",
    "DriftSuite",
    "Method",
    "NumericDrift",
    "PerformanceDrift",
    "categorical_features",
    "chi_square",
    "js_distance",
    "ks_statistic",
    "loss",
    "make_detector",
    "psi",
    "quantile_edges",
    "same_label",
]

#: ``doctest.testmod(models.drift)`` runs the examples of the names defined in the
#: package's modules (testmod only looks at objects defined in the module it is given).
__test__ = {
    "psi": psi,
    "js_distance": js_distance,
    "ks_statistic": ks_statistic,
    "chi_square": chi_square,
    "quantile_edges": quantile_edges,
    "loss": loss,
}
