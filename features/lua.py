"""The Lua script the online engine runs once per event, generated from the spec.

The windows, aggregates, lateness and TTLs are baked into the script text, so Redis does
no spec interpretation per event. One call runs a whole batch, in order
(``EVALSHA sha 1 P:applied prefix batch``): per event a Python pipeline of ``EVALSHA`` commands
cost about 30 µs of client CPU (packing, parsing) plus Redis's per-command and per-script
overhead; one call per batch costs well under 1 µs per event on the client.

* ``KEYS[1]`` the pipeline's ``applied`` hash, declared so that a Redis Cluster client
  sends the call to the node of the pipeline's slot (docs/scaling.md).
* ``ARGV[1]`` the pipeline's key prefix (``spec.redis_prefix``, ``weir:{<name>}``); the
  script derives the keys from it: all in the prefix's hash slot, so on one node.
* ``ARGV[2]`` the batch: per event, four length-prefixed strings ``<bytes>:<string>``:
  the entity id, the event id, ``<ts>|<tokens>`` (ts as ``repr(float)``, then the
  event's tokens, every used field, joined by ``|``), and ``<topic>:<partition>|<offset>``
  of its Kafka message, or empty. Length prefixes let ids hold any character.

Per event, with ``<p>`` the prefix:

* ``<p>:win:<entity>`` ZSET of the entity's accepted events: score = ts, member =
  ``<12-digit arrival seq>|<token>|<token>...`` (one token per field a windowed aggregate
  reads; raw-only fields are not stored); the zero-padded seq makes members unique and
  orders equal timestamps by arrival.
* ``<p>:meta:<entity>`` hash of the entity: ``wm`` (watermark: max ts accepted), ``seq``,
  and per stored field ``k`` ``p<k>``: the newest ts of a present value ('' none yet, ``u``
  unknown: state from before freshness), the numbers-only tiles ``t<n>`` and ``x`` (Redis
  ``TIME`` of the last TTL renewal, :func:`ttl_renew`): all read by one ``HMGET`` and
  written by one ``HSET``.
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
followed by one token per feature, then one age per windowed feature
(:mod:`features.freshness`; none when built with ``freshness=False``), joined by ``|``.
Numbers are formatted ``%.17g`` (exact round trip), because numbers returned to Redis would
be truncated to integers; '' stands for None.
"""

from __future__ import annotations

import math

from features.base import dedupe_seconds, entity_ttl, max_window, output_type, used_fields
from features.freshness import freshness_names
from weir.errors import FeatureError
from weir.spec import FeatureSpec, PipelineSpec

