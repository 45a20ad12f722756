--[[ hold.lua — admit a request by placing a hold on its billing account, or refuse it.
The decision mirrors policies/limits.py:decide (the parity tests run one table through both).

KEYS[1]  {acct:A}:s            state hash: loaded, credits, holds, sub_alw, mh:<scope>
KEYS[2]  {acct:A}:p:<period>   period hash: alw, aspent, spend, ms:<scope>, mx:<scope>, al:* flags
KEYS[3]  {acct:A}:cfg          policy hash: limit, dml, den, disc, ml:<scope>, me:<scope>
KEYS[4]  {acct:A}:keys         key id -> member scope (the keys allowed to bill A)
KEYS[5]  {acct:A}:blk:<scope>  set of blocked model names (scope: "" or, in a user account, the
                               team whose keys bill it personally: policies/keyspace.py)
KEYS[6]  {acct:A}:hz           hold id -> expiry (unix s)
KEYS[7]  {acct:A}:hv           hold id -> "<amount>|<scope>"
KEYS[8]  {acct:A}:alerts       alert stream (a limit refusal counts as reaching 100 % of it)

ARGV[1]  now, unix seconds (integer)
ARGV[2]  hold id (the request id)
ARGV[3]  key id
ARGV[4]  member scope (the member's user id in a team account; in a user account the user id
         for personal keys, the team id for team keys billed personally)
ARGV[5]  model name
ARGV[6]  worst-case list cost of the request, nano-dollars
ARGV[7]  hold lifetime, seconds
ARGV[8]  period hash lifetime, seconds

Returns {status, hold, discount_bps, warn, alerted}
  status  "ok" | "not_loaded" | "invalid_api_key" | "model_not_allowed" | "insufficient_quota"
          | "team_spending_limit_reached" | "member_limit_reached"
  hold    nano-dollars held (after discount); 0 when refused
  warn    1 when a soft member limit is exceeded by this request
  alerted 1 when this call queued an alert on KEYS[8] (policies/alerts.py)

Money is mutated only with HINCRBY (exact to 2^63); comparisons run on Lua doubles, exact for
amounts below 2^53 nano-dollars (about 9 million USD).
]]
local state, period, cfg, keys, blocked, hz, hv, alerts =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local now = tonumber(ARGV[1])
local hold_id, key_id, scope, model = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local worst = tonumber(ARGV[6])

if redis.call('HGET', state, 'loaded') ~= '1' then
  return {'not_loaded', 0, 0, 0, 0}
end

-- Negate a decimal string for HINCRBY ("-0" is not an integer to Redis).
local function neg(a) if a == '0' then return '0' end return '-' .. a end

-- Expired holds (left by a crashed or timed-out request) stop counting.
local expired = redis.call('ZRANGEBYSCORE', hz, '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  local v = redis.call('HGET', hv, id)
  if v then
    local sep = string.find(v, '|', 1, true)
    local amount = string.sub(v, 1, sep - 1)
    redis.call('HINCRBY', state, 'holds', neg(amount))
    redis.call('HINCRBY', state, 'mh:' .. string.sub(v, sep + 1), neg(amount))
    redis.call('HDEL', hv, id)
  end
  redis.call('ZREM', hz, id)
end

local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v)
end

local function str(n) return string.format('%.0f', n) end

local function refuse(code) return {code, 0, 0, 0, 0} end

-- A refusal by a limit: "100 % reached" alert, once per period and limit value.
local function refuse_limit(code, kind, subject, limit, spend, enforcement)
  local alerted = 0
  if redis.call('HSETNX', period, 'al:' .. subject .. ':100:' .. str(limit), '1') == 1 then
    redis.call('XADD', alerts, '*', 'kind', kind, 'scope', scope, 'threshold', '100',
      'limit', str(limit), 'spend', str(spend), 'enforcement', enforcement, 'trigger', 'refusal',
      'period', string.match(period, ':p:([^:]+)$'), 'at', ARGV[1])
    alerted = 1
  end
  return {code, 0, 0, 0, alerted}
end

if redis.call('HEXISTS', keys, key_id) == 0 then return refuse('invalid_api_key') end
if redis.call('SISMEMBER', blocked, model) == 1 then return refuse('model_not_allowed') end

-- This period's allowance is fixed on the period's first request from the subscription.
local alw = redis.call('HGET', period, 'alw')
if not alw then
  alw = redis.call('HGET', state, 'sub_alw') or '0'
  redis.call('HSET', period, 'alw', alw)
  redis.call('EXPIRE', period, tonumber(ARGV[8]))
end
alw = tonumber(alw)

local c = redis.call('HMGET', cfg, 'disc', 'limit', 'dml', 'den', 'ml:' .. scope, 'me:' .. scope)
local disc = num(c[1], 0)
if disc < 0 then disc = 0 elseif disc > 10000 then disc = 10000 end
local keep = 10000 - disc
-- floor(worst * keep / 10000), exact: split worst into whole ten-thousands and the rest.
local hold = math.floor(worst / 10000) * keep + math.floor((worst % 10000) * keep / 10000)

local s = redis.call('HMGET', state, 'credits', 'holds', 'mh:' .. scope)
local credits, holds, member_holds = num(s[1], 0), num(s[2], 0), num(s[3], 0)
local p = redis.call('HMGET', period, 'aspent', 'spend', 'ms:' .. scope, 'mx:' .. scope)
-- The member's spend in the team this period: here (ms) + billed to the other account (mx).
local aspent, spend, member_spend = num(p[1], 0), num(p[2], 0), num(p[3], 0) + num(p[4], 0)

local left = alw - aspent
if left < 0 then left = 0 end
if left + credits - holds < hold then return refuse('insufficient_quota') end

local limit = num(c[2], -1)
if limit >= 0 and spend + holds + hold > limit then
  return refuse_limit('team_spending_limit_reached', 'team', 'team', limit, spend, 'hard')
end

-- Member limit: the override when set ("-1" = explicitly none), else the team default.
local member_limit = c[5]
if member_limit == false then member_limit = c[3] end
member_limit = num(member_limit, -1)
local enforcement = c[6]
if enforcement == false or enforcement == '' then enforcement = c[4] end
if enforcement == false or enforcement == '' then enforcement = 'hard' end

local warn = 0
if member_limit >= 0 then
  if enforcement == 'hard' then
    if member_spend + member_holds + hold > member_limit then
      return refuse_limit('member_limit_reached', 'member', scope, member_limit, member_spend, 'hard')
    end
  elseif member_spend + hold > member_limit then
    warn = 1
  end
end

redis.call('ZADD', hz, now + tonumber(ARGV[7]), hold_id)
redis.call('HSET', hv, hold_id, str(hold) .. '|' .. scope)
redis.call('HINCRBY', state, 'holds', str(hold))
redis.call('HINCRBY', state, 'mh:' .. scope, str(hold))
return {'ok', hold, disc, warn, 0}
