"""The offline feature engine: a whole stream's features in pandas/numpy.

``compute_offline(spec, events)`` takes the events in ARRIVAL order and returns, for every
row, its status and features exactly as :class:`~features.online.RedisFeatureStore` serves
them (tested to 1e-9 against the real Redis). Its callers are the parity tests and the
benchmarks (``bench/features.py``, ``bench/e2e.py``); retraining does not use it: a
challenger is fitted on the training log, the features as they were served.

How it works: one sequential pass decides each row's status (duplicate, late, ok) with a
per-entity watermark; then the accepted rows are sorted by (entity, arrival) and cut into
blocks of rows. For a block, a boolean matrix rows x candidate-columns says which events
are in each row's window (same entity, arrived no later, ``ts - W < t <= ts``) and every
aggregate is a masked numpy reduction over it. Candidate columns start at the first event
whose entity watermark exceeds ``ts - max window`` (earlier ones can't be in any window),
so the cost per row is the number of events of its entity in the longest window, as online.

Examples:
    >>> import pandas as pd
    >>> from weir.spec import parse_spec
    >>> spec = parse_spec({
    ...     "name": "doc", "task": "regression", "fields": {"amount": "numeric"},
    ...     "lateness": 10,
    ...     "features": [{"agg": "sum", "field": "amount", "window": 60},
    ...                  {"agg": "since_prev", "window": 60}],
    ...     "model": {"steps": ["river.linear_model.LinearRegression"]}})
    >>> events = pd.DataFrame({
    ...     "event_id": ["a", "b", "c", "b", "d"], "entity_id": ["u"] * 5,
    ...     "ts": [100.0, 130.0, 125.0, 130.0, 110.0], "amount": [1.0, 2.0, 4.0, 2.0, 8.0]})
    >>> out = compute_offline(spec, events)
    >>> out["status"].tolist()
    ['ok', 'ok', 'ok', 'duplicate', 'late']
    >>> out["amount_sum_1m"].tolist()  # c at 125 sees a (100) and itself, not b (130)
    [1.0, 3.0, 5.0, 3.0, nan]
    >>> out["events_since_prev_1m"].tolist()
    [nan, 30.0, 25.0, 30.0, nan]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.base import missing_value, output_type, used_fields
from weir.errors import FeatureError
from weir.spec import FeatureSpec, PipelineSpec

#: Cells (rows x candidate columns) per block: bounds memory to tens of MB per block.
_BLOCK_CELLS = 1 << 20
_MAX_BLOCK_ROWS = 1024


@dataclass(slots=True)
class _Column:
    """A field's values over the accepted rows (sorted by entity, arrival)."""

    num: np.ndarray  # float64, NaN where missing (booleans as 0/1); categoricals: codes
    present: np.ndarray  # bool
    codes: np.ndarray  # int64 distinct-value codes, -1 where missing
    uniques: np.ndarray | None  # categorical: code -> string


