--[[ sweep.lua — clear a billing account's expired holds (left by a crashed worker or a request
that never settled) without waiting for the account's next request; hold.lua clears them the
same way as it admits one.

KEYS[1]  {acct:A}:s    state hash (holds, mh:<scope>, kh:<key>)
KEYS[2]  {acct:A}:hz   hold expiries
KEYS[3]  {acct:A}:hv   hold values (hold.lua)

ARGV[1]  now, unix seconds
ARGV[2]  the most holds to clear in this call (the rest on the next)

Returns the number of holds cleared.
]]
-- Negate a decimal string for HINCRBY ("-0" is not an integer to Redis).
local function neg(a) if a == '0' then return '0' end return '-' .. a end

local state, hz, hv = KEYS[1], KEYS[2], KEYS[3]
local expired = redis.call('ZRANGEBYSCORE', hz, '-inf', tonumber(ARGV[1]), 'LIMIT', 0,
  tonumber(ARGV[2]))
for _, id in ipairs(expired) do
  local v = redis.call('HGET', hv, id)
  if v then
    local amount, rest = string.match(v, '^([^|]*)|(.*)$')
    local hscope, flags, _, hkey = string.match(rest, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
    if not hscope then hscope, flags = rest, '' end
    redis.call('HINCRBY', state, 'holds', neg(amount))
    redis.call('HINCRBY', state, 'mh:' .. hscope, neg(amount))
    if string.find(flags, 'h', 1, true) then
      redis.call('HINCRBY', state, 'kh:' .. hkey, neg(amount))
    end
    redis.call('HDEL', hv, id)
  end
  redis.call('ZREM', hz, id)
end
return #expired