_TILES_LIB = r"""
-- Tiles (docs/features.md#tiles): per value window, fixed-width tiles of event time in the
-- entity's meta hash. A tile record is packed doubles (tile index, then per field n
-- [sum m2 min max] [last ts, last seq]) and, when the window has last/distinct aggregates,
-- '|'-joined tokens (field 't<window>.<i mod slots>'); without those, the live tiles'
-- records are concatenated in tile order in one field 't<window>'. A window = whole tiles + the events
-- of its partial edge tiles, read from the ZSET.
local function tile_of(t, T)
  local i = math.floor(t / T)
  if i * T > t then i = i - 1 elseif (i + 1) * T <= t then i = i + 1 end
  return i
end
local function new_stats(L)
  local st = {}
  for f = 1, #L.f do
    st[f] = {n = 0, sum = 0, m2 = 0, mn = math.huge, mx = -math.huge,
             lts = -math.huge, lseq = -1, ltok = '', d = {}, dn = 0}
  end
  return st
end
local function decode(L, rec)
  local v = {struct.unpack(L.fmt, rec)}
  local strs, p, q = nil, 2, 1
  if L.strs then strs = split(string.sub(rec, 8 * L.nnum + 1)) end
  local st = {}
  for f, F in ipairs(L.f) do
    local s = {n = v[p], d = {}, dn = 0}
    p = p + 1
    if F.num then s.sum, s.m2, s.mn, s.mx = v[p], v[p + 1], v[p + 2], v[p + 3]; p = p + 4 end
    if F.last then s.lts, s.lseq, s.ltok = v[p], v[p + 1], strs[q]; p = p + 2; q = q + 1 end
    if F.dist then
      local k = tonumber(strs[q])
      for j = q + 1, q + k do s.d[strs[j]] = true end
      s.dn, q = k, q + k + 1
    end
    st[f] = s
  end
  return v[1], st
end
local function encode(L, i, st)
  local v, s = {i}, {}
  for f, F in ipairs(L.f) do
    local a = st[f]
    v[#v + 1] = a.n
    if F.num then
      v[#v + 1] = a.sum; v[#v + 1] = a.m2; v[#v + 1] = a.mn; v[#v + 1] = a.mx
    end
    if F.last then v[#v + 1] = a.lts; v[#v + 1] = a.lseq; s[#s + 1] = a.ltok end
    if F.dist then
      s[#s + 1] = string.format('%d', a.dn)
      for k, _ in pairs(a.d) do s[#s + 1] = k end
    end
  end
  local rec = struct.pack(L.fmt, unpack(v))
  if L.strs then rec = rec .. table.concat(s, '|') end
  return rec
end
-- Welford for one value, Chan et al. for a tile: exact count/min/max/last/distinct, sums
-- and M2 (std) to a few ulps of the two-pass definition.
local function add(A, F, tok, t, sq)
  if tok == '' then return end
  if F.num then
    local x = tonumber(tok)
    if A.n == 0 then A.sum, A.m2 = x, 0
    else
      local mo = A.sum / A.n
      A.sum = A.sum + x
      A.m2 = A.m2 + (x - mo) * (x - A.sum / (A.n + 1))
    end
    if x < A.mn then A.mn = x end
    if x > A.mx then A.mx = x end
  end
  A.n = A.n + 1
  if F.last and (t > A.lts or (t == A.lts and sq > A.lseq)) then A.lts, A.lseq, A.ltok = t, sq, tok end
  if F.dist and not A.d[tok] then A.d[tok] = true; A.dn = A.dn + 1 end
end
local function merge(A, F, B)
  if B.n == 0 then return end
  if F.num then
    if A.n == 0 then A.sum, A.m2 = B.sum, B.m2
    else
      local d = B.sum / B.n - A.sum / A.n
      A.m2 = A.m2 + B.m2 + d * d * A.n * B.n / (A.n + B.n)
      A.sum = A.sum + B.sum
    end
    if B.mn < A.mn then A.mn = B.mn end
    if B.mx > A.mx then A.mx = B.mx end
  end
  A.n = A.n + B.n
  if F.last and (B.lts > A.lts or (B.lts == A.lts and B.lseq > A.lseq)) then
    A.lts, A.lseq, A.ltok = B.lts, B.lseq, B.ltok
  end
  if F.dist then
    for k, _ in pairs(B.d) do if not A.d[k] then A.d[k] = true; A.dn = A.dn + 1 end end
  end
end
local function add_events(L, A, r)
  local fs = L.f
  if L.one then  -- one stored field: no table per member
    local F, a = fs[1], A[1]
    for k = 1, #r, 2 do
      local m = r[k]
      add(a, F, string.sub(m, 14), tonumber(r[k + 1]), tonumber(string.sub(m, 1, 12)))
    end
    return
  end
  for k = 1, #r, 2 do
    local m = split(r[k])
    local t, sq = tonumber(r[k + 1]), tonumber(m[1])
    for f, F in ipairs(fs) do add(A[f], F, m[F.si + 1], t, sq) end
  end
end
-- Merges tile i's record into A (a record of another tile, an older one in its slot, is
-- skipped); numbers-only records without a table per field.
local function merge_rec(L, A, rec, i, off)
  if L.strs then
    local j, st = decode(L, rec)
    if j == i then for f, F in ipairs(L.f) do merge(A[f], F, st[f]) end end
    return
  end
  local v = {struct.unpack(L.fmt, rec, off)}
  if v[1] ~= i then return end
  local p = 2
  for f, F in ipairs(L.f) do
    local a, n = A[f], v[p]
    if F.num then
      if n > 0 then
        local s, m2 = v[p + 1], v[p + 2]
        if a.n == 0 then a.sum, a.m2 = s, m2
        else
          local d = s / n - a.sum / a.n
          a.m2 = a.m2 + m2 + d * d * a.n * n / (a.n + n)
          a.sum = a.sum + s
        end
        if v[p + 3] < a.mn then a.mn = v[p + 3] end
        if v[p + 4] > a.mx then a.mx = v[p + 4] end
        a.n = a.n + n
      end
      p = p + 5
    else
      a.n = a.n + n
      p = p + 1
    end
  end
end
local function tile_field(L, i) return L.key .. '.' .. (i % L.slots) end
local function V(A, agg)
  if agg == 'count' then return fmt(A.n) end
  if agg == 'sum' then return fmt(A.sum) end
  if agg == 'distinct' then return fmt(A.dn) end
  if A.n == 0 then return '' end
  if agg == 'mean' then return fmt(A.sum / A.n) end
  if agg == 'min' then return fmt(A.mn) end
  if agg == 'max' then return fmt(A.mx) end
  if agg == 'std' then return fmt(math.sqrt(math.max(A.m2, 0) / A.n)) end
  return A.ltok  -- last
end
"""