def compute_offline(spec: PipelineSpec, events: pd.DataFrame) -> pd.DataFrame:
    """Compute every row's status and features, point-in-time correct.

    Args:
        spec: The pipeline spec (features, fields, lateness).
        events: One row per delivered event, in arrival order, with columns ``event_id``,
            ``entity_id``, ``ts`` (epoch seconds) and one column per field the features use
            (an optional field's column may be absent; missing values are None/NaN).

    Returns:
        A frame with the same index and rows: ``status`` ("ok", "duplicate", "late") and one
        column per feature. Numeric features are float64 with NaN where undefined (None
        online); categorical ``raw``/``last`` features are objects (str or None). A duplicate
        row repeats the features of the row that was first accepted with its ``event_id``; a
        late row has none.

    Raises:
        FeatureError: a column is missing, a ts is not a finite number, a required field is
            missing or a value does not fit its field's type.
    """
    for col in ("event_id", "entity_id", "ts"):
        if col not in events.columns:
            raise FeatureError(
                f"events has no column {col!r}; give columns event_id, entity_id, ts "
                f"and the fields {used_fields(spec)} (got {list(events.columns)})"
            )
    n = len(events)
    try:
        ts_all = events["ts"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"column 'ts' must be epoch seconds (numbers): {exc}") from None
    if n and not np.isfinite(ts_all).all():
        bad = float(ts_all[int(np.argmin(np.isfinite(ts_all)))])
        raise FeatureError(f"column 'ts' must be finite numbers, got {bad!r}")
    event_ids = events["event_id"].to_numpy(dtype=object)
    entity_codes, _ = pd.factorize(events["entity_id"], use_na_sentinel=False)

    status, first = _statuses(spec.lateness, event_ids, entity_codes, ts_all)
    accepted = np.flatnonzero(status == 0)
    # Accepted rows by (entity, arrival): a stable sort keeps arrival order within an entity.
    order = accepted[np.argsort(entity_codes[accepted], kind="stable")]
    ent = entity_codes[order]
    t = ts_all[order]

    columns = {name: _column(spec, name, events, order) for name in used_fields(spec)}
    values = _features(spec, ent, t, columns)

    out = pd.DataFrame(index=events.index)
    labels = np.array(["ok", "duplicate", "late"], dtype=object)
    out["status"] = labels[status]
    # Each row takes its features from the accepted row it stands for (itself, or the first
    # delivery of its event_id); late rows from nowhere.
    pos_in_order = np.full(n, -1, dtype=np.int64)
    pos_in_order[order] = np.arange(len(order))
    src = np.where(status == 1, first, np.arange(n))
    src_pos = np.where(status == 2, -1, pos_in_order[src])
    have = src_pos >= 0
    for i, f in enumerate(spec.features):
        v = values[i]
        vals = _empty(spec, i, n)
        vals[have] = v[src_pos[have]]
        # object dtype keeps None for undefined strings (pandas would infer str with NaN)
        out[f.name] = pd.Series(vals, index=events.index, dtype=vals.dtype)
    return out


