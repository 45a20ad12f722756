--[[ release.lua — drop a request's hold without charging anything (upstream error, timeout).

KEYS[1]  {acct:A}:s    state hash (holds, mh:<scope>)
KEYS[2]  {acct:A}:hz   hold expiries
KEYS[3]  {acct:A}:hv   hold values
ARGV[1]  hold id

Returns the amount released (0 when the hold was gone already).
]]
-- Negate a decimal string for HINCRBY ("-0" is not an integer to Redis).
local function neg(a) if a == '0' then return '0' end return '-' .. a end

local v = redis.call('HGET', KEYS[3], ARGV[1])
if not v then return 0 end
local sep = string.find(v, '|', 1, true)
local amount = string.sub(v, 1, sep - 1)
redis.call('HINCRBY', KEYS[1], 'holds', neg(amount))
redis.call('HINCRBY', KEYS[1], 'mh:' .. string.sub(v, sep + 1), neg(amount))
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return tonumber(amount)