_TILES_LUA = r"""-- The window (ts - w, ts] of this event: stats per field, the event itself last.
-- An event in order whose entity has nothing stored after ts - w (every stored event is at
-- or before wm) has an empty window: nothing to read.
local function window(L)
  local T, lo = L.T, ts - L.w
  local A = new_stats(L)
  local a, b = tile_of(lo, T) + 1, tile_of(ts, T) - 1  -- whole tiles: i * T > lo, (i + 1) * T <= ts
  local inorder = (not wm) or ts >= wm
  if inorder then b = b + 1 end  -- nothing stored is later than ts: its own tile is whole too
  if inorder and not (wm and wm > lo) then
    -- empty window
  elseif a > b then
    add_events(L, A, redis.call('ZRANGEBYSCORE', kwin, '(' .. fmt(lo), ts_s, 'WITHSCORES'))
  else
    add_events(L, A, redis.call('ZRANGEBYSCORE', kwin, '(' .. fmt(lo), '(' .. fmt(a * T), 'WITHSCORES'))
    if L.strs then
      local names = {}
      for i = a, b do names[#names + 1] = tile_field(L, i) end
      local recs = redis.call('HMGET', kmeta, unpack(names))
      for k = 1, #names do
        if recs[k] then merge_rec(L, A, recs[k], a + k - 1) end
      end
    else
      -- numbers only: the live tiles' records in one string, fixed size, in any order
      -- (read with the meta fields)
      local rec, size = meta[L.mi], 8 * L.nnum
      if rec then
        for off = 1, #rec, size do
          local i = struct.unpack('<d', rec, off)
          if i > b then break end
          if i >= a then merge_rec(L, A, rec, i, off) end
        end
      end
    end
    if not inorder then
      add_events(L, A, redis.call('ZRANGEBYSCORE', kwin, fmt((b + 1) * T), ts_s, 'WITHSCORES'))
    end
  end
  for f, F in ipairs(L.f) do add(A[f], F, own[F.oi], ts, seq) end
  return A
end
-- The same for the common layout (one stored field, numeric aggregates only, no last /
-- distinct): no table per member or tile, no scores read.
local function window_fast(L)
  local T, lo = L.T, ts - L.w
  local n, sum, m2, mn, mx = 0, 0, 0, math.huge, -math.huge
  local function events(r)
    for k = 1, #r do
      local tok = string.sub(r[k], 14)
      if tok ~= '' then
        local x = tonumber(tok)
        if n == 0 then sum, m2 = x, 0
        else
          local mo = sum / n
          sum = sum + x
          m2 = m2 + (x - mo) * (x - sum / (n + 1))
        end
        if x < mn then mn = x end
        if x > mx then mx = x end
        n = n + 1
      end
    end
  end
  local a, b = tile_of(lo, T) + 1, tile_of(ts, T) - 1
  local inorder = (not wm) or ts >= wm
  if inorder then b = b + 1 end
  if inorder and not (wm and wm > lo) then
    -- empty window (see window)
  elseif a > b then
    events(redis.call('ZRANGEBYSCORE', kwin, '(' .. fmt(lo), ts_s))
  else
    events(redis.call('ZRANGEBYSCORE', kwin, '(' .. fmt(lo), '(' .. fmt(a * T)))
    local rec = meta[L.mi]
    if rec then
      for off = 1, #rec, 48 do
        local i, tn, ts_, tm2, tmn, tmx = struct.unpack('<dddddd', rec, off)
        if i > b then break end
        if i >= a and tn > 0 then
          if n == 0 then sum, m2 = ts_, tm2
          else
            local d = ts_ / tn - sum / n
            m2 = m2 + tm2 + d * d * n * tn / (n + tn)
            sum = sum + ts_
          end
          if tmn < mn then mn = tmn end
          if tmx > mx then mx = tmx end
          n = n + tn
        end
      end
    end
    if not inorder then events(redis.call('ZRANGEBYSCORE', kwin, fmt((b + 1) * T), ts_s)) end
  end
  local A = new_stats(L)
  A[1].n, A[1].sum, A[1].m2, A[1].mn, A[1].mx = n, sum, m2, mn, mx
  add(A[1], L.f[1], own[L.f[1].oi], ts, seq)
  return A
end
-- Adds the event to its tile of every value window (only when it is stored): appends the
-- fields and records to kv, the meta fields the epilogue writes in one HSET.
local function store_tiles(kv)
  for _, L in ipairs(LAYOUT) do
    local i = tile_of(ts, L.T)
    if not L.strs then
      -- Records in ascending tile order: its tile's replaced or inserted (searched from
      -- the newest), the dead ones (tile i - slots and older: no acceptable event reads
      -- them) dropped from the front.
      local size = 8 * L.nnum
      local rec = meta[L.mi] or ''
      local at, st, tail = #rec + 1, nil, nil
      while at > 1 do
        local j = struct.unpack('<d', rec, at - size)
        if j == i then
          if not L.fast then
            local _
            _, st = decode(L, string.sub(rec, at - size, at - 1))
          end
          tail, at = at, at - size
          break
        elseif j < i then
          break
        end
        at = at - size
      end
      local head = 1
      while head < at and struct.unpack('<d', rec, head) <= i - L.slots do head = head + size end
      local new
      if L.fast then
        -- one field, numbers only (window_fast): add's arithmetic on the record's doubles
        local _, n, sum, m2, mn, mx = 0, 0, 0, 0, math.huge, -math.huge
        if tail then _, n, sum, m2, mn, mx = struct.unpack('<dddddd', rec, at) end
        local tok = own[L.f[1].oi]
        if tok ~= '' then
          local x = tonumber(tok)
          if n == 0 then sum, m2 = x, 0
          else
            local mo = sum / n
            sum = sum + x
            m2 = m2 + (x - mo) * (x - sum / (n + 1))
          end
          if x < mn then mn = x end
          if x > mx then mx = x end
          n = n + 1
        end
        new = struct.pack('<dddddd', i, n, sum, m2, mn, mx)
      else
        st = st or new_stats(L)
        for f, F in ipairs(L.f) do add(st[f], F, own[F.oi], ts, seq) end
        new = encode(L, i, st)
      end
      tail = tail or at
      kv[#kv + 1] = L.key
      kv[#kv + 1] = string.sub(rec, head, at - 1) .. new .. string.sub(rec, tail)
    else
    local name = tile_field(L, i)
    local rec = redis.call('HGET', kmeta, name)
    local st
    if rec then
      local j
      j, st = decode(L, rec)
      if j ~= i then st = new_stats(L) end
    else
      st = new_stats(L)
    end
    for f, F in ipairs(L.f) do add(st[f], F, own[F.oi], ts, seq) end
    kv[#kv + 1] = name
    kv[#kv + 1] = encode(L, i, st)
    end
  end
end
"""

