--[[ settle.lua — replace a request's hold by its actual cost and record its usage, atomically.
Idempotent on the request id: a second settle of the same request changes nothing.

KEYS[1]  {acct:A}:s            state hash (credits, holds, mh:<scope>, loaded, sub_alw)
KEYS[2]  {acct:A}:p:<period>   period counters
KEYS[3]  {acct:A}:hz           hold expiries
KEYS[4]  {acct:A}:hv           hold values
KEYS[5]  {acct:A}:rid:<id>     settle marker
KEYS[6]  {acct:A}:usage        usage stream (read by the PostgreSQL writer)
KEYS[7]  {acct:A}:cfg          policy hash (limits, for the alert thresholds)
KEYS[8]  {acct:A}:alerts       alert stream (read by the alert worker)
KEYS[9]  {acct:A}:rl:k:<key>   the key's rate log (hold.lua; its sum: rs:k:<key> in KEYS[1])
KEYS[10] {acct:A}:rl:m:<scope> the member's rate log (rs:m:<scope>)
KEYS[11] {acct:A}:rl:t         the team's rate log (rs:t)
KEYS[12] {acct:A}:resp:<id>    optional: the note of the stored response this request made

ARGV[1]  hold id
ARGV[2]  charged, nano-dollars (after discount)
ARGV[3]  member scope
ARGV[4]  key id
ARGV[5]  model name
ARGV[6]  period hash lifetime, seconds (set only when it has none: the hold set it)
ARGV[7]  settle marker lifetime, seconds
ARGV[8]  "1" when the hold warned about a soft member limit, else "0"
ARGV[9]  the request's time, unix seconds (stamped on alerts)
ARGV[10] the request's actual tokens: its entry in each rate log it was admitted to is
         corrected from the worst case to these (policies/ratelimits.py)
ARGV[11] usage record: its values as a JSON array not yet closed (policies/usage_record.py);
         appended to the stream as its one field r, closed by ",<from_allowance>,<from_credits>]"
ARGV[12] with KEYS[12]: the note, "<tokens>|<served by>" (policies/translate/responses_api.py)
ARGV[13] with KEYS[12]: the note's lifetime, seconds

Returns {settled, from_allowance, from_credits, alerted}
  settled  1 when this call settled the request, 0 when it had been settled before
  alerted  number of alerts queued on KEYS[8]
The period's allowance is drawn first, then credits (policies/holds.py:split_debit). If the
account's state is not loaded (Redis lost it), only the usage record is appended: the balance is
rebuilt from PostgreSQL. Thresholds crossed by this settle (policies/alerts.py:crossings) are
queued once per period and limit value (dedupe flag al:<subject>:<threshold>:<limit>).
]]
local state, period, hz, hv, marker, stream, cfg, alerts =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local hold_id, charged, scope, key_id, model = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local warned = ARGV[8] == '1'

if not redis.call('SET', marker, '1', 'NX', 'EX', ARGV[7]) then
  return {0, 0, 0, 0}
end
if KEYS[12] then
  redis.call('SET', KEYS[12], ARGV[12], 'EX', ARGV[13])
end

--#include holds
local function str(n) return string.format('%.0f', n) end
local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v)
end

local v = redis.call('HGET', hv, hold_id)
if v then
  local _, hscope, flags, worst, hkey = unhold(state, v)
  -- Rate logs: the entry's worst-case tokens become the actual ones (unless it aged out); nothing
  -- to do when they are the same (both are the decimal strings the gateway sent).
  if flags ~= '' and flags ~= 'h' then
    local stamp
    worst, stamp = logged_at(worst)
    if worst ~= ARGV[10] then
      local old, new = hold_id .. '|' .. worst, hold_id .. '|' .. ARGV[10]
      local delta = str(tonumber(ARGV[10]) - tonumber(worst))
      if string.find(flags, 'k', 1, true) and relog(KEYS[9], old, stamp, new) then
        redis.call('HINCRBY', state, 'rs:k:' .. hkey, delta)
      end
      if string.find(flags, 'm', 1, true) and relog(KEYS[10], old, stamp, new) then
        redis.call('HINCRBY', state, 'rs:m:' .. hscope, delta)
      end
      if string.find(flags, 't', 1, true) and relog(KEYS[11], old, stamp, new) then
        redis.call('HINCRBY', state, 'rs:t', delta)
      end
    end
  end
  redis.call('HDEL', hv, hold_id)
  redis.call('ZREM', hz, hold_id)
end

-- Queue the thresholds of `limit` crossed from `before` to `after` (policies/alerts.py).
local alerted = 0
local function cross(kind, subject, before, after, limit, enforcement)
  local found = {}
  local q, r = math.floor(limit / 100), limit % 100
  for _, pct in ipairs({80, 100}) do
    local amount = q * pct + math.ceil(r * pct / 100)
    if before < amount and amount <= after then found[#found + 1] = tostring(pct) end
  end
  if enforcement == 'soft' and (warned or (before <= limit and limit < after)) then
    found[#found + 1] = 'exceeded'
  end
  for _, threshold in ipairs(found) do
    if redis.call('HSETNX', period, 'al:' .. subject .. ':' .. threshold .. ':' .. str(limit), '1') == 1 then
      redis.call('XADD', alerts, '*', 'kind', kind, 'scope', scope, 'threshold', threshold,
        'limit', str(limit), 'spend', str(after), 'enforcement', enforcement, 'trigger', 'spend',
        'period', string.match(period, ':p:([^:]+)$'), 'at', ARGV[9])
      alerted = alerted + 1
    end
  end
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
  redis.call('HINCRBY', period, 'aspent', str(from_alw))
  redis.call('HINCRBY', state, 'credits', neg(str(from_credits)))
  local spend = redis.call('HINCRBY', period, 'spend', ARGV[2])
  redis.call('HINCRBY', period, 'req', '1')
  local member_spend = redis.call('HINCRBY', period, 'ms:' .. scope, ARGV[2])
  redis.call('HINCRBY', period, 'mr:' .. scope, '1')
  redis.call('HINCRBY', period, 'ks:' .. key_id, ARGV[2])
  redis.call('HINCRBY', period, 'mo:' .. model, ARGV[2])
  if redis.call('TTL', period) < 0 then redis.call('EXPIRE', period, tonumber(ARGV[6])) end

  local c = redis.call('HMGET', cfg, 'limit', 'dml', 'den', 'ml:' .. scope, 'me:' .. scope)
  local limit = num(c[1], -1)
  if limit >= 0 then cross('team', 'team', spend - charged, spend, limit, 'hard') end
  local member_limit = c[4]
  if member_limit == false then member_limit = c[2] end
  member_limit = num(member_limit, -1)
  if member_limit >= 0 then
    local enforcement = c[5]
    if enforcement == false or enforcement == '' then enforcement = c[3] end
    if enforcement == false or enforcement == '' then enforcement = 'hard' end
    local after = member_spend + num(redis.call('HGET', period, 'mx:' .. scope), 0)
    cross('member', scope, after - charged, after, member_limit, enforcement)
  end
end

redis.call('XADD', stream, '*', 'r', ARGV[11] .. ',' .. str(from_alw) .. ',' .. str(from_credits)
  .. ']')
return {1, from_alw, from_credits, alerted}
