"""The Lua script the online engine runs once per event, generated from the spec.

The windows, aggregates, lateness and TTLs are baked into the script text, so Redis does
no spec interpretation per event. One call runs a whole batch, in order
(``EVALSHA sha 0 prefix batch``): per event a Python pipeline of ``EVALSHA`` commands
cost about 30 µs of client CPU (packing, parsing) plus Redis's per-command and per-script
overhead; one call per batch costs well under 1 µs per event on the client.

* ``ARGV[1]`` the pipeline's key prefix (``spec.redis_prefix``); the script derives the
  keys from it. Weir runs on a single Redis, not a Cluster (docs/features.md), so keys
  need not be declared in ``KEYS``.
* ``ARGV[2]`` the batch: per event, four length-prefixed strings ``<bytes>:<string>``:
  the entity id, the event id, ``<ts>|<tokens>`` (ts as ``repr(float)``, then the
  event's tokens, every used field, joined by ``|``), and ``<topic>:<partition>|<offset>``
  of its Kafka message, or empty. Length prefixes let ids hold any character.

Per event, with ``<p>`` the prefix:

* ``<p>:win:<entity>`` ZSET of the entity's accepted events: score = ts, member =
  ``<12-digit arrival seq>|<token>|<token>...`` (one token per field a windowed aggregate
  reads; raw-only fields are not stored); the zero-padded seq makes members unique and
  orders equal timestamps by arrival.
* ``<p>:meta:<entity>`` hash of the entity: ``wm`` (watermark: max ts accepted), ``seq``.
* ``<p>:applied`` hash ``<topic>:<partition>`` -> highest offset decided; an event at or
  below it is a redelivery: answered from ``recent``, else from its served record
  ``<p>:served:<event>`` (packed doubles, :class:`models.join.ServedStore`), else computed
  read-only (not stored again).
* ``<p>:recent:<n>`` hash event id -> first served features (little-endian doubles, NaN for
  None, when every feature is a number; else the reply's tokens), per ``DEDUPE`` seconds of
  Redis ``TIME``; buckets n and n-1 are read, n-2 unlinked (an event id of a producer's
  retry under a new offset is a duplicate for at least ``scoring.dedupe_horizon``).

Tokens (see :mod:`features.online`): '' for missing; numbers as ``repr(float)`` (exact
through ``tonumber``); booleans ``0``/``1``; categoricals ``s`` + the string with ``%`` and
``|`` percent-escaped, so any string is safe and distinct strings stay distinct.

Returns one string per event, in order: ``l`` (late), or ``o|`` / ``d|`` (ok / duplicate)
followed by one token per feature joined by ``|``. Numbers are formatted ``%.17g`` (exact round trip), because
numbers returned to Redis would be truncated to integers; '' stands for None.
"""

from __future__ import annotations

from features.base import dedupe_seconds, entity_ttl, output_type, used_fields
from weir.errors import FeatureError
from weir.spec import FeatureSpec, PipelineSpec