_PRELUDE = r"""
PREFIX_DEF
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
local now_s = string.format('%d', now)
local bucket = math.floor(now / DEDUPE)
RECENT_DEF
local function recent(eid)
  return redis.call('HGET', rnow, eid) or redis.call('HGET', rprev, eid)
end
-- When every feature is a number, the recent features are packed doubles (NaN for None):
-- 8 bytes a feature instead of up to 24 as text.
-- The features, then the freshness ages (features.freshness): NALL values. An entry
-- written before freshness holds the features only: so does its reply (ages unknown).
local function pack_fv(out)
  local t = {}
  for i = 1, NALL do t[i] = tonumber(out[i]) or 0 / 0 end
  return struct.pack(PACKFMT, unpack(t))
end
local function unpack_fv(s)
  local out, m = {}, NALL
  if #s < 8 * NALL then m = NFEAT end
  for i = 1, m do
    local v = struct.unpack('<d', s, 8 * i - 7)
    if v ~= v then out[i] = '' else out[i] = fmt(v) end
  end
  return table.concat(out, '|')
end

-- The highest offset applied per (events topic, partition), read once per call.
APPLIED_DEF
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
  return table.concat(out, '|')  -- the record has no ages: the reply has none (unknown)
end

LAYOUT_DEF
-- One event: its keys, its ts (as sent), its tokens, and its position (or nil).
local function one(kwin, kmeta, eid, ts_s, args, tp, off)
local ts = tonumber(ts_s)
local again = tp ~= nil and seen_offset(tp, off)
local known = recent(eid)
if known then return 'd|' .. RECENT_TOKENS end
SERVED_FALLBACK
local meta = redis.call('HMGET', kmeta, 'wm', 'seq'META_READ)
local wm = tonumber(meta[1])
if wm and ts < wm - LATENESS then LATE_RETURN end
local seq = (tonumber(meta[2]) or 0) + 1
local own = OWN_SPLIT

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
-- An event in order (ts >= wm) needs no read: its entity's newest stored event is at wm
-- (every stored event is at or before wm, the one at wm is never trimmed), none if no wm.
local function since_prev_zset(w)
  if not wm then return '' end
  if ts >= wm then
    if wm > ts - w then return fmt(ts - wm) end
    return ''
  end
  local r = redis.call('ZREVRANGEBYSCORE', kwin, ts_s, '(' .. fmt(ts - w),
                       'WITHSCORES', 'LIMIT', 0, 1)
  if r[2] then return fmt(ts - tonumber(r[2])) end
  return ''
end
local function count_zset(w)
  if not wm or (ts >= wm and wm <= ts - w) then return '1' end  -- none stored in (ts - w, ts]
  return fmt(redis.call('ZCOUNT', kwin, '(' .. fmt(ts - w), ts_s) + 1)
end

TILES_LUA
local out = {}
"""

_EPILOGUE = r"""
local fv = table.concat(out, '|')
-- Redelivered (its offset was applied) yet unknown here: computed from the window as it is
-- now, read-only (the event is not stored again).
if again then return 'REDELIVERED|' .. fv end
redis.call('ZADD', kwin, ts_s, string.format('%012d', seq)STORED)
local wm0 = wm  -- before this event (nil: a new entity, nothing else stored)
if not wm or ts > wm then wm = ts end
local kv = {'wm', (wm == ts and ts_s) or fmt(wm), 'seq', string.format('%d', seq)META_SET}
STORE_TILES
RENEW
TRIM
redis.call('HSET', rnow, eid, RECENT_VALUE)
recent_written = true
return 'o|' .. fv
end

BATCH_LOOP
"""

