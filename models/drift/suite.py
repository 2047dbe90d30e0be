"""A pipeline's drift statistics together (pure: the monitor process and the bench use it)."""

from __future__ import annotations

import itertools
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.drift.base import DriftStatistic
from models.drift.binned import CategoricalDrift, NumericDrift, _BinnedDrift
from models.drift.performance import PerformanceDrift, loss
from weir.contracts import DriftRecord

if TYPE_CHECKING:
    from weir.spec import PipelineSpec


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
