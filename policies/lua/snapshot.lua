--[[ snapshot.lua — read an account's money state in one atomic step, for the reconcile.

KEYS[1]  {acct:A}:s            state hash
KEYS[2]  {acct:A}:hv           hold values
KEYS[3]  {acct:A}:usage        usage stream
KEYS[4..] {acct:A}:p:<period>  period hashes

ARGV[1]  id of the last usage stream entry the caller read ("0-0": none)

Returns {newer, state, hold values, period 1, period 2, ...}: newer is 1 when the stream has
entries past ARGV[1] (a settle ran since: read again); each hash as HGETALL gives it, an empty
list for a hash that does not exist.
]]
local newer = 0
if #redis.call('XRANGE', KEYS[3], '(' .. ARGV[1], '+', 'COUNT', 1) > 0 then newer = 1 end
local out = {newer, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
for i = 4, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[i]) end
return out