#: The parts of the script that differ with the buckets (:mod:`weir.slots`): with one
#: bucket (``ONE``) the keys derive from ``ARGV[1]``, the pipeline's prefix; with several
#: (``MANY``, ``EVALSHA sha 1 K1 batch K1 K2 ... Kn``) ``ARGV[1 + k]`` is the k-th touched
#: bucket's ``<bucket prefix>:applied``, each event names its ``k``, and the batch loop
#: points the shared locals (``rnow``, ``applied``...) at that bucket's before running it.
#: Only ``K1`` is declared: Redis refuses declared keys of several slots (``CROSSSLOT``,
#: with the flag too); it routes the call, and answers ``MOVED`` when its slot moved. The
#: one-bucket text is the stage-1 script's, unchanged (same sha).
_ONE = {
    "PREFIX_DEF": "local prefix = ARGV[1]",
    "RECENT_DEF": """local recent_p = prefix .. ':recent:'
local rnow, rprev = recent_p .. bucket, recent_p .. (bucket - 1)
redis.call('UNLINK', recent_p .. (bucket - 2))
local recent_written = false""",
    "APPLIED_DEF": """local applied_key = prefix .. ':applied'
local applied, applied_moved = {}, {}""",
    "SERVED_FALLBACK": """if again then
  local rec = redis.call('GET', prefix .. ':served:' .. eid)
  if rec then
    local toks = served_tokens(rec)
    if toks then return 'd|' .. toks end
  end
end""",
    "LATE_RETURN": "return 'l'",
    "REDELIVERED": "d",
    "BATCH_LOOP": r"""-- The batch: per event four length-prefixed strings (entity, event id, ts|tokens, and
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
return res""",
}

_MANY = {
    "PREFIX_DEF": "-- The keys of each event are its bucket's (ARGV, the batch loop).",
    "RECENT_DEF": """local rnow, rprev  -- the event's bucket's (set by the batch loop)
local recent_written = false""",
    "APPLIED_DEF": "local applied_key, applied, applied_moved  -- the event's bucket's",
    # The served record (P:served:<event>) is in the event's join bucket, maybe on another
    # node: a redelivery not in recent is answered 'r' ('r|<features computed read-only>',
    # or 'r' alone when late now) and the client looks the record up.
    "SERVED_FALLBACK": "",
    "LATE_RETURN": "if again then return 'r' end return 'l'",
    "REDELIVERED": "r",
    "BATCH_LOOP": r"""-- The batch: per event five length-prefixed strings (its bucket's k: ARGV[1 + k] is
-- '<bucket prefix>:applied'; then the entity, event id, ts|tokens, and
-- '<topic>:<partition>|<offset>' or '' when the position is unknown). Events of different
-- buckets share no key, so only the order within a bucket matters.
local batch, pos, res = ARGV[1], 1, {}
local function field()
  local c = string.find(batch, ':', pos, true)
  local e = c + tonumber(string.sub(batch, pos, c - 1))
  pos = e + 1
  return string.sub(batch, c + 1, e)
end
-- Every bucket first, before any event is run: a bucket whose slot is not on this node
-- (it moved after the client grouped the batch) fails here ("non local key"), before any
-- of the batch's writes (the UNLINK only drops a stale recent hash).
local state, cur = {}, nil
for k = 1, #ARGV - 1 do
  local p = string.sub(ARGV[k + 1], 1, -9)  -- without ':applied'
  local rp = p .. ':recent:'
  redis.call('UNLINK', rp .. (bucket - 2))
  state[k] = {win = p .. ':win:', meta = p .. ':meta:', rnow = rp .. bucket, rprev = rp .. (bucket - 1),
              applied = {}, moved = {}, written = false}
end
while pos <= #batch do
  local k = tonumber(field())
  local st = state[k]
  if st ~= cur then
    cur = st
    rnow, rprev, applied_key, applied, applied_moved = st.rnow, st.rprev, ARGV[k + 1], st.applied, st.moved
  end
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
  res[#res + 1] = one(st.win .. ent, st.meta .. ent, eid, string.sub(rest, 1, bar - 1),
                      string.sub(rest, bar + 1), tp, off)
  if recent_written then st.written = true; recent_written = false end
end
for k, st in ipairs(state) do
  if st.written then redis.call('EXPIRE', st.rnow, 2 * DEDUPE + 60) end
  local moved = {}
  for tp, _ in pairs(st.moved) do
    moved[#moved + 1] = tp
    moved[#moved + 1] = string.format('%d', st.applied[tp])
  end
  if #moved > 0 then
    redis.call('HSET', ARGV[k + 1], unpack(moved))
    redis.call('EXPIRE', ARGV[k + 1], APPLIED_TTL)
  end
end
return res""",
}

#: First line of the script with several buckets: it touches keys of several slots (all on
#: the node it runs on) that it does not declare, which a script with flags allows with
#: this one (Redis >= 7.0; without it: "Script attempted to access keys that do not hash to
#: the same slot"; a script without flags is allowed it for compatibility, deprecated).
CROSS_SLOT = "#!lua flags=allow-cross-slot-keys"

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
    # The newest stored event at or below the horizon, p: none for a new entity (only this
    # event is stored, above the horizon or, with lateness 0, the only one at it: nothing
    # to drop); for an event in order above the horizon whose previous watermark wm0 is at
    # or below it, the event at wm0 (the others stored are at or before it): no read.
    return f"""{horizon}
local cut = {cut}
local p
if not wm0 then
  p = nil
elseif ts >= wm0 and wm0 <= horizon and ts > horizon then
  p = wm0
else
  local r = redis.call('ZREVRANGEBYSCORE', kwin, fmt(horizon), '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
  p = tonumber(r[2])
end
if p then
  if cut < p then
    redis.call('ZREMRANGEBYSCORE', kwin, '-inf', fmt(cut))
  else
    redis.call('ZREMRANGEBYSCORE', kwin, '-inf', '(' .. fmt(p))
  end
end"""


