--[[ resettle.lua — settles sent again because Redis may have lost them (its run id changed:
gateway/metering/recent.py). For each settle this Redis has no marker of, its usage record is
appended again, exactly as settle.lua first appended it, and the account is marked not loaded,
so that its next request rebuilds it from the ledger plus the stream, de-duplicated by request
id (gateway/metering/accounts.py): the record counts once whether or not the ledger has it.
A settle whose marker is here ran on this Redis: nothing is done for it.

KEYS[1]  {acct:A}:s            state hash
KEYS[2]  {acct:A}:hz           hold expiries
KEYS[3]  {acct:A}:hv           hold values
KEYS[4]  {acct:A}:usage        usage stream
KEYS[5..] {acct:A}:rid:<id>    the settle marker of each settle, in the order of ARGV

ARGV[1]  settle marker lifetime, seconds
ARGV[2..] for each settle: its hold id, the number n of record fields, then the n fields (field,
          value, ... as the usage stream took them: r and the record, split included;
          policies/usage_record.py)

Returns the number of settles whose record was appended.
]]
local state, hz, hv, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl = tonumber(ARGV[1])
local at, appended = 2, 0
for k = 5, #KEYS do
  local hold_id, n = ARGV[at], tonumber(ARGV[at + 1])
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ttl) then
    -- its hold, if this Redis still has it, is over (the rebuild sums the holds left in hv)
    redis.call('HDEL', hv, hold_id)
    redis.call('ZREM', hz, hold_id)
    redis.call('XADD', stream, '*', unpack(ARGV, at + 2, at + 1 + n))
    appended = appended + 1
  end
  at = at + 2 + n
end
if appended > 0 and redis.call('HGET', state, 'loaded') == '1' then
  redis.call('HSET', state, 'loaded', '0')
end
return appended
