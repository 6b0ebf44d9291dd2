-- budgetary: the budget engine (src/budgetary/core/_engine.py) ported to Lua, so that
-- every operation on one budget family is one atomic script call, one round trip.
--
-- KEYS (all share the family's hash tag, so they live in one Redis Cluster slot):
--   1 levels  HASH  "x" -> the family's own counters (packed doubles: the last ledger entry id,
--                   and a lower bound of its holds' lease expiries); "c" .. level key -> the
--                   level's configuration and other rarely changing state (MessagePack);
--                   "h" .. level key -> its counters (packed doubles)
--   2 holds   HASH  hold id -> hold (packed doubles and two JSON strings, see `hold_pack`)
--   3 ledger  LIST  ledger records (JSON), oldest first, trimmed to ARGV[3]
--   4 once    ZSET  markers of steps applied once (`once_seen`), scored by when they were marked
-- ARGV: 1 operation, 2 now (seconds, Python repr), 3 ledger max length (0 = unbounded), then
--       the operation's arguments as plain strings (see `args` and each `ops.*`).
-- Names (budgets, agents, holds) only ever travel as data inside ARGV and documents.
--
-- Cost per call is what this layout is for. A level is split in two: its configuration
-- (limits, thresholds, window, fired thresholds, the agents' contracts) changes rarely and
-- is decoded once per distinct stored value (`cfg_of`: the decoded table is cached under the
-- stored string itself, so a hit is by construction identical to decoding again); its
-- counters (spent and held per dimension, and each agent's allocation, spent and held)
-- change on every call and are fixed-width doubles read and written with `struct`, an
-- agent's only when the call touches that agent. Lua numbers are doubles, exact up to 2^53,
-- and counters saturate at 2^63-1 like the Python engine's. What Python reads (replies,
-- ledger records, `figures`) is JSON with integers as decimal strings, in the documents of
-- stores/_codec.py, or for the two hot replies a short string (see `ops.reserve`/`ops.settle`).
--
-- Where a call's time went (perf on redis-server 7.0): the Lua VM, the garbage collector
-- (which Redis also steps every 50 calls), interning strings (Redis's Lua hashes every byte of
-- every string it makes), allocating tables, and each `redis.call`. So the hot operations
-- allocate little and call Redis few times: a chain's levels and the family record come in one
-- HMGET and every changed field goes back in one HSET; the ledger id is a field of the family
-- record, not an INCR; expired holds are looked for only once `now` reaches the family's
-- earliest lease expiry (like Engine.next_expiry), not with a ZRANGEBYSCORE per call; the
-- common reserve and settle build no level or agent tables (`fast_*`); counter vectors and
-- argument tables are reused (`v8`, `args`). reserve: HMGET, HSET (hold), HSET (counters);
-- settle: HMGET, HDEL (hold), HSET, RPUSH.

-- Per-call state: set by `dispatch` at the start of every call (a Redis Function's upvalues
-- outlive the call, so nothing may carry over from the previous one, except `CFG`, whose
-- entries are pure functions of their keys, and scratch tables that every call overwrites
-- before it reads them: `POOL`, `A`/`CHAIN`, `FC`/`FH`/`FS`/`FD`, `XF`, `pending`).
local LEVELS, HOLDS, LEDGER, ONCE
local now_s, now, maxlen
-- The family record ("x"): last ledger entry id, a lower bound of the holds' lease expiries
-- (+inf: no hold), and whether this call changed them. `fam_seq` is nil until loaded.
local fam_seq, fam_exp, fam_dirty

-- Library functions as locals (upvalues): a global lookup per use is a measurable share of a
-- call. A Function library may not read these globals while it loads, so `dispatch` fills the
-- locals on its first call, from `globals` (defined before them, so its names are the globals).
local function globals()
  return tonumber, tostring, type, pairs, ipairs, unpack, setmetatable, rawget, struct.pack, struct.unpack,
    cmsgpack.pack, cmsgpack.unpack, cjson.encode, cjson.decode, string.format, string.sub, string.find, string.rep
end
local tonumber, tostring, type, pairs, ipairs, unpack, setmetatable, rawget, spack, sunpack, mpack, munpack,
  jencode, jdecode, sformat, ssub, sfind, srep

local TOOL, LLM, AGENTS, WIDTH = 6, 5, 7, 8
local SPEND = {1, 2, 3, 4}
local COUNT = {5, 6, 7}
local MAXF = 9223372036854775807  -- as a double this is 2^63
local MAXS = "9223372036854775807"
local F8, F9 = "<dddddddd", "<ddddddddd"
local F16, F17 = "<dddddddddddddddd", "<ddddddddddddddddd"
local LEVEL_BYTES, AGENT_BYTES, HOLD_BYTES = 128, 136, 72  -- 16, 17 and 9 doubles

local function istr(x)
  if x >= MAXF then return MAXS end
  return sformat("%d", x)
end

local function fstr(x) return sformat("%.17g", x) end

local function sat(x)
  if x >= MAXF then return MAXF end
  return x
end

local function arr(t)
  if type(t) ~= "table" then return {} end
  return t
end

local function strs(v)
  local out = {}
  for i = 1, #v do out[i] = istr(v[i]) end
  return out
end

local function zeros() return {0, 0, 0, 0, 0, 0, 0, 0} end

-- Counter vectors unpacked from stored values and arguments, reused from call to call (fewer
-- tables to allocate and sweep): `dispatch` rewinds the pool, so a vector from `v8` must not
-- outlive its call. Nothing keeps one: stored values and replies are built from their numbers.
local POOL, npool = {}, 0

local function v8(a, b, c, d, e, f, g, h)
  npool = npool + 1
  local t = POOL[npool]
  if t then
    t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8] = a, b, c, d, e, f, g, h
  else
    t = {a, b, c, d, e, f, g, h}
    POOL[npool] = t
  end
  return t
end

local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

local function add(target, amounts)
  for i = 1, WIDTH do target[i] = sat(target[i] + amounts[i]) end
end

local function sub(target, amounts)
  for i = 1, WIDTH do
    if target[i] > amounts[i] then target[i] = target[i] - amounts[i] else target[i] = 0 end
  end
end

-- Byte-wise order (= code point order for UTF-8, as Python compares str); Lua's own `<`
-- follows the server's locale.
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- Python's float floor division, exactly (used for UTC window boundaries).
local function floordiv(x, y)
  local mod = math.fmod(x, y)
  local div = (x - mod) / y
  if mod ~= 0 and ((y < 0) ~= (mod < 0)) then div = div - 1 end
  local fl = math.floor(div)
  if div - fl > 0.5 then fl = fl + 1 end
  return fl
end

-- -- levels -------------------------------------------------------------------------------

-- Engine._reach: the least count n with n / lim >= t, the one threshold rule of every store.
-- Counts and limits below 2^53 are exact doubles, so the division rounds as Python's does;
-- above, n - 1 == n and the product is kept, as in Python.
local function reach(t, lim)
  if lim <= 0 then return 0 end
  local n = math.ceil(t * lim)
  if n >= 9007199254740992 then return n end
  while n > 0 and (n - 1) / lim >= t do n = n - 1 end
  while n / lim < t do n = n + 1 end
  return n
end

local function refresh(lv)
  lv.lim, lv.spend, lv.count, lv.soft = {}, {}, {}, {}
  for d = 1, 7 do
    if lv.base[d] then lv.lim[d] = sat(lv.base[d] + lv.topup[d]) end
  end
  for _, d in ipairs(SPEND) do
    if lv.lim[d] then lv.spend[#lv.spend + 1] = {d, lv.lim[d]} end
  end
  for _, d in ipairs(COUNT) do
    if lv.lim[d] then lv.count[#lv.count + 1] = {d, lv.lim[d]} end
  end
  -- Per limited dimension: {d, limit, the count of the first threshold, the count of each}.
  if lv.warn[1] then
    for d = 1, 7 do
      local lim = lv.lim[d]
      if lim and lim ~= 0 then
        local marks = {}
        for i, t in ipairs(lv.warn) do marks[i] = reach(t, lim) end
        lv.soft[#lv.soft + 1] = {d, lim, marks[1], marks}
      end
    end
  end
end

-- Decoded configurations by stored value. Shared between calls, so never mutated: a level
-- reads them through its metatable and every change goes to the level's own fields (tables
-- are copied first: `own`).
local CFG, ncfg = {}, 0

local function cfg_of(raw)
  local cfg = CFG[raw]
  if cfg then return cfg end
  cfg = munpack(raw)
  for i = 1, 7 do cfg.base[i] = cfg.base[i] or nil end
  cfg.ag, cfg.ai = arr(cfg.ag), {}
  for i, c in ipairs(cfg.ag) do
    cfg.ai[c.k] = i
    c.th, c.cn = tonumber(c.th_s), tonumber(c.c_s)
    c.meta = {__index = c}
  end
  refresh(cfg)
  cfg.name_j = jencode(cfg.name)
  cfg.meta = {__index = cfg}
  if ncfg >= 256 then CFG, ncfg = {}, 0 end
  CFG[raw], ncfg = cfg, ncfg + 1
  return cfg
end

-- Per-call state: levels loaded by this call, by key and in load order (emptied by `dispatch`).
local cache, loaded = {}, {}

local F2 = "<dd"
local INF = 1 / 0

local function family_from(raw)
  if raw then fam_seq, fam_exp = sunpack(F2, raw) else fam_seq, fam_exp = 0, INF end
end

-- The family record, read once per call (a chain operation gets it with its levels).
local function family()
  if not fam_seq then family_from(redis.call("HGET", LEVELS, "x")) end
end

-- A level from its two stored fields (nil when it does not exist), cached for this call.
local function make_level(key, craw, hraw)
  if not craw then return nil end
  local cfg = cfg_of(craw)
  local hot = hraw or srep("\0", LEVEL_BYTES + AGENT_BYTES * #cfg.ag)
  local s1, s2, s3, s4, s5, s6, s7, s8, h1, h2, h3, h4, h5, h6, h7, h8 = sunpack(F16, hot)
  -- Every field a call may set is in the constructor: adding one later would resize the table.
  local lv = setmetatable({hot = hot, st = {}, spent = v8(s1, s2, s3, s4, s5, s6, s7, s8),
                           held = v8(h1, h2, h3, h4, h5, h6, h7, h8), dirty = false, cdirty = false}, cfg.meta)
  cache[key] = lv
  loaded[#loaded + 1] = lv
  return lv
end

local function load_level(key)
  local lv = cache[key]
  if lv then return lv end
  local r = redis.call("HMGET", LEVELS, "c" .. key, "h" .. key)
  return make_level(key, r[1], r[2])
end

-- An operation marks what it changed: counters (`touch`) or configuration (`ctouch`); only
-- that is written back.
local function touch(lv) lv.dirty = true end
local function ctouch(lv) lv.dirty, lv.cdirty = true, true end

-- A table field the level may change in place, copied from the shared configuration first.
local function own(lv, field)
  local t = rawget(lv, field)
  if t == nil then
    t = copy(lv[field])
    lv[field] = t
  end
  return t
end

-- An agent's state as this call's own table, or nil: its counters are own fields, its
-- contract reads through to the shared configuration until the call assigns a field.
local function agent_of(lv, akey)
  local st = lv.st[akey]
  if st then return st end
  local i = lv.ai[akey]
  if not i then return nil end
  local al, s1, s2, s3, s4, s5, s6, s7, s8, h1, h2, h3, h4, h5, h6, h7, h8 =
    sunpack(F17, lv.hot, LEVEL_BYTES + 1 + AGENT_BYTES * (i - 1))
  st = setmetatable({al = al, s = v8(s1, s2, s3, s4, s5, s6, s7, s8), h = v8(h1, h2, h3, h4, h5, h6, h7, h8)},
                    lv.ag[i].meta)
  lv.st[akey] = st
  return st
end

local function agents_of(lv)
  local out = {}
  for i, c in ipairs(lv.ag) do out[i] = agent_of(lv, c.k) end
  return out
end

local function new_agent(key)
  return {k = key, p = 1, al = 0, mr = 0, th_s = "", c_s = "", s = zeros(), h = zeros()}
end

local function add_agent(lv, st)
  local ag, ai = own(lv, "ag"), own(lv, "ai")
  ag[#ag + 1] = {k = st.k, meta = {}}
  ai[st.k] = #ag
  lv.st[st.k] = st
  ctouch(lv)
end

local function cfg_pack(lv)
  local ag = {}
  for i, c in ipairs(lv.ag) do
    local st = lv.st[c.k] or c
    ag[i] = {k = c.k, p = st.p, u = st.u, mr = st.mr, th_s = st.th_s, c_s = st.c_s}
  end
  local b = {}
  for i = 1, 7 do b[i] = lv.base[i] or false end
  return mpack({
    key = lv.key, name = lv.name, base = b, warn = lv.warn, warn_s = lv.warn_s, window = lv.window,
    topup = lv.topup, fired = lv.fired, ws = lv.ws, ws_s = lv.ws_s, ag = ag,
  })
end

-- Every string a call makes costs a hash of all its bytes (Redis's Lua interns strings and
-- hashes every byte) and garbage to sweep, so the common shapes are packed in one `spack`.
local F33 = "<ddddddddddddddddddddddddddddddddd"  -- 16 + 17 doubles: a level with one agent

local function hot_pack(lv)
  local s, h = lv.spent, lv.held
  local ag = lv.ag
  if #ag == 0 then return spack(F16, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], h[1], h[2], h[3], h[4], h[5],
                                h[6], h[7], h[8]) end
  local st = #ag == 1 and lv.st[ag[1].k]
  if st then
    local as, ah = st.s, st.h
    return spack(F33, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8],
                 st.al, as[1], as[2], as[3], as[4], as[5], as[6], as[7], as[8], ah[1], ah[2], ah[3], ah[4], ah[5], ah[6],
                 ah[7], ah[8])
  end
  local parts = {spack(F16, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], h[1], h[2], h[3], h[4], h[5], h[6],
                       h[7], h[8])}
  for i, c in ipairs(lv.ag) do
    local st = lv.st[c.k]
    if st then
      s, h = st.s, st.h
      parts[i + 1] = spack(F17, st.al, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], h[1], h[2], h[3], h[4], h[5],
                           h[6], h[7], h[8])
    else
      local off = LEVEL_BYTES + 1 + AGENT_BYTES * (i - 1)
      parts[i + 1] = ssub(lv.hot, off, off + AGENT_BYTES - 1)
    end
  end
  return table.concat(parts)
end

-- The level as the JSON document of stores/_codec.py (for `figures`: Python reads this one).
local function level_doc(lv)
  local ag = {}
  for i, st in ipairs(agents_of(lv)) do
    ag[i] = {
      k = st.k, p = istr(st.p), un = st.u and istr(st.u - 1) or "", al = istr(st.al), mr = istr(st.mr),
      th = st.th_s, c = st.c_s, s = strs(st.s), h = strs(st.h),
    }
  end
  local b = {}
  for i = 1, 7 do b[i] = lv.base[i] and istr(lv.base[i]) or "" end
  local fired = {}
  for f in pairs(lv.fired) do fired[#fired + 1] = f end
  table.sort(fired, bytes_lt)
  return jencode({
    k = lv.key, n = lv.name, b = b, w = lv.warn_s, win = lv.window and istr(lv.window) or "",
    u = strs(lv.topup), s = strs(lv.spent), h = strs(lv.held), f = fired, ws = lv.ws_s, ag = ag,
  })
end

local function roll_window(lv)
  ctouch(lv)
  lv.ws = floordiv(now, lv.window) * lv.window
  lv.ws_s = fstr(lv.ws)
  lv.spent = zeros()
  lv.fired = {}
  for _, st in ipairs(agents_of(lv)) do st.s = zeros() end
end

-- -- ledger ------------------------------------------------------------------------------

local pending, npending = {}, 0
-- Fields (name, value, name, value ...) the fast paths wrote, for `save`'s HSET.
local XF, nxf = {}, 0

-- A ledger record: `sj` is the JSON of {chain, agent key} and `x` a JSON object, both written
-- by Python, so the common record is built by concatenation; `f` holds the kind's own fields.
local function entry(run, sj, kind, x, f)
  family()
  local seq = fam_seq + 1
  fam_seq, fam_dirty = seq, true
  local tail = "}"
  if f then tail = ',"f":' .. jencode(f) .. "}" end
  npending = npending + 1
  pending[npending] = '{"i":' .. istr(seq) .. ',"t":"' .. now_s .. '","b":' .. run.name_j .. ',"s":' .. sj
    .. ',"k":"' .. kind .. '","x":' .. x .. tail
  return seq
end

-- Every changed field of the levels hash in one HSET, then the ledger records in one RPUSH.
local function save()
  local fields, n = {}, 0
  for i = 1, #loaded do
    local lv = loaded[i]
    if lv.dirty then
      if lv.cdirty then
        fields[n + 1], fields[n + 2], n = "c" .. lv.key, cfg_pack(lv), n + 2
      end
      fields[n + 1], fields[n + 2], n = "h" .. lv.key, hot_pack(lv), n + 2
    end
  end
  for i = 1, nxf do fields[n + i] = XF[i] end
  n = n + nxf
  if fam_dirty then fields[n + 1], fields[n + 2], n = "x", spack(F2, fam_seq, fam_exp), n + 2 end
  if n > 0 then redis.call("HSET", LEVELS, unpack(fields, 1, n)) end
  if npending > 0 then
    local len = redis.call("RPUSH", LEDGER, unpack(pending, 1, npending))
    if maxlen > 0 and len > maxlen then redis.call("LTRIM", LEDGER, -maxlen, -1) end
  end
end

-- -- holds -------------------------------------------------------------------------------

-- A hold as stored: its expiry and amounts (9 doubles), then the JSON of {chain, agent key}
-- and its ledger meta (a JSON object), separated by a newline (JSON text has no raw newline).
local HOLD_FMT = "<dddddddddc0c0c0"  -- in one pack: no intermediate string to intern

local function hold_pack(expires, m, sj, x)
  return spack(HOLD_FMT, expires, m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], sj, "\n", x)
end

local function hold_of(raw)
  local e, m1, m2, m3, m4, m5, m6, m7, m8 = sunpack(F9, raw)
  local cut = sfind(raw, "\n", HOLD_BYTES + 1, true)
  return {e = e, m = {m1, m2, m3, m4, m5, m6, m7, m8}, j = ssub(raw, HOLD_BYTES + 1, cut - 1), x = ssub(raw, cut + 1)}
end

-- Take a hold's amounts off the levels of `chain` and off agent `akey` of the first one (the
-- caller deletes the hold itself). Returns that first level.
local function unhold(chain, akey, amounts)
  local first = nil
  for i = 1, #chain do
    local lv = load_level(chain[i])
    if lv then
      touch(lv)
      sub(lv.held, amounts)
      if i == 1 then first = lv end
    end
  end
  if first then
    local st = agent_of(first, akey)
    if st then sub(st.h, amounts) end
  end
  return first
end

-- Delete a stored hold and take it off its levels and agent. `a` is the calling operation's
-- arguments: a hold made for the same chain and agent needs no decoding of its scope.
local function drop_hold(id, h, a)
  redis.call("HDEL", HOLDS, id)
  local chain, akey
  if a and a.sj == h.j then
    chain, akey = a.chain, a.agent
  else
    local scope = jdecode(h.j)
    chain, akey = arr(scope[1]), scope[2]
  end
  return unhold(chain, akey, h.m)
end

local function release_entry(first, h, reason)
  if first then entry(first, h.j, "release", h.x, {m = strs(h.m), r = reason}) end
end

local function due_first(p, q)
  if p[1] ~= q[1] then return p[1] < q[1] end
  return bytes_lt(p[2], q[2])
end

-- Release every hold whose lease ran out (its worker died), like Engine.expire. Only when `now`
-- has reached the family's earliest expiry: a lower bound, lowered by every new or renewed
-- lease and made exact by each scan, so a settled hold costs nothing here but a later scan.
local function expire()
  family()
  if now < fam_exp then return end
  local all = redis.call("HGETALL", HOLDS)
  local due, nearest = {}, INF
  for i = 1, #all, 2 do
    local e = sunpack("<d", all[i + 1])
    if e <= now then
      due[#due + 1] = {e, all[i], all[i + 1]}
    elseif e < nearest then
      nearest = e
    end
  end
  -- Oldest lease first, ties by id (byte-wise): the order of the ledger's release records.
  table.sort(due, due_first)
  for _, d in ipairs(due) do
    local h = hold_of(d[3])
    release_entry(drop_hold(d[2], h), h, "lease expired")
  end
  fam_exp, fam_dirty = nearest, true
end

-- -- rules -------------------------------------------------------------------------------

-- The chain's levels (nil and the first missing key if one does not exist), the family record
-- with them in one HMGET; expired holds are released first, windows rolled over.
local function fetch(chain)
  local n = #chain
  local r
  if n == 1 then
    r = redis.call("HMGET", LEVELS, "x", "c" .. chain[1], "h" .. chain[1])
  else
    local fields = {"x"}
    for i = 1, n do
      local key = chain[i]
      fields[2 * i], fields[2 * i + 1] = "c" .. key, "h" .. key
    end
    r = redis.call("HMGET", LEVELS, unpack(fields, 1, 2 * n + 1))
  end
  if not fam_seq then family_from(r[1]) end
  return r
end

-- `r`: the chain's fields as `fetch` returned them, if the caller has them already.
local function chain_levels(chain, r)
  local n = #chain
  r = r or fetch(chain)
  local levels = {}
  for i = 1, n do
    local key = chain[i]
    levels[i] = cache[key] or make_level(key, r[2 * i], r[2 * i + 1]) or false
  end
  expire()
  for i = 1, n do
    local lv = levels[i]
    if not lv then return nil, chain[i] end
    if lv.window and now >= lv.ws + lv.window then roll_window(lv) end
  end
  return levels
end

local function get_agent(run, akey)
  local st = agent_of(run, akey)
  if st == nil and akey == "n" then
    st = new_agent("n")
    add_agent(run, st)
  end
  return st
end

local function deny_lim(lv, d, lim, spent, req, how)
  return {t = "deny", w = "lim", n = lv.name, d = d - 1, l = istr(lim), s = istr(spent), q = istr(req), how = how}
end

local function crossed(warn, ratio)
  local best, best_s = nil, "0.0"
  for i, t in ipairs(warn.warn) do
    if ratio >= t and (best == nil or t > best) then best, best_s = t, warn.warn_s[i] end
  end
  return best_s
end

local function soft(levels, st)
  local br, blv, bd, bs, bl = nil, nil, nil, nil, nil
  for _, lv in ipairs(levels) do
    for _, c in ipairs(lv.soft) do
      local sp = lv.spent[c[1]]
      if c[3] <= sp and sp < c[2] then
        local r = sp / c[2]
        if br == nil or r > br then br, blv, bd, bs, bl = r, lv, c[1], sp, c[2] end
      end
    end
  end
  local run = levels[1]
  local u = st.u
  if u and st.al > 0 and run.warn[1] then
    local sp = st.s[u]
    local r = sp / st.al
    if run.warn[1] <= r and r < 1 and (br == nil or r > br) then br, blv, bd, bs, bl = r, false, u, sp, st.al end
  end
  if br == nil then return nil end
  local out = {t = "soft", rn = run.name, d = bd - 1, s = istr(bs), l = istr(bl)}
  if blv then
    out.n, out.th = blv.name, crossed(blv, br)
  else
    out.th = crossed(run, br)
  end
  return out
end

-- Shared results, never mutated: the common decision and the empty plan.
local ALLOWED, NOPLAN = {t = "allow"}, {}

local function plan(run, akey, st, shortfall)
  if shortfall <= 0 then return NOPLAN end
  local donors = {}
  for _, s in ipairs(agents_of(run)) do
    if s.u ~= nil and s.u == st.u and s.k ~= akey then
      local rem = s.al - s.s[s.u] - s.h[s.u]
      if s.p <= st.p and rem - s.mr > 0 then
        donors[#donors + 1] = {st = s, rem = rem, name = (s.k == "n") and "" or string.sub(s.k, 3)}
      end
    end
  end
  table.sort(donors, function(a, b)
    if a.st.p ~= b.st.p then return a.st.p < b.st.p end
    if a.rem ~= b.rem then return a.rem > b.rem end
    if a.name ~= b.name then return bytes_lt(a.name, b.name) end
    return bytes_lt(a.st.k, b.st.k)
  end)
  local out, missing = {}, shortfall
  for _, d in ipairs(donors) do
    local take = math.min(d.rem - d.st.mr, missing)
    out[#out + 1] = {d.st, take}
    missing = missing - take
    if missing == 0 then break end
  end
  return out
end

local function planned(pl)
  local sum = 0
  for _, p in ipairs(pl) do sum = sum + p[2] end
  return sum
end

local function apply_plan(run, sj, st, pl, x)
  local moved = 0
  for _, p in ipairs(pl) do
    local donor, amount = p[1], p[2]
    if amount > 0 then
      touch(run)
      donor.al = donor.al - amount
      st.al = st.al + amount
      moved = moved + amount
      entry(run, sj, "transfer", x, {dn = donor.k, am = istr(amount), u = istr(st.u - 1)})
    end
  end
  if moved > 0 then
    -- A bigger allocation can put the agent's spend back under a threshold: fire again when re-crossed.
    for i, t in ipairs(run.warn) do
      local key = "a|" .. st.k .. "|" .. run.warn_s[i]
      if run.fired[key] and st.s[st.u] / st.al < t then  -- st.al > 0: it grew by `moved`
        ctouch(run)
        own(run, "fired")[key] = nil
      end
    end
  end
  return moved
end

-- Engine._evaluate: spend limits first at every level, then the allocation (with the
-- reallocation plan, all or nothing), the confidence gate, the count limits, soft limits.
local function evaluate(levels, st, req, gate)
  for _, lv in ipairs(levels) do
    for _, c in ipairs(lv.spend) do
      local d, lim = c[1], c[2]
      local sp = lv.spent[d]
      if sp >= lim then return deny_lim(lv, d, lim, sp, req[d], "exhausted"), {} end
      if not gate and sp + lv.held[d] + req[d] > lim then
        return deny_lim(lv, d, lim, sp + lv.held[d], req[d], "would pass"), {}
      end
    end
  end
  local pl = NOPLAN
  local run = levels[1]
  if st.u then
    local u = st.u
    local need = st.s[u] + st.h[u]
    if not gate then need = need + req[u] end
    local shortfall = need - st.al
    local over
    if gate then
      shortfall = shortfall + 1
      over = need >= st.al
    else
      over = need > st.al
    end
    if over then
      pl = plan(run, st.k, st, shortfall)
      if planned(pl) < shortfall then
        return {t = "deny", w = "alloc", n = run.name, u = u - 1, al = istr(st.al), used = istr(st.s[u] + st.h[u]),
                q = istr(req[u]), sh = istr(shortfall)}, {}
      end
    end
  end
  if st.th and st.cn and not (st.cn < st.th) then
    return {t = "deny", w = "conf", n = run.name, th = st.th_s, c = st.c_s}, {}
  end
  for _, lv in ipairs(levels) do
    for _, c in ipairs(lv.count) do
      local d, lim = c[1], c[2]
      if req[d] ~= 0 and lv.spent[d] + lv.held[d] + req[d] > lim then
        return deny_lim(lv, d, lim, lv.spent[d] + lv.held[d], req[d], "would pass"), {}
      end
    end
  end
  return soft(levels, st) or ALLOWED, pl
end

local function fire(levels, sj, akey, st, x)
  local events = {}
  local run = levels[1]
  for _, lv in ipairs(levels) do
    for _, c in ipairs(lv.soft) do
      local d, lim, floor, marks = c[1], c[2], c[3], c[4]
      local sp = lv.spent[d]
      if sp >= floor then
        for i = 1, #marks do
          local key = tostring(d - 1) .. "|" .. lv.warn_s[i]
          if sp >= marks[i] and not lv.fired[key] then
            ctouch(lv)
            own(lv, "fired")[key] = true
            events[#events + 1] = {t = "soft", n = lv.name, rn = run.name, d = d - 1, s = istr(sp), l = istr(lim),
                                   th = lv.warn_s[i]}
          end
        end
      end
    end
  end
  if st.u and st.al > 0 then
    -- An allocation changes with every transfer, so its thresholds are judged by the ratio (`reach`'s rule).
    local r = st.s[st.u] / st.al
    for i, t in ipairs(run.warn) do
      local key = "a|" .. akey .. "|" .. run.warn_s[i]
      if r >= t and not run.fired[key] then
        ctouch(run)
        own(run, "fired")[key] = true
        events[#events + 1] = {t = "soft", rn = run.name, d = st.u - 1, s = istr(st.s[st.u]), l = istr(st.al),
                               th = run.warn_s[i]}
      end
    end
  end
  for _, e in ipairs(events) do entry(run, sj, "soft_limit", x, {e = e}) end
  return events
end

local function cover_overrun(run, sj, akey, st, x)
  if not st.u then return 0 end
  local shortfall = st.s[st.u] + st.h[st.u] - st.al
  if shortfall <= 0 then return 0 end
  local pl = plan(run, akey, st, shortfall)
  if planned(pl) < shortfall then return 0 end
  return apply_plan(run, sj, st, pl, x)
end


-- -- the common reserve and settle -------------------------------------------------------

-- Most calls are a reserve that fits with no soft limit near, or a settle that fires nothing
-- and needs no reallocation. These decide that from the stored values and the cached
-- configurations, with no level or agent tables, and write the counters back directly. Any
-- other case (a lease to expire, a window to roll, a refusal, a soft limit, a plan, a missing
-- level or agent) returns before writing anything, except a settle's HDEL of its hold, whose
-- result it hands on, and the general path runs instead on the same HMGET reply: the fast
-- paths are an exact subset of it.

-- Per chain level: configuration, stored counters, spent and held (scratch, like `POOL`).
local FC, FH, FS, FD = {}, {}, {}, {}

local function fast_load(chain, r)
  if now >= fam_exp then return false end
  for i = 1, #chain do
    local craw, hot = r[2 * i], r[2 * i + 1]
    if not (craw and hot) then return false end
    local cfg = cfg_of(craw)
    if (cfg.window and now >= cfg.ws + cfg.window) or #hot ~= LEVEL_BYTES + AGENT_BYTES * #cfg.ag then
      return false
    end
    local s1, s2, s3, s4, s5, s6, s7, s8, h1, h2, h3, h4, h5, h6, h7, h8 = sunpack(F16, hot)
    FC[i], FH[i], FS[i], FD[i] = cfg, hot, v8(s1, s2, s3, s4, s5, s6, s7, s8), v8(h1, h2, h3, h4, h5, h6, h7, h8)
  end
  return true
end

-- Agent `akey` of the first level: its index, contract, allocation, spent and held; or nil.
local function fast_agent(akey)
  local cfg = FC[1]
  local i = cfg.ai[akey]
  if not i then return nil end
  local al, s1, s2, s3, s4, s5, s6, s7, s8, h1, h2, h3, h4, h5, h6, h7, h8 =
    sunpack(F17, FH[1], LEVEL_BYTES + 1 + AGENT_BYTES * (i - 1))
  return i, cfg.ag[i], al, v8(s1, s2, s3, s4, s5, s6, s7, s8), v8(h1, h2, h3, h4, h5, h6, h7, h8)
end

-- Level i's counters for `save`, with agent `ai`'s (when given) replaced.
local function fast_write(key, i, ai, al, as, ah)
  local s, h, hot = FS[i], FD[i], FH[i]
  local nag = #FC[i].ag
  local blob
  if ai and nag == 1 then
    blob = spack(F33, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8],
                 al, as[1], as[2], as[3], as[4], as[5], as[6], as[7], as[8], ah[1], ah[2], ah[3], ah[4], ah[5], ah[6],
                 ah[7], ah[8])
  else
    blob = spack(F16, s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8])
    if ai then
      local off = LEVEL_BYTES + 1 + AGENT_BYTES * (ai - 1)
      blob = blob .. ssub(hot, LEVEL_BYTES + 1, off - 1)
        .. spack(F17, al, as[1], as[2], as[3], as[4], as[5], as[6], as[7], as[8], ah[1], ah[2], ah[3], ah[4], ah[5],
                 ah[6], ah[7], ah[8]) .. ssub(hot, off + AGENT_BYTES)
    elseif nag > 0 then
      blob = blob .. ssub(hot, LEVEL_BYTES + 1)
    end
  end
  XF[nxf + 1], XF[nxf + 2], nxf = "h" .. key, blob, nxf + 2
end

-- `evaluate` (not gated) would allow `req` with no soft limit and no plan.
local function fast_fits(n, req, c, al, as, ah)
  for i = 1, n do
    local cfg, sp, hd = FC[i], FS[i], FD[i]
    local spend, count, soft = cfg.spend, cfg.count, cfg.soft
    for j = 1, #spend do
      local d, lim = spend[j][1], spend[j][2]
      local x = sp[d]
      if x >= lim or x + hd[d] + req[d] > lim then return false end
    end
    for j = 1, #count do
      local d, lim = count[j][1], count[j][2]
      if req[d] ~= 0 and sp[d] + hd[d] + req[d] > lim then return false end
    end
    for j = 1, #soft do
      local e = soft[j]
      local x = sp[e[1]]
      if e[3] <= x and x < e[2] then return false end
    end
  end
  local u = c.u
  if u then
    if as[u] + ah[u] + req[u] > al then return false end
    local w = FC[1].warn[1]
    if w and al > 0 then
      local ratio = as[u] / al
      if w <= ratio and ratio < 1 then return false end
    end
  end
  if c.th and c.cn and not (c.cn < c.th) then return false end
  return true
end

-- After a settle's counters: `cover_overrun` would plan nothing and `fire` would fire nothing.
local function fast_quiet(n, akey, c, al, as, ah)
  local u = c.u
  if u and as[u] + ah[u] - al > 0 then return false end
  for i = 1, n do
    local cfg, sp = FC[i], FS[i]
    local soft = cfg.soft
    for j = 1, #soft do
      local d, marks = soft[j][1], soft[j][4]
      local x = sp[d]
      if x >= soft[j][3] then
        for k = 1, #marks do
          if x >= marks[k] and not cfg.fired[tostring(d - 1) .. "|" .. cfg.warn_s[k]] then return false end
        end
      end
    end
  end
  if u and al > 0 then
    local run = FC[1]
    local warn, r = run.warn, as[u] / al
    for k = 1, #warn do
      if r >= warn[k] and not run.fired["a|" .. akey .. "|" .. run.warn_s[k]] then return false end
    end
  end
  return true
end

-- -- operations --------------------------------------------------------------------------

local ops = {}

-- The arguments every chain operation starts with: ARGV[4] the JSON of {chain, agent key}
-- (copied into ledger records as it is), [5] the agent key, [6] the chain's length n and
-- [7 .. 6+n] the chain (the budget's level key first, then its ancestors'). Returns the
-- arguments and the index of the operation's first own argument. Both tables are reused from
-- call to call (every field is set here) and must not outlive the call.
local A, CHAIN = {sj = false, agent = false, chain = false}, {}

local function args(argv)
  local n = tonumber(argv[6])
  for i = #CHAIN, n + 1, -1 do CHAIN[i] = nil end
  for i = 1, n do CHAIN[i] = argv[6 + i] end
  A.sj, A.agent, A.chain = argv[4], argv[5], CHAIN
  return A, 7 + n
end

-- 8 integers, packed as little-endian doubles by Python.
local function vector(bin)
  local a, b, c, d, e, f, g, h = sunpack(F8, bin)
  return v8(a, b, c, d, e, f, g, h)
end

-- Resolve the chain and the agent, or say why not (the Python side raises).
local function begin(a, r)
  local levels, missing = chain_levels(a.chain, r)
  if not levels then return nil, nil, {err = "level", key = missing} end
  local st = get_agent(levels[1], a.agent)
  if not st then return nil, nil, {err = "agent", n = levels[1].name} end
  return levels, st, nil
end

-- Once markers: a step that a resumed run replays (a top-up, an agent start) is applied the first
-- time only. Members are "<length of the level key>:<level key><marker>", so that no two
-- (key, marker) pairs share one; markers older than ONCE_TTL are dropped when a new one is marked.
local ONCE_TTL = 30 * 86400

local function once_member(key, marker) return #key .. ":" .. key .. marker end

local function once_seen(key, marker)
  local marked = redis.call("ZSCORE", ONCE, once_member(key, marker))
  return marked ~= false and tonumber(marked) > now - ONCE_TTL
end

local function once_mark(key, marker)
  redis.call("ZREMRANGEBYSCORE", ONCE, "-inf", sformat("%.6f", now - ONCE_TTL))
  redis.call("ZADD", ONCE, now_s, once_member(key, marker))
end

function ops.check(argv)
  local a = args(argv)
  local levels, st, err = begin(a)
  if err then return err end
  local req = zeros()
  req[LLM] = 1
  local decision = evaluate(levels, st, req, true)
  return {d = decision}
end

-- ARGV after the chain: the request (`vector`), gate ("1" or "0"), hold id, lease ttl,
-- quiet ("1": a refusal writes no ledger record), meta (JSON object).
-- Reply: "A" .. moved when allowed without a soft limit (the common case), else JSON.
function ops.reserve(argv)
  local a, p = args(argv)
  local chain = a.chain
  local r = fetch(chain)
  local gate, id, x = argv[p + 1] == "1", argv[p + 2], argv[p + 5]
  if not gate and fast_load(chain, r) then
    local ai, c, al, as, ah = fast_agent(a.agent)
    local req = vector(argv[p])
    local n = #chain
    if ai and fast_fits(n, req, c, al, as, ah) then
      for i = 1, n do add(FD[i], req) end
      add(ah, req)
      for i = 1, n do fast_write(chain[i], i, i == 1 and ai or nil, al, as, ah) end
      local expires = now + tonumber(argv[p + 3])
      redis.call("HSET", HOLDS, id, hold_pack(expires, req, a.sj, x))
      if expires < fam_exp then fam_exp, fam_dirty = expires, true end
      return "A0"
    end
  end
  local levels, st, err = begin(a, r)
  if err then return err end
  local run = levels[1]
  local req = vector(argv[p])
  if gate then req = {0, 0, 0, 0, req[LLM], 0, 0, 0} end
  local decision, pl = evaluate(levels, st, req, gate)
  if decision.t == "deny" then
    if argv[p + 4] ~= "1" then entry(run, a.sj, "deny", x, {e = decision}) end
    return {d = decision}
  end
  local moved = apply_plan(run, a.sj, st, pl, x)
  for _, lv in ipairs(levels) do
    touch(lv)
    add(lv.held, req)
  end
  add(st.h, req)
  local expires = now + tonumber(argv[p + 3])
  redis.call("HSET", HOLDS, id, hold_pack(expires, req, a.sj, x))
  if expires < fam_exp then fam_exp, fam_dirty = expires, true end
  if decision.t == "allow" then
    if moved == 0 then return "A0" end
    return "A" .. istr(moved)
  end
  return {d = decision, mv = istr(moved)}
end

-- ARGV after the chain: hold id ("" for none), the hold's amounts (`vector`, or "" when the
-- caller does not know them), what the call consumed (`vector`), the ledger record's fields
-- (JSON object). Reply: "S<entry id> <moved> <run name>" when no soft limit fired (the common
-- case), else JSON.
function ops.settle(argv)
  local a, p = args(argv)
  local chain = a.chain
  local r = fetch(chain)
  local id, held, x = argv[p], argv[p + 1], argv[p + 3]
  local dropped = nil  -- whether the fast path found (and deleted) the hold, once it has tried
  if (id == "" or held ~= "") and fast_load(chain, r) then
    local ai, c, al, as, ah = fast_agent(a.agent)
    if ai then
      local n = #chain
      if id ~= "" then
        dropped = redis.call("HDEL", HOLDS, id) == 1
        if dropped then
          local m = vector(held)
          for i = 1, n do sub(FD[i], m) end
          sub(ah, m)
        end
      end
      local actual = vector(argv[p + 2])
      for i = 1, n do add(FS[i], actual) end
      add(as, actual)
      if fast_quiet(n, a.agent, c, al, as, ah) then
        for i = 1, n do fast_write(chain[i], i, i == 1 and ai or nil, al, as, ah) end
        local run = FC[1]
        return "S" .. istr(entry(run, a.sj, "llm", x)) .. " 0 " .. run.name
      end
    end
  end
  local levels, st, err = begin(a, r)
  if err then return err end
  local run = levels[1]
  if dropped ~= nil then
    if dropped then unhold(chain, a.agent, vector(held)) end
  elseif id ~= "" then
    if held ~= "" then
      -- The caller made this hold for this chain and agent and sent its amounts (they never
      -- change), so the hold need not be read: HDEL says whether it still existed.
      if redis.call("HDEL", HOLDS, id) == 1 then unhold(a.chain, a.agent, vector(held)) end
    else
      local raw = redis.call("HGET", HOLDS, id)
      if raw then drop_hold(id, hold_of(raw), a) end
    end
  end
  local actual = vector(argv[p + 2])
  for _, lv in ipairs(levels) do
    touch(lv)
    add(lv.spent, actual)
  end
  add(st.s, actual)
  local seq = entry(run, a.sj, "llm", x)
  local moved = cover_overrun(run, a.sj, a.agent, st, x)
  local events = fire(levels, a.sj, a.agent, st, x)
  if #events == 0 then return "S" .. istr(seq) .. " " .. istr(moved) .. " " .. run.name end
  return {id = istr(seq), rn = run.name, mv = istr(moved), ev = events}
end

-- ARGV: 4 hold id, 5 reason.
function ops.release(argv)
  expire()
  local id = argv[4]
  local raw = redis.call("HGET", HOLDS, id)
  if not raw then return {ok = false} end
  local h = hold_of(raw)
  release_entry(drop_hold(id, h), h, argv[5])
  return {ok = true}
end

-- ARGV: 4 hold id, 5 lease ttl.
function ops.renew(argv)
  local id = argv[4]
  local raw = redis.call("HGET", HOLDS, id)
  if not raw then return {ok = false} end
  local expires = now + tonumber(argv[5])
  redis.call("HSET", HOLDS, id, spack("<d", expires) .. ssub(raw, 9))
  family()
  if expires < fam_exp then fam_exp, fam_dirty = expires, true end
  return {ok = true}
end

-- ARGV: 4 hold id.
function ops.held(argv)
  local raw = redis.call("HGET", HOLDS, argv[4])
  if not raw then return {} end
  return {m = strs(hold_of(raw).m)}
end

-- ARGV: 4 level key, 5 agent key.
function ops.has_agent(argv)
  local lv = load_level(argv[4])
  return {ok = lv ~= nil and lv.ai[argv[5]] ~= nil}
end

-- ARGV after the chain: meta (JSON object).
function ops.begin_agent(argv)
  local a, p = args(argv)
  local x, marker = argv[p], argv[p + 1]
  local levels, st, err = begin(a)
  if err then return err end
  local run = levels[1]
  if marker ~= "" and once_seen(run.key, marker) then return {d = ALLOWED} end
  local req = zeros()
  req[AGENTS] = 1
  -- Reallocation that could cover the agent's next call lets it start; nothing moves yet (a start spends nothing).
  local decision = evaluate(levels, st, req, true)
  if decision.t == "deny" then
    entry(run, a.sj, "deny", x, {e = decision})
    return {d = decision}
  end
  for _, lv in ipairs(levels) do
    touch(lv)
    lv.spent[AGENTS] = sat(lv.spent[AGENTS] + 1)
  end
  st.s[AGENTS] = st.s[AGENTS] + 1
  entry(run, a.sj, "agent_start", x)
  return {d = decision, ev = fire(levels, a.sj, a.agent, st, x)}
end

-- ARGV after the chain: meta (JSON object).
function ops.count_tool(argv)
  local a, p = args(argv)
  local x = argv[p]
  local levels, st, err = begin(a)
  if err then return err end
  local run = levels[1]
  for _, lv in ipairs(levels) do
    local lim = lv.lim[TOOL]
    if lim and lv.spent[TOOL] + 1 > lim then
      local decision = deny_lim(lv, TOOL, lim, lv.spent[TOOL], 1, "would pass")
      entry(run, a.sj, "deny", x, {e = decision})
      return {d = decision}
    end
  end
  -- Judged before the call is counted, like an LLM call: the last call allowed is a soft limit.
  local decision = soft(levels, st) or ALLOWED
  for _, lv in ipairs(levels) do
    touch(lv)
    lv.spent[TOOL] = sat(lv.spent[TOOL] + 1)
  end
  st.s[TOOL] = st.s[TOOL] + 1
  entry(run, a.sj, "tool", x)
  return {d = decision, ev = fire(levels, a.sj, a.agent, st, x)}
end

-- ARGV after the chain: shortfall (integer), meta (JSON object).
function ops.reallocate(argv)
  local a, p = args(argv)
  local levels, st, err = begin(a)
  if err then return err end
  local shortfall = tonumber(argv[p])
  local moved = 0
  if st.u and shortfall > 0 then
    moved = apply_plan(levels[1], a.sj, st, plan(levels[1], a.agent, st, shortfall), argv[p + 1])
  end
  return {mv = istr(moved)}
end

-- ARGV after the chain: the confidence (Python repr of a float).
function ops.set_confidence(argv)
  local a, p = args(argv)
  local levels, st, err = begin(a)
  if err then return err end
  ctouch(levels[1])
  st.c_s, st.cn = argv[p], tonumber(argv[p])
  return {}
end

-- ARGV: 4 level key, 5 marker. Changes nothing.
function ops.seen(argv)
  return {ok = once_seen(argv[4], argv[5])}
end

-- ARGV: 4 level key, 5 amounts (`vector`), 6 once marker ("": none).
function ops.top_up(argv)
  local lv = load_level(argv[4])
  if not lv then return {err = "level", key = argv[4]} end
  local marker = argv[6]
  if marker ~= "" then
    if once_seen(argv[4], marker) then return {ok = false} end
    once_mark(argv[4], marker)
  end
  ctouch(lv)
  local topup = own(lv, "topup")
  add(topup, vector(argv[5]))
  refresh(lv)
  -- A raised limit can put spend back under a threshold: let it fire again when re-crossed.
  local keep = {}
  for f in pairs(lv.fired) do
    local d, t = string.match(f, "^(%d+)|(.+)$")
    if string.sub(f, 1, 2) == "a|" then
      keep[f] = true
    elseif d then
      local lim = lv.lim[tonumber(d) + 1]
      if lim and lv.spent[tonumber(d) + 1] >= reach(tonumber(t), lim) then keep[f] = true end
    end
  end
  lv.fired = keep
  return {ok = true}
end

-- ARGV after the chain: the entry's kind (one of ledger.KINDS), its fields (JSON object).
function ops.note(argv)
  local a, p = args(argv)
  local levels, missing = chain_levels(a.chain)
  if not levels then return {err = "level", key = missing} end
  local kind = argv[p]
  if not string.match(kind, "^[a-z_]+$") then return redis.error_reply("budgetary: bad entry kind") end
  entry(levels[1], a.sj, kind, argv[p + 1])
  return {}
end

function ops.figures(argv)
  local a = args(argv)
  local levels, missing = chain_levels(a.chain)
  if not levels then return {err = "level", key = missing} end
  local out = {}
  for i, lv in ipairs(levels) do out[i] = level_doc(lv) end
  return {lv = out}
end

-- ARGV: 4 level key, 5 name, 6 window seconds ("" for none), 7 .. 13 limits ("" for none),
-- 14 .. the warn_at fractions (Python reprs).
function ops.ensure_budget(argv)
  local key = argv[4]
  local lv = load_level(key)
  local window = tonumber(argv[6])
  if lv == nil then
    lv = {key = key, name = argv[5], fired = {}, ag = {}, ai = {}, st = {}, topup = zeros(), spent = zeros(),
          held = zeros(), ws = 0, hot = ""}
    lv.name_j = jencode(lv.name)
    cache[key] = lv
    loaded[#loaded + 1] = lv
    if window then lv.ws = floordiv(now, window) * window end
    lv.ws_s = fstr(lv.ws)
  elseif window ~= lv.window then
    -- Boundaries are UTC multiples of the new window; spend so far stays in the current one.
    lv.ws = window and floordiv(now, window) * window or 0
    lv.ws_s = fstr(lv.ws)
  end
  ctouch(lv)
  lv.base = {}
  for i = 1, 7 do lv.base[i] = tonumber(argv[6 + i]) end
  lv.warn, lv.warn_s = {}, {}
  for i = 14, #argv do
    lv.warn[i - 13], lv.warn_s[i - 13] = tonumber(argv[i]), argv[i]
  end
  lv.window = window
  refresh(lv)
  return {}
end

-- ARGV: 4 level key, 5 agent key, 6 priority, 7 unit ("" for none), 8 allocation,
-- 9 min reserve, 10 confidence threshold ("" for none), 11 replace ("1" or "0").
function ops.ensure_agent(argv)
  local lv = load_level(argv[4])
  if not lv then return {err = "level", key = argv[4]} end
  local akey = argv[5]
  local un = tonumber(argv[7])
  local unit = un and (un + 1) or nil
  local st = agent_of(lv, akey)
  if st == nil then
    st = new_agent(akey)
    st.u, st.al = unit, tonumber(argv[8])
    add_agent(lv, st)
  elseif argv[11] == "1" then
    if st.u ~= unit then st.u, st.al = unit, tonumber(argv[8]) end
  else
    return {}
  end
  ctouch(lv)
  st.p, st.mr, st.th_s, st.th = tonumber(argv[6]), tonumber(argv[9]), argv[10], tonumber(argv[10])
  return {}
end

-- The entry point. Python appends its registration as a Redis Function (defined once, at
-- FUNCTION LOAD) or, on servers without Functions, `return dispatch(KEYS, ARGV)` (EVALSHA).
local function dispatch(keys, argv)
  if not spack then
    tonumber, tostring, type, pairs, ipairs, unpack, setmetatable, rawget, spack, sunpack, mpack, munpack,
      jencode, jdecode, sformat, ssub, sfind, srep = globals()
  end
  LEVELS, HOLDS, LEDGER, ONCE = keys[1], keys[2], keys[3], keys[4]
  fam_seq, fam_exp, fam_dirty = nil, nil, false
  now_s = argv[2]
  now = tonumber(now_s)
  maxlen = tonumber(argv[3])
  for i = #loaded, 1, -1 do
    cache[loaded[i].key], loaded[i] = nil, nil
  end
  npending, npool, nxf = 0, 0, 0
  local fn = ops[argv[1]]
  if not fn then return redis.error_reply("budgetary: unknown operation " .. tostring(argv[1])) end
  local reply = fn(argv)
  -- Every operation's changes are written here, once, whatever it replies.
  save()
  if type(reply) == "string" then return reply end
  return jencode(reply)
end