#: Seconds between renewals of an entity's TTLs (see :func:`ttl_renew`).
TTL_RENEW = 60


def ttl_renew(spec: PipelineSpec) -> int:
    """Seconds between renewals of an entity's key TTLs (0: at every accepted event).

    Renewed at every event, ``EXPIRE`` of the window and the meta cost two commands per
    event. Instead the keys are given ``entity_ttl + TTL_RENEW`` seconds and renewed by the
    first accepted event at least ``TTL_RENEW`` seconds (Redis ``TIME``) after the last
    renewal, kept in meta (``x``): every key still outlives its entity's last accepted
    event by more than ``entity_ttl``. 0 when a trim can empty the window ZSET (no window
    and no lateness), so a ZSET recreated later would need its TTL at once.
    """
    return TTL_RENEW if max_window(spec) + spec.lateness > 0 else 0


def _renew_lua(spec: PipelineSpec, x_index: int | None) -> str:
    """Lua that writes the meta fields in ``kv`` and renews the entity's TTLs when due."""
    ttl = entity_ttl(spec)
    renew = ttl_renew(spec)
    if not renew or x_index is None:
        return f"""redis.call('HSET', kmeta, unpack(kv))
redis.call('EXPIRE', kwin, {ttl})
redis.call('EXPIRE', kmeta, {ttl})"""
    return f"""local x = tonumber(meta[{x_index}])  -- the last renewal
if x and now - x < {renew} then
  redis.call('HSET', kmeta, unpack(kv))
else
  kv[#kv + 1] = 'x'
  kv[#kv + 1] = now_s
  redis.call('HSET', kmeta, unpack(kv))
  redis.call('EXPIRE', kwin, {ttl + renew})
  redis.call('EXPIRE', kmeta, {ttl + renew})
end"""


def packs_recent(spec: PipelineSpec) -> bool:
    """Whether the recent first features are packed doubles (every feature a number)."""
    return all(output_type(spec, i) == "number" for i in range(len(spec.features)))


#: Tiles per value window: a window of ``W`` is cut into tiles of ``W / TILES`` seconds of
#: event time. A window then costs at most ``TILES + 1`` tile records plus the events of its
#: partial trailing tile (and of its leading one for an out-of-order event).
TILES = 60


def _tile_layout(spec: PipelineSpec) -> list[tuple[float, list[tuple[str, set[str]]]]]:
    """Per value window (ascending): its fields and, per field, the aggregates it serves."""
    by_w: dict[float, dict[str, set[str]]] = {}
    for f in spec.features:
        if _needs_list(f):
            assert f.window is not None and f.field is not None
            by_w.setdefault(f.window, {}).setdefault(f.field, set()).add(f.agg)
    fields = used_fields(spec)
    return [(w, sorted(by_w[w].items(), key=lambda kv: fields.index(kv[0]))) for w in sorted(by_w)]


def tile_slots(spec: PipelineSpec, window: float) -> int:
    """Tile records kept per entity for ``window``: a ring over (window + lateness) + 2 tiles."""
    width = window / TILES
    return math.ceil((window + spec.lateness) / width) + 2


def _is_fast(spec: PipelineSpec, window: float) -> bool:
    """Whether ``window`` takes the script's fast path: one stored field, one field in the
    window, its aggregates all numeric or counts (records of 6 doubles, no tokens)."""
    fields = dict(_tile_layout(spec))[window]
    if len(stored_fields(spec)) != 1 or len(fields) != 1:
        return False
    aggs = fields[0][1]
    return bool(aggs & _NUMERIC) and aggs <= _NUMERIC | {"count"}


def numeric_tile_keys(spec: PipelineSpec) -> list[str]:
    """The meta fields of the value windows whose tiles are numbers only (``t<n>``: every
    live tile's record in one string), read with ``wm`` and ``seq`` by one ``HMGET``."""
    return [
        f"t{wi}"
        for wi, (_, fields) in enumerate(_tile_layout(spec), start=1)
        if not any(aggs & {"last", "distinct"} for _, aggs in fields)
    ]


def _layout_lua(spec: PipelineSpec, meta_index: dict[str, int]) -> str:
    """The LAYOUT table; ``meta_index``: where the meta read holds each ``t<n>`` field."""
    own = {name: i + 1 for i, name in enumerate(used_fields(spec))}
    stored = {name: i + 1 for i, name in enumerate(stored_fields(spec))}
    rows = []
    for wi, (w, fields) in enumerate(_tile_layout(spec), start=1):
        nnum, strs, fs = 1, False, []
        for name, aggs in fields:
            num = bool(aggs & _NUMERIC)
            last, dist = "last" in aggs, "distinct" in aggs
            nnum += 1 + 4 * num + 2 * last
            strs = strs or last or dist
            fs.append(
                f"{{si = {stored[name]}, oi = {own[name]}, num = {str(num).lower()}, "
                f"last = {str(last).lower()}, dist = {str(dist).lower()}}}"
            )
        fast = _is_fast(spec, w)
        rows.append(
            f"  {{w = {w!r}, T = {w / TILES!r}, slots = {tile_slots(spec, w)}, key = 't{wi}', "
            f"nnum = {nnum}, fmt = {'<' + 'd' * nnum!r}, strs = {str(strs).lower()}, "
            f"one = {str(len(stored) == 1).lower()}, fast = {str(fast).lower()}, "
            f"mi = {meta_index.get(f't{wi}', 'nil')},\n"
            f"   f = {{{', '.join(fs)}}}}},"
        )
    return "local LAYOUT = {\n" + "\n".join(rows) + "\n}"


