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
