"""Feature freshness: how old the newest contribution to each windowed feature is.

For an event ``e`` of entity ``E`` at time ``ts`` and a windowed feature with window ``W``,
the **contributions** are the events of ``e``'s window (docs/features.md: accepted earlier
in arrival order, or ``e`` itself, with a time in ``(ts - W, ts]``) that the aggregate
reads:

* an aggregate of a field (``count`` with a field, ``sum``, ``mean``, ``min``, ``max``,
  ``std``, ``last``, ``distinct``): the window's events whose field is present, ``e``
  included;
* ``count`` without a field: every event of the window, ``e`` included (so always 0);
* ``since_prev``: the OTHER events of the window (``e`` itself is not one), so its
  freshness is its value.

The feature's **age** is ``ts`` minus the largest time of its contributions, in event-time
seconds (>= 0), and None when it has none (an empty window for the field). A fresh
feature has age 0: the event itself brought its value. A growing age says the feature is
served from older data: the field stopped coming, or comes rarely.

The online engine computes it in the same script call as the features
(:mod:`features.lua`); :func:`offline_freshness` is the pandas reference the parity tests
hold it to. The scorer puts it in the prediction record (``freshness``) and observes it
in ``weir_feature_age_seconds{pipeline, feature}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from weir.spec import PipelineSpec

if TYPE_CHECKING:
    import pandas as pd

#: A feature is stale once its age passes this fraction of its window: its value then
#: rests on the older half of the window at best (``weir_feature_stale_after_seconds``).
STALE_FRACTION = 0.5


def freshness_names(spec: PipelineSpec) -> list[str]:
    """The features that have an age: every windowed one (not ``raw``), in spec order.

    Examples:
        >>> from weir.spec import parse_spec
        >>> spec = parse_spec({"name": "p", "task": "binary", "fields": {"x": "numeric"},
        ...     "features": [{"agg": "raw", "field": "x"}, {"agg": "mean", "field": "x", "window": "1h"},
        ...                  {"agg": "count", "window": "5m"}],
        ...     "model": {"steps": ["river.linear_model.LogisticRegression"]}})
        >>> freshness_names(spec)
        ['x_mean_1h', 'events_count_5m']
    """
    return [f.name for f in spec.features if f.window is not None]


def windows(spec: PipelineSpec) -> dict[str, float]:
    """Each windowed feature's window, in seconds."""
    return {f.name: f.window for f in spec.features if f.window is not None}


def stale_after(spec: PipelineSpec) -> dict[str, float]:
    """The age past which a feature of a field counts as stale (:data:`STALE_FRACTION` of
    its window). ``since_prev`` (its age is the entity's gap between events, which says
    nothing about the pipeline) and ``count`` without a field (always 0) have none."""
    return {
        f.name: STALE_FRACTION * f.window
        for f in spec.features
        if f.window is not None and f.field is not None and f.agg != "since_prev"
    }


def histogram_ages(
    names: Sequence[str], window: Mapping[str, float], records: Sequence[Mapping[str, float | None]]
) -> dict[str, list[float]]:
    """Per feature, the ages a batch of predictions observes: an undefined age (no
    contribution in the window) counts as the window itself, the least it can be. A record
    without ages (``{}``) observes nothing.

    Examples:
        >>> histogram_ages(["m"], {"m": 60.0}, [{"m": 0.0}, {"m": None}, {"m": 3.5}, {}])
        {'m': [0.0, 60.0, 3.5]}
    """
    recs = [r for r in records if r]  # {}: no ages known (a record from before freshness)
    out: dict[str, list[float]] = {}
    for n in names:
        w = window[n]
        out[n] = [w if a is None else a for a in [r.get(n) for r in recs]]
    return out


def offline_freshness(spec: PipelineSpec, events: pd.DataFrame, status: Sequence[str]) -> pd.DataFrame:
    """The reference computation of the ages, over a whole stream (pandas/numpy).

    Args:
        spec: The pipeline.
        events: Rows in arrival order: ``event_id``, ``entity_id``, ``ts`` and the fields
            (missing values as None or NaN), as :func:`features.offline.compute_offline`
            takes them.
        status: Each row's status (``ok``, ``duplicate``, ``late``), e.g. the ``status``
            column :func:`features.offline.compute_offline` returns.

    Returns:
        One column per windowed feature, same index: the age (NaN for none, and for a
        late row); a duplicate has the ages of its event id's first accepted row.
    """
    import numpy as np
    import pandas as pd

    names = freshness_names(spec)
    n = len(events)
    out = np.full((n, len(names)), np.nan)
    st = np.asarray(status, dtype=object)
    accepted = np.flatnonzero(st == "ok")
    ts_all = events["ts"].to_numpy(dtype=float)

    def is_present(v: object) -> bool:
        return not (v is None or (isinstance(v, float) and v != v))

    present = {
        f.field: events[f.field].map(is_present).to_numpy(bool)
        for f in spec.features
        if f.field is not None and f.window is not None and f.agg != "since_prev"
    }
    # Features with the same contributions share their ages: (window, kind, field) -> columns,
    # kind "others" (since_prev), "all" (count without a field) or "field".
    groups: dict[tuple[float, str, str | None], list[int]] = {}
    for col, f in enumerate(f for f in spec.features if f.window is not None):
        assert f.window is not None
        if f.agg == "since_prev":
            key: tuple[float, str, str | None] = (f.window, "others", None)
        else:
            key = (f.window, "all", None) if f.field is None else (f.window, "field", f.field)
        groups.setdefault(key, []).append(col)
    ent = events["entity_id"].to_numpy(dtype=object)[accepted]
    for e in pd.unique(ent):
        rows = accepted[ent == e]  # arrival order
        ts = ts_all[rows]
        m = len(rows)
        # earlier[i, j]: row j arrived before row i (or is row i), with a time at or before ts_i
        earlier = np.tril(np.ones((m, m), dtype=bool)) & (ts[None, :] <= ts[:, None])
        for (window, kind, field), cols in groups.items():
            mask = earlier & (ts[None, :] > ts[:, None] - window)
            if kind == "others":
                mask &= ~np.eye(m, dtype=bool)
            elif field is not None:
                mask &= present[field][rows][None, :]
            newest = np.where(mask, ts[None, :], -np.inf).max(axis=1)
            age = np.where(np.isfinite(newest), ts - newest, np.nan)
            for col in cols:
                out[rows, col] = age
    first: dict[object, int] = {}
    ids = events["event_id"].tolist()
    for i in range(n):
        if st[i] == "ok":
            first.setdefault(ids[i], i)
        elif st[i] == "duplicate" and ids[i] in first:
            out[i] = out[first[ids[i]]]
    return pd.DataFrame(out, index=events.index, columns=names)