def _freshness_lua(spec: PipelineSpec, own: dict[str, int], stored: dict[str, int]) -> str:
    """Lua that appends the ages (:mod:`features.freshness`) to ``out``, after the features.

    Per stored field ``k`` (every field a windowed aggregate reads), ``fx[k]`` is the newest
    time at or before ``ts`` of a present value among the earlier events and this one.
    The entity's meta hash keeps ``p<k>``, the newest time of a present value of all its
    accepted events ('' if none yet): the event's own value gives ``ts``; else ``p<k>``
    when it is at or before ``ts`` (always for an event in order). Only an out-of-order
    event without the value, whose entity has a newer one, reads back through the window
    ZSET (from ``ts`` down, until a present value). ``pv[k]`` is what the epilogue stores;
    false (stored ``u``): unknown, for an entity whose state predates freshness, until an
    event in order finds its newest value.
    """
    nfeat = len(spec.features)
    field_windows = [
        f.window
        for f in spec.features
        if f.window is not None and f.field is not None and f.agg != "since_prev"
    ]
    lines = ["-- Freshness (features/freshness.py).", "local fx, pv, need, nneed = {}, {}, {}, 0"]
    for name, k in stored.items():
        lines.append(
            f"""do
  local s = meta[{2 + k}]
  if s == 'u' then s = false end
  local p = tonumber(s)
  if own[{own[name]}] ~= '' then
    fx[{k}] = ts
    if p and p >= ts then pv[{k}] = s else pv[{k}] = ts_s end
  else
    if s then pv[{k}] = s elseif not wm then pv[{k}] = '' else pv[{k}] = false end
    if p and p <= ts then fx[{k}] = p
    elseif p or (not s and wm) then need[{k}] = {k}; nneed = nneed + 1 end
  end
end"""
        )
    if stored:
        split_member = "split(r[j])" if len(stored) > 1 else "{'', string.sub(r[j], 14)}"
        lines.append(
            f"""if nneed > 0 then
  local lo, off, lim, inorder = ts - {max(field_windows)!r}, 0, 8, (not wm) or ts >= wm
  while nneed > 0 do
    -- 8 members first (the newest present value is usually among them), then 4x more
    local r = redis.call('ZREVRANGEBYSCORE', kwin, ts_s, '(' .. fmt(lo), 'WITHSCORES', 'LIMIT', off, lim)
    for j = 1, #r, 2 do
      local m = {split_member}
      for k, si in pairs(need) do
        if m[si + 1] ~= '' then fx[k] = tonumber(r[j + 1]); need[k] = nil; nneed = nneed - 1 end
      end
      if nneed == 0 then break end
    end
    if #r < 2 * lim then break end
    off, lim = off + lim, 4 * lim
  end
  for k = 1, {len(stored)} do
    if pv[k] == false and inorder and fx[k] then pv[k] = fmt(fx[k]) end
  end
end"""
        )
    done: dict[tuple[str, float], int] = {}
    slot = nfeat
    for i, f in enumerate(spec.features):
        if f.window is None:
            continue
        slot += 1
        if f.agg == "since_prev":
            lines.append(f"out[{slot}] = out[{i + 1}]  -- {f.name}: its value")
        elif f.field is None:
            lines.append(f"out[{slot}] = '0'  -- {f.name}: the event itself counts")
        elif (f.field, f.window) in done:
            lines.append(f"out[{slot}] = out[{done[(f.field, f.window)]}]  -- {f.name}")
        else:
            done[(f.field, f.window)] = slot
            x = f"fx[{stored[f.field]}]"
            lines.append(
                f"out[{slot}] = ({x} == ts and '0') or ({x} and {x} > ts - {f.window!r} "
                f"and fmt(ts - {x})) or ''  -- {f.name}"
            )
    return "\n".join(lines)


def _meta_set(n: int) -> str:
    """The ``p<k>`` fields the epilogue writes beside ``wm`` and ``seq`` (see _freshness_lua)."""
    return "".join(f", 'p{k}', pv[{k}] or 'u'" for k in range(1, n + 1))


def _own_split(n: int) -> str:
    """Lua splitting the event's ``n`` tokens: one ``string.match`` with a capture per token
    (Lua allows 32), a third of ``split``'s time for 7 tokens."""
    if not 0 < n < 32:
        return "split(args)"
    return "{string.match(args, '^" + "|".join(["([^|]*)"] * n) + "$')}"


