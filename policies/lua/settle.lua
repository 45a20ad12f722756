--[[ settle.lua — replace a request's hold by its actual cost and record its usage, atomically.
Idempotent on the request id: a second settle of the same request changes nothing.

KEYS[1]  {acct:A}:s            state hash (credits, holds, mh:<scope>, loaded, sub_alw)
KEYS[2]  {acct:A}:p:<period>   period counters
KEYS[3]  {acct:A}:hz           hold expiries
KEYS[4]  {acct:A}:hv           hold values
KEYS[5]  {acct:A}:rid:<id>     settle marker
KEYS[6]  {acct:A}:usage        usage stream (read by the PostgreSQL writer)

ARGV[1]  hold id
ARGV[2]  charged, nano-dollars (after discount)
ARGV[3]  member scope
ARGV[4]  key id
ARGV[5]  model name
ARGV[6]  period hash lifetime, seconds
ARGV[7]  settle marker lifetime, seconds
ARGV[8..] usage record as field, value pairs (appended to the stream as given, followed by
          from_allowance and from_credits)

Returns {settled, from_allowance, from_credits}
  settled  1 when this call settled the request, 0 when it had been settled before
The period's allowance is drawn first, then credits. If the account's state is not loaded
(Redis lost it), only the usage record is appended: the balance is rebuilt from PostgreSQL.
]]
local state, period, hz, hv, marker, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local hold_id, charged, scope, key_id, model = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]

if not redis.call('SET', marker, '1', 'NX', 'EX', tonumber(ARGV[7])) then
  return {0, 0, 0}
end

local v = redis.call('HGET', hv, hold_id)
if v then
  local sep = string.find(v, '|', 1, true)
  local amount = string.sub(v, 1, sep - 1)
  redis.call('HINCRBY', state, 'holds', -amount)
  redis.call('HINCRBY', state, 'mh:' .. string.sub(v, sep + 1), -amount)
  redis.call('HDEL', hv, hold_id)
  redis.call('ZREM', hz, hold_id)
end

local from_alw, from_credits = 0, charged
if redis.call('HGET', state, 'loaded') == '1' then
  local alw = redis.call('HGET', period, 'alw')
  if not alw then
    alw = redis.call('HGET', state, 'sub_alw') or '0'
    redis.call('HSET', period, 'alw', alw)
  end
  local left = tonumber(alw) - tonumber(redis.call('HGET', period, 'aspent') or '0')
  if left < 0 then left = 0 end
  from_alw = charged
  if from_alw > left then from_alw = left end
  from_credits = charged - from_alw
  redis.call('HINCRBY', period, 'aspent', from_alw)
  redis.call('HINCRBY', state, 'credits', -from_credits)
  redis.call('HINCRBY', period, 'spend', charged)
  redis.call('HINCRBY', period, 'req', 1)
  redis.call('HINCRBY', period, 'ms:' .. scope, charged)
  redis.call('HINCRBY', period, 'mr:' .. scope, 1)
  redis.call('HINCRBY', period, 'ks:' .. key_id, charged)
  redis.call('HINCRBY', period, 'mo:' .. model, charged)
  redis.call('EXPIRE', period, tonumber(ARGV[6]))
end

local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'from_allowance'
fields[#fields + 1] = tostring(from_alw)
fields[#fields + 1] = 'from_credits'
fields[#fields + 1] = tostring(from_credits)
redis.call('XADD', stream, '*', unpack(fields))
return {1, from_alw, from_credits}