def _statuses(
    lateness: float, event_ids: np.ndarray, ent: np.ndarray, ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Status per row (0 ok, 1 duplicate, 2 late) and, for duplicates, the first row."""
    n = len(ts)
    status = np.zeros(n, dtype=np.int8)
    first = np.full(n, -1, dtype=np.int64)
    seen: dict[object, int] = {}
    watermark: dict[int, float] = {}
    for i, (eid, e, t) in enumerate(zip(event_ids.tolist(), ent.tolist(), ts.tolist(), strict=True)):
        j = seen.get(eid)
        if j is not None:
            status[i] = 1
            first[i] = j
            continue
        wm = watermark.get(e)
        if wm is not None:
            if t < wm - lateness:
                status[i] = 2
                continue
            if t > wm:
                watermark[e] = t
        else:
            watermark[e] = t
        seen[eid] = i
    return status, first


def _column(spec: PipelineSpec, name: str, events: pd.DataFrame, order: np.ndarray) -> _Column:
    fs = spec.fields[name]
    if name not in events.columns:
        if fs.required:
            raise FeatureError(
                f"events has no column {name!r} but field {name!r} is required; add the "
                "column, or declare the field `required: false`"
            )
        k = len(order)
        uniques = np.array([], dtype=object) if fs.type == "categorical" else None
        return _Column(np.full(k, np.nan), np.zeros(k, bool), np.full(k, -1, np.int64), uniques)
    series = events[name]
    missing = series.isna().to_numpy()
    if fs.required and missing.any():
        row = int(np.argmax(missing))
        raise missing_value(name, events["event_id"].iloc[row])
    raw = series.to_numpy(dtype=object)
    present_all = ~missing
    if fs.type == "categorical":
        bad = [v for v in raw[present_all] if not isinstance(v, str)]
        if bad:
            raise FeatureError(
                f"field {name!r} is categorical and must hold strings, got {bad[0]!r}; "
                "convert the column with .astype(str) or fix the producer"
            )
        sub = series.iloc[order]
        codes, uniques = pd.factorize(sub, use_na_sentinel=True)
        codes = codes.astype(np.int64)
        return _Column(codes.astype(np.float64), codes >= 0, codes, np.asarray(uniques, object))
    if fs.type == "boolean":
        bad = [v for v in raw[present_all] if not isinstance(v, bool | np.bool_)]
        if bad:
            raise FeatureError(f"field {name!r} is boolean and must hold true/false, got {bad[0]!r}")
    else:
        bad = [
            v for v in raw[present_all] if isinstance(v, str) or not isinstance(v, int | float | np.number)
        ]
        if bad:
            raise FeatureError(
                f"field {name!r} is numeric and must hold numbers, got {bad[0]!r}; "
                "convert the column with pd.to_numeric"
            )
    num_all = np.full(len(raw), np.nan)
    num_all[present_all] = np.asarray(raw[present_all], dtype=np.float64)
    if not np.isfinite(num_all[present_all]).all():
        bad_v = float(num_all[present_all][~np.isfinite(num_all[present_all])][0])
        raise FeatureError(f"field {name!r} must hold finite numbers, got {bad_v!r}")
    num = num_all[order] + 0.0  # -0.0 -> 0.0: one distinct value, as online
    present = present_all[order]
    codes, _ = pd.factorize(pd.Series(num), use_na_sentinel=True)
    return _Column(num, present, codes.astype(np.int64), None)


def _features(
    spec: PipelineSpec, ent: np.ndarray, t: np.ndarray, columns: dict[str, _Column]
) -> list[np.ndarray]:
    """Feature values for the accepted rows (sorted by entity, arrival)."""
    k = len(t)
    out = [_empty(spec, i, k) for i in range(len(spec.features))]
    windows = [f.window for f in spec.features if f.window is not None]
    for i, f in enumerate(spec.features):
        if f.agg == "raw":
            out[i][:] = _own(f, columns)
    if not windows or k == 0:
        return out
    max_w = max(windows)
    # Per entity: where it starts and its running watermark (max ts of accepted so far).
    starts = np.flatnonzero(np.r_[True, ent[1:] != ent[:-1]])
    ends = np.r_[starts[1:], k]
    wm = t.copy()
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        wm[s:e] = np.maximum.accumulate(t[s:e])
    ent_start = np.repeat(starts, ends - starts)
    ent_end = np.repeat(ends, ends - starts)
    b0 = 0
    while b0 < k:
        j0 = _first_candidate(t, wm, ent_start, ent_end, b0, b0 + 1, max_w)
        rows = max(1, min(_MAX_BLOCK_ROWS, _BLOCK_CELLS // max(1, b0 - j0 + 1)))
        b1 = min(k, b0 + rows)
        j0 = _first_candidate(t, wm, ent_start, ent_end, b0, b1, max_w)
        _block(spec, ent, t, columns, out, j0, b0, b1)
        b0 = b1
    return out


def _empty(spec: PipelineSpec, i: int, n: int) -> np.ndarray:
    """An all-undefined column for feature ``i``: None (strings) or NaN (numbers)."""
    return np.full(n, None, dtype=object) if output_type(spec, i) == "string" else np.full(n, np.nan)


def _first_candidate(
    t: np.ndarray,
    wm: np.ndarray,
    ent_start: np.ndarray,
    ent_end: np.ndarray,
    b0: int,
    b1: int,
    max_w: float,
) -> int:
    """First column that can be in the window of a row of ``[b0, b1)``.

    Rows of later entities in the block only look at their own entity, which starts inside
    the block, so only the block's first entity needs a search. An event whose watermark is
    <= ``ts - max_w`` has ``t <= wm <= ts - max_w``: outside every window of these rows.
    """
    s, e = int(ent_start[b0]), int(ent_end[b0])
    last = min(b1, e)
    lo = float(np.min(t[b0:last] - max_w))
    return s + int(np.searchsorted(wm[s:e], lo, side="right"))


def _own(f: FeatureSpec, columns: dict[str, _Column]) -> np.ndarray:
    assert f.field is not None
    c = columns[f.field]
    if c.uniques is not None:
        vals = np.full(len(c.codes), None, dtype=object)
        vals[c.present] = c.uniques[c.codes[c.present]]
        return vals
    return c.num


def _block(
    spec: PipelineSpec,
    ent: np.ndarray,
    t: np.ndarray,
    columns: dict[str, _Column],
    out: list[np.ndarray],
    j0: int,
    b0: int,
    b1: int,
) -> None:
    ti = t[b0:b1, None]
    tj = t[None, j0:b1]
    rows = np.arange(b0, b1)[:, None]
    cols = np.arange(j0, b1)[None, :]
    base = (ent[b0:b1, None] == ent[None, j0:b1]) & (cols <= rows) & (tj <= ti)
    masks: dict[float, np.ndarray] = {}
    own = rows == cols
    # Order of columns by (ts, arrival): "last" is the max of this rank in the window.
    rank = np.empty(b1 - j0, dtype=np.int64)
    rank[np.lexsort((np.arange(b1 - j0), t[j0:b1]))] = np.arange(b1 - j0)
    for i, f in enumerate(spec.features):
        if f.window is None:
            continue
        m = masks.get(f.window)
        if m is None:
            m = base & (tj > ti - f.window)
            masks[f.window] = m
        out[i][b0:b1] = _aggregate(f, m, own, t[j0:b1], rank, columns, j0, b1)


def _aggregate(
    f: FeatureSpec,
    m: np.ndarray,
    own: np.ndarray,
    tc: np.ndarray,
    rank: np.ndarray,
    columns: dict[str, _Column],
    j0: int,
    b1: int,
) -> np.ndarray:
    """One windowed aggregate for a block: ``m`` is rows x columns window membership."""
    if f.agg == "since_prev":
        prev = np.where(m & ~own, tc[None, :], -np.inf).max(axis=1)
        return np.where(np.isfinite(prev), tc[own.argmax(axis=1)] - prev, np.nan)
    if f.field is None:  # count of events
        return m.sum(axis=1).astype(np.float64)
    c = columns[f.field]
    mp = m & c.present[None, j0:b1]
    cnt = mp.sum(axis=1)
    if f.agg == "count":
        return cnt.astype(np.float64)
    if f.agg == "distinct":
        codes = np.sort(np.where(mp, c.codes[None, j0:b1], -1), axis=1)
        new = codes >= 0
        new[:, 1:] &= codes[:, 1:] != codes[:, :-1]
        return new.sum(axis=1).astype(np.float64)
    if f.agg == "last":
        r = np.where(mp, rank[None, :], -1)
        pick = r.argmax(axis=1)
        has = cnt > 0
        if c.uniques is not None:
            vals = np.full(len(cnt), None, dtype=object)
            vals[has] = c.uniques[c.codes[j0 + pick[has]]]
            return vals
        return np.where(has, c.num[j0 + pick], np.nan)
    v = c.num[None, j0:b1]
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(mp, v, 0.0).sum(axis=1)
        if f.agg == "sum":
            return total
        if f.agg == "mean":
            return np.where(cnt > 0, total / cnt, np.nan)
        if f.agg == "min":
            return np.where(cnt > 0, np.where(mp, v, np.inf).min(axis=1), np.nan)
        if f.agg == "max":
            return np.where(cnt > 0, np.where(mp, v, -np.inf).max(axis=1), np.nan)
        if f.agg == "std":
            mean = total / cnt
            dev = np.where(mp, v - mean[:, None], 0.0)
            return np.where(cnt > 0, np.sqrt((dev * dev).sum(axis=1) / cnt), np.nan)
    raise FeatureError(f"aggregate {f.agg!r} has no offline implementation; see docs/features.md")


def isclose(a: float | str | None, b: float | str | None, tol: float = 1e-9) -> bool:
    """Equality of two feature values as the parity tests define it (None == NaN)."""
    a_none = a is None or (isinstance(a, float) and math.isnan(a))
    b_none = b is None or (isinstance(b, float) and math.isnan(b))
    if a_none or b_none:
        return a_none and b_none
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    assert a is not None and b is not None
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