def build_script(
    spec: PipelineSpec, *, tiles: bool = True, freshness: bool = True, buckets: int | None = None
) -> str:
    """The Lua source for ``spec`` (deterministic: its sha1 names it in Redis).

    ``buckets`` (default ``spec.redis.buckets``): 1 builds the stage-1 script (keys under
    ``spec.redis_prefix``, ``EVALSHA sha 1 P:applied P batch``); more builds the script of
    :data:`_MANY` (``EVALSHA sha 1 K1 batch K1 ... Kn``, ``Kk`` the k-th bucket's
    ``<bucket prefix>:applied``, each event naming its k), which starts with
    :data:`CROSS_SLOT` and needs Redis >= 7.0.

    ``freshness=False`` leaves out the ages of :mod:`features.freshness` (each reply then
    holds the features only); ``bench/features.py`` runs it beside the default to measure
    what the ages cost.

    ``tiles=False`` builds the previous engine, which walks every event of the window
    (O(events of the entity in the window) per event); ``bench/hot_entities.py`` runs it as
    the baseline. Both compute the same features; their stored state differs, so never
    mix them on one key prefix.
    """
    own = {name: i + 1 for i, name in enumerate(used_fields(spec))}  # own[i]
    stored = {name: i + 1 for i, name in enumerate(stored_fields(spec))}  # tok[k][i + 1]
    listw = 0.0 if tiles else list_window(spec)
    layout = _tile_layout(spec) if tiles else []
    fresh = freshness_names(spec) if freshness else []
    pfields = list(stored) if freshness else []  # fields with a p<k> in meta
    # The meta fields read per event: wm, seq, the p<k>, the numbers-only tiles, x.
    extra = [f"p{k}" for k in range(1, len(pfields) + 1)]
    extra += numeric_tile_keys(spec) if layout else []
    renew = ttl_renew(spec)
    if renew:
        extra.append("x")
    meta_index = {name: 3 + i for i, name in enumerate(extra)}
    many = (spec.redis.buckets if buckets is None else buckets) > 1
    parts = _MANY if many else _ONE
    prelude, epilogue = _PRELUDE, _EPILOGUE
    for name, text in parts.items():
        prelude, epilogue = prelude.replace(name, text), epilogue.replace(name, text)
    lines = [CROSS_SLOT] if many else []
    lines.append(f"-- weir feature script for pipeline {spec.name!r}: generated, do not edit")
    if len(stored) == 1:
        # One stored field (the common case): no table per member, ~40% less Lua time
        # for entities with many events in their window.
        parse, field = "string.sub(r[k], string.find(r[k], '|', 1, true) + 1)", "tok[k]"
    else:
        parse, field = "split(r[k])", "tok[k][si + 1]"
    lines.append(
        prelude.replace("LATENESS", repr(float(spec.lateness)))
        .replace("DEDUPE", str(dedupe_seconds(spec)))
        .replace("NFEAT", str(len(spec.features)))
        .replace("NALL", str(len(spec.features) + len(fresh)))
        .replace("PACKFMT", repr("<" + "d" * (len(spec.features) + len(fresh))))
        .replace("META_READ", "".join(f", '{name}'" for name in extra))
        .replace("RECENT_TOKENS", "unpack_fv(known)" if packs_recent(spec) else "known")
        .replace("LISTW", repr(listw))
        .replace("PARSE", parse)
        .replace("OWN_SPLIT", _own_split(len(own)))
        .replace("FIELD", field)
        .replace("LAYOUT_DEF", _TILES_LIB + _layout_lua(spec, meta_index) if layout else "")
        .replace("TILES_LUA", _TILES_LUA if layout else "")
    )
    if tiles:
        for wi, (lw, _) in enumerate(layout, start=1):
            lines.append(
                f"local A{wi} = window{'_fast' if _is_fast(spec, lw) else ''}(LAYOUT[{wi}])  -- {lw!r} s"
            )
        slot_of = {
            (lw, name): (wi, fi)
            for wi, (lw, fields) in enumerate(layout, start=1)
            for fi, (name, _) in enumerate(fields, start=1)
        }
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
        elif tiles and f.agg in _LIST_AGGS:
            assert f.field is not None
            wi, fi = slot_of[(w, f.field)]
            call = f"V(A{wi}[{fi}], {f.agg!r})"
        elif f.agg in _LIST_AGGS:
            assert f.field is not None and s is not None
            get = "nums" if f.agg in _NUMERIC else "toks"
            call = f"A.{f.agg}({get}({s}, {stored[f.field]}, {own[f.field]}))"
        else:  # pragma: no cover - spec.Agg and this list are kept in step
            raise FeatureError(f"aggregate {f.agg!r} has no Lua implementation; see docs/features.md")
        lines.append(f"{slot} = {call}  -- {f.name}")
    if fresh:
        lines.append(_freshness_lua(spec, own, stored))
    member = "".join(f" .. '|' .. own[{own[name]}]" for name in stored)
    lines.append(
        epilogue.replace("STORED", member)
        .replace("META_SET", _meta_set(len(pfields)))
        .replace("STORE_TILES", "store_tiles(kv)" if layout else "")
        .replace("RENEW", _renew_lua(spec, meta_index.get("x")))
        .replace("TRIM", _trim(spec))
        .replace("APPLIED_TTL", str(APPLIED_TTL))
        .replace("RECENT_VALUE", "pack_fv(out)" if packs_recent(spec) else "fv")
        .replace("DEDUPE", str(dedupe_seconds(spec)))
    )
    return "\n".join(lines)