_PRELUDE = r"""
local prefix = ARGV[1]
local function split(s)
  local t, i, m = {}, 1, 0
  while true do
    local j = string.find(s, '|', i, true)
    m = m + 1
    if j then t[m] = string.sub(s, i, j - 1); i = j + 1 else t[m] = string.sub(s, i); return t end
  end
end
local function fmt(x) return string.format('%.17g', x) end

local A = {}
function A.count(v, m) return fmt(m) end
function A.sum(v, m)
  local t = 0
  for k = 1, m do t = t + v[k] end
  return fmt(t)
end
function A.mean(v, m)
  if m == 0 then return '' end
  local t = 0
  for k = 1, m do t = t + v[k] end
  return fmt(t / m)
end
function A.min(v, m)
  if m == 0 then return '' end
  local x = v[1]
  for k = 2, m do if v[k] < x then x = v[k] end end
  return fmt(x)
end
function A.max(v, m)
  if m == 0 then return '' end
  local x = v[1]
  for k = 2, m do if v[k] > x then x = v[k] end end
  return fmt(x)
end
function A.std(v, m)
  if m == 0 then return '' end
  local t = 0
  for k = 1, m do t = t + v[k] end
  local mean, ss = t / m, 0
  for k = 1, m do local d = v[k] - mean; ss = ss + d * d end
  return fmt(math.sqrt(ss / m))
end
function A.last(v, m)
  if m == 0 then return '' end
  return v[m]
end
function A.distinct(v, m)
  local seen, d = {}, 0
  for k = 1, m do
    if not seen[v[k]] then seen[v[k]] = true; d = d + 1 end
  end
  return fmt(d)
end

-- The first features served for an event, within the dedupe window: a hash per window
-- of wall time (the current one and the one before are read, so an entry is found for at
-- least DEDUPE seconds); the one before those is unlinked (freed off the main thread).
local now = tonumber(redis.call('TIME')[1])
local bucket = math.floor(now / DEDUPE)
local recent_p = prefix .. ':recent:'
local rnow, rprev = recent_p .. bucket, recent_p .. (bucket - 1)
redis.call('UNLINK', recent_p .. (bucket - 2))
local recent_written = false
local function recent(eid)
  return redis.call('HGET', rnow, eid) or redis.call('HGET', rprev, eid)
end
-- When every feature is a number, the recent features are packed doubles (NaN for None):
-- 8 bytes a feature instead of up to 24 as text.
local function pack_fv(out)
  local t = {}
  for i = 1, NFEAT do t[i] = tonumber(out[i]) or 0 / 0 end
  return struct.pack(PACKFMT, unpack(t))
end
local function unpack_fv(s)
  local out = {}
  for i = 1, NFEAT do
    local v = struct.unpack('<d', s, 8 * i - 7)
    if v ~= v then out[i] = '' else out[i] = fmt(v) end
  end
  return table.concat(out, '|')
end

-- The highest offset applied per (events topic, partition), read once per call.
local applied_key = prefix .. ':applied'
local applied, applied_moved = {}, {}
local function seen_offset(tp, off)
  local a = applied[tp]
  if a == nil then
    a = tonumber(redis.call('HGET', applied_key, tp)) or -1
    applied[tp] = a
  end
  if off > a then applied[tp] = off; applied_moved[tp] = true; return false end
  return true
end

-- A served record (models.join.ServedStore) as feature tokens; nil if its layout is not
-- the compact one with the features in spec order.
local function esc(v)
  return (string.gsub(string.gsub(v, '%%', '%%25'), '|', '%%7C'))
end
local function served_tokens(rec)
  local pos = 1
  if string.byte(rec, 1) == 2 then pos = 3 + string.byte(rec, 2) end  -- learned marker first
  if string.byte(rec, pos) ~= 1 then return nil end
  local n = struct.unpack('<H', rec, pos + 1)
  local ok, head = pcall(cjson.decode, string.sub(rec, pos + 3, pos + 2 + n))
  if not ok then return nil end
  local feats, out = head[7], {}
  if feats == 0 then
    local p = pos + 3 + n
    for i = 1, NFEAT do
      local v = struct.unpack('<d', rec, p)
      p = p + 8
      if v ~= v then out[i] = '' else out[i] = fmt(v) end
    end
  elseif type(feats) == 'table' and #feats == NFEAT then
    for i = 1, NFEAT do
      local v = feats[i]
      if type(v) == 'number' then out[i] = fmt(v)
      elseif type(v) == 'string' then out[i] = 's' .. esc(v)
      else out[i] = '' end
    end
  else
    return nil
  end
  return table.concat(out, '|')
end

-- One event: its keys, its ts (as sent), its tokens, and its position (or nil).
local function one(kwin, kmeta, eid, ts_s, args, tp, off)
local ts = tonumber(ts_s)
local again = tp ~= nil and seen_offset(tp, off)
local known = recent(eid)
if known then return 'd|' .. RECENT_TOKENS end
if again then
  local rec = redis.call('GET', prefix .. ':served:' .. eid)
  if rec then
    local toks = served_tokens(rec)
    if toks then return 'd|' .. toks end
  end
end
local meta = redis.call('HMGET', kmeta, 'wm', 'seq')
local wm = tonumber(meta[1])
if wm and ts < wm - LATENESS then return 'l' end
local seq = (tonumber(meta[2]) or 0) + 1
local own = split(args)

-- The window events (arrived earlier, ts in (ts - LISTW, ts]), by (ts, arrival).
local n, sc, tok = 0, {}, {}
if LISTW > 0 then
  local r = redis.call('ZRANGEBYSCORE', kwin, '(' .. fmt(ts - LISTW), ts_s, 'WITHSCORES')
  for k = 1, #r, 2 do
    n = n + 1
    tok[n] = PARSE
    sc[n] = tonumber(r[k + 1])
  end
end
-- First list index inside the window (ts - w, ts]: the in-window events are a suffix.
local function first(w)
  local lo, s = ts - w, n + 1
  while s > 1 and sc[s - 1] > lo do s = s - 1 end
  return s
end
-- Present tokens of a field in the window from list index s, then the event's own:
-- si is its place in a stored member (after the seq), oi its place in the event's tokens.
local function toks(s, si, oi)
  local v, m = {}, 0
  for k = s, n do
    local x = FIELD
    if x ~= '' then m = m + 1; v[m] = x end
  end
  local x = own[oi]
  if x ~= '' then m = m + 1; v[m] = x end
  return v, m
end
local function nums(s, si, oi)
  local v, m = toks(s, si, oi)
  for k = 1, m do v[k] = tonumber(v[k]) end
  return v, m
end
local function since_prev_list(s)
  if s <= n then return fmt(ts - sc[n]) end
  return ''
end
local function since_prev_zset(w)
  local r = redis.call('ZREVRANGEBYSCORE', kwin, ts_s, '(' .. fmt(ts - w),
                       'WITHSCORES', 'LIMIT', 0, 1)
  if r[2] then return fmt(ts - tonumber(r[2])) end
  return ''
end
local function count_zset(w)
  return fmt(redis.call('ZCOUNT', kwin, '(' .. fmt(ts - w), ts_s) + 1)
end

local out = {}
"""

