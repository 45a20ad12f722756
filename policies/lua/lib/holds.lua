-- lib/holds.lua — included by hold.lua, settle.lua, release.lua and sweep.lua (`--#include holds`,
-- expanded by gateway.metering.scripts.lua_source): the one copy of the code that takes a hold
-- out of an account's totals, and of the loop that clears expired holds.

-- Negate a decimal string for HINCRBY ("-0" is not an integer to Redis).
local function neg(a) if a == '0' then return '0' end return '-' .. a end

-- Take one hold out of the state hash's totals (`holds`, `mh:<scope>` and, for a key with its own
-- limit, `kh:<key>`). `v` is its value: `amount|scope` or `amount|scope|flags|tokens|key`
-- (hold.lua). Returns amount, scope, flags, tokens (the worst case held in the rate logs), key.
local function unhold(state, v)
  local amount, rest = string.match(v, '^([^|]*)|(.*)$')
  local hscope, flags, worst, hkey = string.match(rest, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not hscope then hscope, flags = rest, '' end
  redis.call('HINCRBY', state, 'holds', neg(amount))
  redis.call('HINCRBY', state, 'mh:' .. hscope, neg(amount))
  if string.find(flags, 'h', 1, true) then
    redis.call('HINCRBY', state, 'kh:' .. hkey, neg(amount))
  end
  return amount, hscope, flags, worst, hkey
end

-- Clear at most `limit` holds of the account that expired by `now` (left by a crashed worker or
-- a request that never settled): they stop counting in its totals. Returns how many were cleared.
-- `now` and `limit` go to Redis as given: pass the decimal strings they came as (a Lua number is
-- formatted on the way, which costs about what a call does).
local function expire_holds(state, hz, hv, now, limit)
  local expired = redis.call('ZRANGEBYSCORE', hz, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    local v = redis.call('HGET', hv, id)
    if v then
      unhold(state, v)
      redis.call('HDEL', hv, id)
    end
    redis.call('ZREM', hz, id)
  end
  return #expired
end

-- The tokens field of a logged hold (`unhold`'s fourth value): its worst-case tokens and the
-- stamp (a string, as the log's score was given) of its log entries, "<tokens>@<stamp>"; a hold
-- placed before the stamp was kept there has none (false): its entries are found by ZSCORE.
local function logged_at(tokens)
  local at = string.find(tokens, '@', 1, true)
  if not at then return tokens, false end
  return string.sub(tokens, 1, at - 1), string.sub(tokens, at + 1)
end

-- Replace a log's entry `old` (stamped `stamp`, or false: looked up) by `new` at the same stamp;
-- false when it is no longer there (aged out and trimmed, or the log expired).
local function relog(log, old, stamp, new)
  if not stamp then
    stamp = redis.call('ZSCORE', log, old)
    if not stamp then return false end
  end
  if redis.call('ZREM', log, old) == 0 then return false end
  redis.call('ZADD', log, stamp, new)
  return true
end
