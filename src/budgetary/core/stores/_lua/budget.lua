-- budgetary: the budget engine (src/budgetary/core/_engine.py) ported to Lua, so that
-- every operation on one budget family is one atomic script call, one round trip.
--
-- KEYS (all share the family's hash tag, so they live in one Redis Cluster slot):
--   1 levels  HASH  level key -> level state (MessagePack, this file's own format)
--   2 holds   HASH  hold id   -> hold (MessagePack)
--   3 holdz   ZSET  hold id scored by its lease expiry
--   4 ledger  LIST  ledger records (JSON), oldest first, trimmed to ARGV[3]
--   5 seq     STRING last ledger entry id
-- ARGV: 1 operation, 2 now (seconds, Python repr), 3 ledger max length (0 = unbounded),
--       4 the operation's arguments as one JSON object.
-- Names (budgets, agents, holds) only ever travel as data inside ARGV and documents.
-- Stored state is MessagePack: it keeps every double exactly (cjson keeps 14 digits) without
-- turning numbers into strings and back, which was most of an operation's cost. Lua numbers are
-- doubles, exact up to 2^53, and counters saturate at 2^63-1 like the Python engine's. What
-- Python reads (replies, ledger records, `figures`) is JSON with integers as decimal strings,
-- in the documents of stores/_codec.py.

-- Per-call state: set by `dispatch` at the start of every call (a Redis Function's upvalues
-- outlive the call, so nothing may carry over from the previous one).
local LEVELS, HOLDS, HOLDZ, LEDGER, SEQ
local now_s, now, maxlen

local TOOL, LLM, AGENTS, WIDTH = 6, 5, 7, 8
local SPEND = {1, 2, 3, 4}
local COUNT = {5, 6, 7}
local MAXF = 9223372036854775807  -- as a double this is 2^63
local MAXS = "9223372036854775807"

local function istr(x)
  if x >= MAXF then return MAXS end
  return string.format("%d", x)
end

local function fstr(x) return string.format("%.17g", x) end

local function sat(x)
  if x >= MAXF then return MAXF end
  return x
end

local function arr(t)
  if type(t) ~= "table" then return {} end
  return t
end

local function nums(t)
  local out = {}
  t = arr(t)
  for i = 1, WIDTH do out[i] = tonumber(t[i]) or 0 end
  return out
end

local function strs(v)
  local out = {}
  for i = 1, #v do out[i] = istr(v[i]) end
  return out
end

local function zeros() return {0, 0, 0, 0, 0, 0, 0, 0} end

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

local cache, loaded = {}, {}

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
  local first = lv.warn[1]
  if first then
    for d = 1, 7 do
      local lim = lv.lim[d]
      if lim and lim ~= 0 then lv.soft[#lv.soft + 1] = {d, lim, first * lim} end
    end
  end
end

local function new_agent(key)
  return {k = key, p = 1, al = 0, mr = 0, th_s = "", c_s = "", s = zeros(), h = zeros()}
end

-- A level as stored: `base` keeps `false` for "no limit" (a nil would end the array), agents are
-- their state tables as they are. Everything else on `lv` is derived on load.
local function level_pack(lv)
  local b = {}
  for i = 1, 7 do b[i] = lv.base[i] or false end
  return cmsgpack.pack({
    key = lv.key, name = lv.name, base = b, warn = lv.warn, warn_s = lv.warn_s, window = lv.window,
    topup = lv.topup, spent = lv.spent, held = lv.held, fired = lv.fired, ws = lv.ws, ws_s = lv.ws_s,
    agents = lv.agents,
  })
end

local function load_level(key)
  local lv = cache[key]
  if lv then return lv end
  local raw = redis.call("HGET", LEVELS, key)
  if not raw then return nil end
  lv = cmsgpack.unpack(raw)
  for i = 1, 7 do lv.base[i] = lv.base[i] or nil end
  lv.aidx = {}
  for _, st in ipairs(lv.agents) do lv.aidx[st.k] = st end
  refresh(lv)
  cache[key] = lv
  loaded[#loaded + 1] = lv
  return lv
end

-- Only levels an operation changed are written back (encoding is most of an operation's cost).
local function touch(lv) lv.dirty = true end

-- The level as the JSON document of stores/_codec.py (for `figures`: Python reads this one).
local function level_doc(lv)
  local ag = {}
  for i, st in ipairs(lv.agents) do
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
  return cjson.encode({
    k = lv.key, n = lv.name, b = b, w = lv.warn_s, win = lv.window and istr(lv.window) or "",
    u = strs(lv.topup), s = strs(lv.spent), h = strs(lv.held), f = fired, ws = lv.ws_s, ag = ag,
  })
end

local function roll_window(lv)
  touch(lv)
  lv.ws = floordiv(now, lv.window) * lv.window
  lv.ws_s = fstr(lv.ws)
  lv.spent = zeros()
  lv.fired = {}
  for _, st in ipairs(lv.agents) do st.s = zeros() end
end

-- -- ledger ------------------------------------------------------------------------------

local pending = {}

local function entry(run, chain, akey, kind, fields)
  local seq = redis.call("INCR", SEQ)
  fields.i, fields.t, fields.b, fields.c, fields.a, fields.k = istr(seq), now_s, run.name, chain, akey, kind
  pending[#pending + 1] = cjson.encode(fields)
  return seq
end

local function save()
  for _, lv in ipairs(loaded) do
    if lv.dirty then redis.call("HSET", LEVELS, lv.key, level_pack(lv)) end
  end
  if #pending > 0 then
    local len = redis.call("RPUSH", LEDGER, unpack(pending))
    if maxlen > 0 and len > maxlen then redis.call("LTRIM", LEDGER, -maxlen, -1) end
  end
end

-- -- holds -------------------------------------------------------------------------------

local function drop_hold(id, h)
  redis.call("HDEL", HOLDS, id)
  redis.call("ZREM", HOLDZ, id)
  local amounts = h.m
  local first = nil
  for i, key in ipairs(arr(h.c)) do
    local lv = load_level(key)
    if lv then
      touch(lv)
      sub(lv.held, amounts)
      if i == 1 then first = lv end
    end
  end
  if first then
    local st = first.aidx[h.a]
    if st then sub(st.h, amounts) end
  end
  return first
end

local function release_entry(first, h, reason)
  if first then entry(first, h.c, h.a, "release", {m = strs(h.m), x = h.x, r = reason}) end
end

-- Release every hold whose lease ran out (its worker died), like Engine.expire.
local function expire()
  local ids = redis.call("ZRANGEBYSCORE", HOLDZ, "-inf", now_s)
  for _, id in ipairs(ids) do
    local raw = redis.call("HGET", HOLDS, id)
    if raw then
      local h = cmsgpack.unpack(raw)
      release_entry(drop_hold(id, h), h, "lease expired")
    else
      redis.call("ZREM", HOLDZ, id)
    end
  end
end

-- -- rules -------------------------------------------------------------------------------

local function chain_levels(chain)
  expire()
  local levels = {}
  for i, key in ipairs(chain) do
    local lv = load_level(key)
    if not lv then return nil, key end
    if lv.window and now >= lv.ws + lv.window then roll_window(lv) end
    levels[i] = lv
  end
  return levels
end

local function get_agent(run, akey)
  local st = run.aidx[akey]
  if st == nil and akey == "n" then
    st = new_agent("n")
    touch(run)
    run.agents[#run.agents + 1] = st
    run.aidx["n"] = st
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

local function plan(run, akey, st, shortfall)
  if shortfall <= 0 then return {} end
  local donors = {}
  for _, s in ipairs(run.agents) do
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

local function apply_plan(run, chain, akey, st, pl, x)
  local moved = 0
  for _, p in ipairs(pl) do
    local donor, amount = p[1], p[2]
    if amount > 0 then
      touch(run)
      donor.al = donor.al - amount
      st.al = st.al + amount
      moved = moved + amount
      entry(run, chain, akey, "transfer", {dn = donor.k, am = istr(amount), u = istr(st.u - 1), x = x})
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
  local pl = {}
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
  return soft(levels, st) or {t = "allow"}, pl
end

local function fire(levels, chain, akey, st, x)
  local events = {}
  local run = levels[1]
  for _, lv in ipairs(levels) do
    for _, c in ipairs(lv.soft) do
      local d, lim, floor = c[1], c[2], c[3]
      local sp = lv.spent[d]
      if sp >= floor then
        for i, t in ipairs(lv.warn) do
          local key = tostring(d - 1) .. "|" .. lv.warn_s[i]
          if sp >= t * lim and not lv.fired[key] then
            touch(lv)
            lv.fired[key] = true
            events[#events + 1] = {t = "soft", n = lv.name, rn = run.name, d = d - 1, s = istr(sp), l = istr(lim),
                                   th = lv.warn_s[i]}
          end
        end
      end
    end
  end
  if st.u and st.al > 0 then
    for i, t in ipairs(run.warn) do
      local key = "a|" .. akey .. "|" .. run.warn_s[i]
      if st.s[st.u] >= t * st.al and not run.fired[key] then
        touch(run)
        run.fired[key] = true
        events[#events + 1] = {t = "soft", rn = run.name, d = st.u - 1, s = istr(st.s[st.u]), l = istr(st.al),
                               th = run.warn_s[i]}
      end
    end
  end
  for _, e in ipairs(events) do entry(run, chain, akey, "soft_limit", {e = e, x = x}) end
  return events
end

local function cover_overrun(run, chain, akey, st, x)
  if not st.u then return 0 end
  local shortfall = st.s[st.u] + st.h[st.u] - st.al
  if shortfall <= 0 then return 0 end
  local pl = plan(run, akey, st, shortfall)
  if planned(pl) < shortfall then return 0 end
  return apply_plan(run, chain, akey, st, pl, x)
end

-- -- operations --------------------------------------------------------------------------

local ops = {}

-- Resolve the chain and the agent, or say why not (the Python side raises).
local function begin(a)
  local levels, missing = chain_levels(a.chain)
  if not levels then return nil, nil, {err = "level", key = missing} end
  local st = get_agent(levels[1], a.agent)
  if not st then return nil, nil, {err = "agent", n = levels[1].name} end
  return levels, st, nil
end

function ops.check(a)
  local levels, st, err = begin(a)
  if err then return err end
  local req = zeros()
  req[LLM] = 1
  local decision = evaluate(levels, st, req, true)
  save()
  return {d = decision}
end

function ops.reserve(a)
  local levels, st, err = begin(a)
  if err then return err end
  local run = levels[1]
  local req = nums(a.req)
  if a.gate then req = {0, 0, 0, 0, req[LLM], 0, 0, 0} end
  local decision, pl = evaluate(levels, st, req, a.gate)
  if decision.t == "deny" then
    if not a.quiet then entry(run, a.chain, a.agent, "deny", {e = decision, x = a.x}) end
    save()
    return {d = decision}
  end
  local moved = apply_plan(run, a.chain, a.agent, st, pl, a.x)
  for _, lv in ipairs(levels) do
    touch(lv)
    add(lv.held, req)
  end
  add(st.h, req)
  local expires = now + tonumber(a.ttl)
  redis.call("HSET", HOLDS, a.id, cmsgpack.pack({c = a.chain, a = a.agent, m = req, e = expires, x = a.x}))
  redis.call("ZADD", HOLDZ, fstr(expires), a.id)
  save()
  return {d = decision, mv = istr(moved)}
end

function ops.settle(a)
  local levels, st, err = begin(a)
  if err then return err end
  local run = levels[1]
  if a.id ~= "" then
    local raw = redis.call("HGET", HOLDS, a.id)
    if raw then drop_hold(a.id, cmsgpack.unpack(raw)) end
  end
  local actual = nums(a.act)
  for _, lv in ipairs(levels) do
    touch(lv)
    add(lv.spent, actual)
  end
  add(st.s, actual)
  local id = entry(run, a.chain, a.agent, "llm", {x = a.x})
  local moved = cover_overrun(run, a.chain, a.agent, st, a.x)
  local events = fire(levels, a.chain, a.agent, st, a.x)
  save()
  return {id = istr(id), rn = run.name, mv = istr(moved), ev = events}
end

function ops.release(a)
  expire()
  local raw = redis.call("HGET", HOLDS, a.id)
  if not raw then
    save()
    return {ok = false}
  end
  local h = cmsgpack.unpack(raw)
  release_entry(drop_hold(a.id, h), h, a.reason)
  save()
  return {ok = true}
end

function ops.renew(a)
  local raw = redis.call("HGET", HOLDS, a.id)
  if not raw then return {ok = false} end
  local h = cmsgpack.unpack(raw)
  h.e = now + tonumber(a.ttl)
  redis.call("HSET", HOLDS, a.id, cmsgpack.pack(h))
  redis.call("ZADD", HOLDZ, fstr(h.e), a.id)
  return {ok = true}
end

function ops.held(a)
  local raw = redis.call("HGET", HOLDS, a.id)
  if not raw then return {} end
  return {m = strs(cmsgpack.unpack(raw).m)}
end

function ops.has_agent(a)
  local lv = load_level(a.key)
  return {ok = lv ~= nil and lv.aidx[a.agent] ~= nil}
end

function ops.begin_agent(a)
  local levels, st, err = begin(a)
  if err then return err end
  local run = levels[1]
  local req = zeros()
  req[AGENTS] = 1
  local decision, pl = evaluate(levels, st, req, true)
  if decision.t == "deny" then
    entry(run, a.chain, a.agent, "deny", {e = decision, x = a.x})
    save()
    return {d = decision}
  end
  apply_plan(run, a.chain, a.agent, st, pl, a.x)
  for _, lv in ipairs(levels) do
    touch(lv)
    lv.spent[AGENTS] = sat(lv.spent[AGENTS] + 1)
  end
  st.s[AGENTS] = st.s[AGENTS] + 1
  entry(run, a.chain, a.agent, "agent_start", {x = a.x})
  save()
  return {d = decision}
end

function ops.count_tool(a)
  local levels, st, err = begin(a)
  if err then return err end
  local run = levels[1]
  for _, lv in ipairs(levels) do
    local lim = lv.lim[TOOL]
    if lim and lv.spent[TOOL] + 1 > lim then
      local decision = deny_lim(lv, TOOL, lim, lv.spent[TOOL], 1, "would pass")
      entry(run, a.chain, a.agent, "deny", {e = decision, x = a.x})
      save()
      return {d = decision}
    end
  end
  for _, lv in ipairs(levels) do
    touch(lv)
    lv.spent[TOOL] = sat(lv.spent[TOOL] + 1)
  end
  st.s[TOOL] = st.s[TOOL] + 1
  entry(run, a.chain, a.agent, "tool", {x = a.x})
  local decision = soft(levels, st) or {t = "allow"}
  save()
  return {d = decision}
end

function ops.reallocate(a)
  local levels, st, err = begin(a)
  if err then return err end
  local shortfall = tonumber(a.short)
  local moved = 0
  if st.u and shortfall > 0 then
    moved = apply_plan(levels[1], a.chain, a.agent, st, plan(levels[1], a.agent, st, shortfall), a.x)
  end
  save()
  return {mv = istr(moved)}
end

function ops.set_confidence(a)
  local levels, st, err = begin(a)
  if err then return err end
  touch(levels[1])
  st.c_s, st.cn = a.v, tonumber(a.v)
  save()
  return {}
end

function ops.top_up(a)
  local lv = load_level(a.key)
  if not lv then return {err = "level", key = a.key} end
  touch(lv)
  add(lv.topup, nums(a.amt))
  refresh(lv)
  -- A raised limit can put spend back under a threshold: let it fire again when re-crossed.
  local keep = {}
  for f in pairs(lv.fired) do
    local d, t = string.match(f, "^(%d+)|(.+)$")
    if string.sub(f, 1, 2) == "a|" then
      keep[f] = true
    elseif d then
      local lim = lv.lim[tonumber(d) + 1]
      if lim and lv.spent[tonumber(d) + 1] >= tonumber(t) * lim then keep[f] = true end
    end
  end
  lv.fired = keep
  save()
  return {}
end

function ops.note(a)
  local levels, missing = chain_levels(a.chain)
  if not levels then return {err = "level", key = missing} end
  entry(levels[1], a.chain, a.agent, a.kind, {x = a.x})
  save()
  return {}
end

function ops.figures(a)
  local levels, missing = chain_levels(a.chain)
  if not levels then return {err = "level", key = missing} end
  save()
  local out = {}
  for i, lv in ipairs(levels) do out[i] = level_doc(lv) end
  return {lv = out}
end

function ops.ensure_budget(a)
  local lv = load_level(a.key)
  local window = tonumber(a.win)
  if lv == nil then
    lv = {key = a.key, name = a.name, fired = {}, agents = {}, aidx = {}, topup = zeros(), spent = zeros(),
          held = zeros(), ws = 0}
    cache[a.key] = lv
    loaded[#loaded + 1] = lv
    if window then lv.ws = floordiv(now, window) * window end
    lv.ws_s = fstr(lv.ws)
  end
  touch(lv)
  lv.base = {}
  for i = 1, 7 do lv.base[i] = tonumber(a.base[i]) end
  lv.warn, lv.warn_s = {}, {}
  for i, t in ipairs(arr(a.warn)) do
    lv.warn[i], lv.warn_s[i] = tonumber(t), t
  end
  lv.window = window
  refresh(lv)
  save()
  return {}
end

function ops.ensure_agent(a)
  local lv = load_level(a.key)
  if not lv then return {err = "level", key = a.key} end
  local un = tonumber(a.un)
  local unit = un and (un + 1) or nil
  local st = lv.aidx[a.agent]
  if st == nil then
    st = new_agent(a.agent)
    st.u, st.al = unit, tonumber(a.al)
    lv.agents[#lv.agents + 1] = st
    lv.aidx[a.agent] = st
  elseif a.replace then
    if st.u ~= unit then st.u, st.al = unit, tonumber(a.al) end
  else
    return {}
  end
  touch(lv)
  st.p, st.mr, st.th_s, st.th = tonumber(a.p), tonumber(a.mr), a.th, tonumber(a.th)
  save()
  return {}
end

-- The entry point. Python appends its registration as a Redis Function (defined once, at
-- FUNCTION LOAD) or, on servers without Functions, `return dispatch(KEYS, ARGV)` (EVALSHA).
local function dispatch(keys, argv)
  LEVELS, HOLDS, HOLDZ, LEDGER, SEQ = keys[1], keys[2], keys[3], keys[4], keys[5]
  now_s = argv[2]
  now = tonumber(now_s)
  maxlen = tonumber(argv[3])
  cache, loaded, pending = {}, {}, {}
  local fn = ops[argv[1]]
  if not fn then return redis.error_reply("budgetary: unknown operation " .. tostring(argv[1])) end
  return cjson.encode(fn(cjson.decode(argv[4])))
end