_EPILOGUE = r"""
local fv = table.concat(out, '|')
-- Redelivered (its offset was applied) yet unknown here: computed from the window as it is
-- now, read-only (the event is not stored again).
if again then return 'd|' .. fv end
redis.call('ZADD', kwin, ts_s, string.format('%012d', seq)STORED)
if not wm or ts > wm then wm = ts end
redis.call('HSET', kmeta, 'wm', fmt(wm), 'seq', string.format('%d', seq))
TRIM
redis.call('EXPIRE', kwin, ENTITY_TTL)
redis.call('EXPIRE', kmeta, ENTITY_TTL)
redis.call('HSET', rnow, eid, RECENT_VALUE)
recent_written = true
return 'o|' .. fv
end

-- The batch: per event four length-prefixed strings (entity, event id, ts|tokens, and
-- '<topic>:<partition>|<offset>' or '' when the position is unknown).
local batch, pos, res = ARGV[2], 1, {}
local function field()
  local c = string.find(batch, ':', pos, true)
  local e = c + tonumber(string.sub(batch, pos, c - 1))
  pos = e + 1
  return string.sub(batch, c + 1, e)
end
local winp, metap = prefix .. ':win:', prefix .. ':meta:'
while pos <= #batch do
  local ent = field()
  local eid = field()
  local rest = field()
  local where = field()
  local tp, off = nil, nil
  if where ~= '' then
    local bar = string.find(where, '|', 1, true)
    tp, off = string.sub(where, 1, bar - 1), tonumber(string.sub(where, bar + 1))
  end
  local bar = string.find(rest, '|', 1, true)
  res[#res + 1] = one(winp .. ent, metap .. ent, eid, string.sub(rest, 1, bar - 1),
                      string.sub(rest, bar + 1), tp, off)
end
if recent_written then redis.call('EXPIRE', rnow, 2 * DEDUPE + 60) end
local moved = {}
for tp, _ in pairs(applied_moved) do
  moved[#moved + 1] = tp
  moved[#moved + 1] = string.format('%d', applied[tp])
end
if #moved > 0 then
  redis.call('HSET', applied_key, unpack(moved))
  redis.call('EXPIRE', applied_key, APPLIED_TTL)
end
return res
"""

#: TTL (s) of the applied offsets, renewed by every call that moves one: a week, longer than
#: any outage a worker's uncommitted events could be redelivered after.
APPLIED_TTL = 7 * 86_400

#: Aggregates whose windowed value needs the list of window events (not a ZSET count).
_LIST_AGGS = frozenset({"count", "sum", "mean", "min", "max", "std", "last", "distinct"})
#: Aggregates computed on numbers (tokens parsed with tonumber) rather than raw tokens.
_NUMERIC = frozenset({"sum", "mean", "min", "max", "std"})


def _needs_list(f: FeatureSpec) -> bool:
    return f.window is not None and f.agg in _LIST_AGGS and f.field is not None


def list_window(spec: PipelineSpec) -> float:
    """The window of events the script fetches per event: longest window needing values."""
    return max((f.window for f in spec.features if _needs_list(f) and f.window), default=0.0)


def stored_fields(spec: PipelineSpec) -> list[str]:
    """The fields kept in the window ZSET: those of windowed aggregates (not raw ones)."""
    wanted = {f.field for f in spec.features if _needs_list(f)}
    return [name for name in used_fields(spec) if name in wanted]


def _trim(spec: PipelineSpec) -> str:
    """Lua that drops the stored events no acceptable event's features can depend on.

    An accepted event has ``ts >= wm - lateness``, so an event at or below
    ``(wm - lateness) - W`` is outside all its windows of at most ``W``. ``since_prev``
    only needs the newest stored event at or below ``wm - lateness`` (it dominates older
    ones), so a long ``since_prev`` window does not keep a long history.
    """
    lateness = repr(float(spec.lateness))
    full = [f.window for f in spec.features if f.window is not None and f.agg != "since_prev"]
    since = [f.window for f in spec.features if f.window is not None and f.agg == "since_prev"]
    full_w = max(full, default=None)
    horizon = f"local horizon = wm - {lateness}"
    if not since or (full_w is not None and max(since) <= full_w):
        bound = max(full_w or 0.0, *since) if since else (full_w or 0.0)
        return f"{horizon}\nredis.call('ZREMRANGEBYSCORE', kwin, '-inf', fmt(horizon - {bound!r}))"
    cut = "math.huge" if full_w is None else f"horizon - {full_w!r}"
    return f"""{horizon}
local cut = {cut}
local p = redis.call('ZREVRANGEBYSCORE', kwin, fmt(horizon), '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
if p[2] then
  if cut < tonumber(p[2]) then
    redis.call('ZREMRANGEBYSCORE', kwin, '-inf', fmt(cut))
  else
    redis.call('ZREMRANGEBYSCORE', kwin, '-inf', '(' .. p[2])
  end
end"""


def packs_recent(spec: PipelineSpec) -> bool:
    """Whether the recent first features are packed doubles (every feature a number)."""
    return all(output_type(spec, i) == "number" for i in range(len(spec.features)))


def build_script(spec: PipelineSpec) -> str:
    """The Lua source for ``spec`` (deterministic: its sha1 names it in Redis)."""
    own = {name: i + 1 for i, name in enumerate(used_fields(spec))}  # own[i]
    stored = {name: i + 1 for i, name in enumerate(stored_fields(spec))}  # tok[k][i + 1]
    listw = list_window(spec)
    lines = [f"-- weir feature script for pipeline {spec.name!r}: generated, do not edit"]
    if len(stored) == 1:
        # One stored field (the common case): no table per member, ~40% less Lua time
        # for entities with many events in their window.
        parse, field = "string.sub(r[k], string.find(r[k], '|', 1, true) + 1)", "tok[k]"
    else:
        parse, field = "split(r[k])", "tok[k][si + 1]"
    lines.append(
        _PRELUDE.replace("LATENESS", repr(float(spec.lateness)))
        .replace("DEDUPE", str(dedupe_seconds(spec)))
        .replace("NFEAT", str(len(spec.features)))
        .replace("PACKFMT", repr("<" + "d" * len(spec.features)))
        .replace("RECENT_TOKENS", "unpack_fv(known)" if packs_recent(spec) else "known")
        .replace("LISTW", repr(listw))
        .replace("PARSE", parse)
        .replace("FIELD", field)
    )
    starts: dict[float, str] = {}
    for i, f in enumerate(spec.features):
        slot = f"out[{i + 1}]"
        w = f.window
        if f.agg == "raw":
            assert f.field is not None
            lines.append(f"{slot} = own[{own[f.field]}]  -- {f.name}")
            continue
        assert w is not None
        covered = w <= listw
        if covered and w not in starts:
            starts[w] = f"s{len(starts) + 1}"
            lines.append(f"local {starts[w]} = first({w!r})")
        s = starts.get(w)
        if f.agg == "since_prev":
            call = f"since_prev_list({s})" if covered else f"since_prev_zset({w!r})"
        elif f.agg == "count" and f.field is None:
            call = f"fmt(n - {s} + 2)" if covered else f"count_zset({w!r})"
        elif f.agg in _LIST_AGGS:
            assert f.field is not None and s is not None
            get = "nums" if f.agg in _NUMERIC else "toks"
            call = f"A.{f.agg}({get}({s}, {stored[f.field]}, {own[f.field]}))"
        else:  # pragma: no cover - spec.Agg and this list are kept in step
            raise FeatureError(f"aggregate {f.agg!r} has no Lua implementation; see docs/features.md")
        lines.append(f"{slot} = {call}  -- {f.name}")
    member = "".join(f" .. '|' .. own[{own[name]}]" for name in stored)
    lines.append(
        _EPILOGUE.replace("STORED", member)
        .replace("TRIM", _trim(spec))
        .replace("ENTITY_TTL", str(entity_ttl(spec)))
        .replace("APPLIED_TTL", str(APPLIED_TTL))
        .replace("RECENT_VALUE", "pack_fv(out)" if packs_recent(spec) else "fv")
        .replace("DEDUPE", str(dedupe_seconds(spec)))
    )
    return "\n".join(lines)
