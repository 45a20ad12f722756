--[[ hold.lua — admit a request by placing a hold on its billing account, or refuse it.
The decision mirrors policies/limits.py:decide, the rate windows policies/ratelimits.py (the parity
tests run one table through both).

KEYS[1]  {acct:A}:s            state hash: loaded, credits, holds, sub_alw, mh:<scope>, kh:<key>
KEYS[2]  {acct:A}:p:<period>   period hash: alw, aspent, spend, ms:<scope>, mx:<scope>, ks:<key>,
                               kx:<key>, al:* flags
KEYS[3]  {acct:A}:cfg          policy hash: limit, dml, den, disc, rpm, tpm, ml:<scope>, me:<scope>,
                               rpm:<scope>, tpm:<scope>
KEYS[4]  {acct:A}:keys         key id -> its entry: member scope, then its controls if any
                               (policies/limits.py:key_entry)
KEYS[5]  {acct:A}:blk:<scope>  set of blocked model names (scope: "" or, in a user account, the
                               team whose keys bill it personally: policies/keyspace.py)
KEYS[6]  {acct:A}:hz           hold id -> expiry (unix s)
KEYS[7]  {acct:A}:hv           hold id -> "<amount>|<scope>", or with rate or key limits
                               "<amount>|<scope>|<flags>|<tokens>|<key>" (flags: h = counted in
                               kh:<key>; k, m, t = logged in the key's, member's, team's window;
                               tokens: "<worst case>@<stamp>" when logged, so settle and release
                               find the log entry without a ZSCORE; else empty)
KEYS[8]  {acct:A}:alerts       alert stream (a limit refusal counts as reaching 100 % of it)
KEYS[9]  {acct:A}:rl:k:<key>   the key's rate log: "<hold id>|<tokens>" scored by stamp (ms)
KEYS[10] {acct:A}:rl:m:<scope> the member's rate log
KEYS[11] {acct:A}:rl:t         the team's rate log
         (each log's count, oldest stamp and sum are kept in the state hash, KEYS[1]: rlast, the
         account's last stamp; rc:<log> "<count>|<oldest stamp>|<stamp of its last PEXPIRE>";
         rs:<log> its tokens; <log> = k:<key>, m:<scope> or t)

ARGV[1]  now, unix seconds (integer)
ARGV[2]  hold id (the request id)
ARGV[3]  key id
ARGV[4]  member scope (the member's user id in a team account; in a user account the user id
         for personal keys, the team id for team keys billed personally)
ARGV[5]  model name
ARGV[6]  worst-case list cost of the request, nano-dollars
ARGV[7]  hold lifetime, seconds
ARGV[8]  period hash lifetime, seconds
ARGV[9]  now, unix milliseconds
ARGV[10] worst-case tokens of the request (prompt + output cap)
         (ARGV[9] and [10]: decimal integers, as the gateway sends them; stored as given)
ARGV[11] rate window, milliseconds (policies/ratelimits.py:WINDOW_MS)

Returns {status, hold, discount_bps, warn, alerted} and, when a rate limit applies (from the
money checks on), also {retry_after, stamp, req_limit, req_remaining, req_reset_ms, tok_limit,
tok_remaining, tok_reset_ms} (-1: no such limit)
  status  "ok" | "not_loaded" | "invalid_api_key" | "key_expired" | "model_not_allowed"
          | "insufficient_quota" | "team_spending_limit_reached" | "member_limit_reached"
          | "key_limit_reached" | "rate_limit_exceeded"
  hold    nano-dollars held (after discount); 0 when refused
  warn    1 when a soft member limit is exceeded by this request
  alerted 1 when this call queued an alert on KEYS[8] (policies/alerts.py)
  retry_after  whole seconds, for rate_limit_exceeded (else 0)
  stamp   the request's rate stamp (ms): now, never below the account's last stamp

Money is mutated only with HINCRBY (exact to 2^63); comparisons run on Lua doubles, exact for
amounts below 2^53 nano-dollars (about 9 million USD). A key without controls, in an account
without rate limits, costs one HGET where HEXISTS was, and four more fields in the cfg HMGET.
The common path reads each hash once: HGET keys, HMGET cfg, HMGET state, ZRANGEBYSCORE hz,
SISMEMBER blocked, HMGET period; then ZADD hz, HINCRBY state (2) and HSET hv: ten calls.
A rate-limited request adds a ZADD per log and one HSET of the state hash for them all (each log's
count, oldest stamp and sum are read in the state's HMGET), plus a ZRANGE and a ZREMRANGEBYRANK
for a log whose oldest entry aged out, and a PEXPIRE every half window.
]]
local state, period, cfg, keys, blocked, hz, hv, alerts =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local now = tonumber(ARGV[1])
local hold_id, key_id, scope, model = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local worst = tonumber(ARGV[6])

local function num(v, default)
  if v == false or v == nil or v == '' then return default end
  return tonumber(v)
end

local function str(n) return string.format('%.0f', n) end

local function refuse(code) return {code, 0, 0, 0, 0} end

-- The key and its controls: "<scope>" or "<scope>|<expires>|<limit>|<rpm>|<tpm>|<models>". Read
-- first (no refusal before "not_loaded" below) to know which state fields to read.
local entry = redis.call('HGET', keys, key_id)
local kscope, kexp, klimit, krpm, ktpm, kmodels
if entry and string.find(entry, '|', 1, true) then
  kscope, kexp, klimit, krpm, ktpm, kmodels = string.match(entry,
    '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
end
klimit = num(klimit, -1)

-- The policy before the state: the rate limits it sets say which state fields to read.
local c = redis.call('HMGET', cfg, 'disc', 'limit', 'dml', 'den', 'ml:' .. scope, 'me:' .. scope,
  'rpm', 'tpm', 'rpm:' .. scope, 'tpm:' .. scope)

-- Rate windows (policies/ratelimits.py): the key's, the member's, the team's log, those limited
-- (flags k, m, t in this order). The common path (no rate limit anywhere) stops at this one test.
local wins = {}
local limited = (krpm ~= nil and krpm ~= '') or (ktpm ~= nil and ktpm ~= '') or c[7] or c[8]
  or c[9] or c[10]
if limited then
  local rpm, tpm = num(krpm, nil), num(ktpm, nil)
  if rpm or tpm then
    wins[1] = {key = KEYS[9], field = 'k:' .. key_id, flag = 'k', rpm = rpm, tpm = tpm}
  end
  rpm, tpm = num(c[9], nil), num(c[10], nil)
  if rpm or tpm then
    wins[#wins + 1] = {key = KEYS[10], field = 'm:' .. scope, flag = 'm', rpm = rpm, tpm = tpm}
  end
  rpm, tpm = num(c[7], nil), num(c[8], nil)
  if rpm or tpm then
    wins[#wins + 1] = {key = KEYS[11], field = 't', flag = 't', rpm = rpm, tpm = tpm}
  end
end

-- One HMGET per hash on the common path: the state hash's fields are read before expiry and read
-- again only when a hold expired (which changes holds, mh:* and kh:*).
local sfields = {'loaded', 'credits', 'holds', 'mh:' .. scope}
local pfields = {'alw', 'aspent', 'spend', 'ms:' .. scope, 'mx:' .. scope}
if klimit >= 0 then
  sfields[5] = 'kh:' .. key_id
  pfields[6] = 'ks:' .. key_id
  pfields[7] = 'kx:' .. key_id
end
local rfirst = #sfields + 1  -- the rate fields: rlast, then rc:<log> and rs:<log> of each window
if limited then
  sfields[rfirst] = 'rlast'
  for i, w in ipairs(wins) do
    sfields[rfirst + 2 * i - 1] = 'rc:' .. w.field
    sfields[rfirst + 2 * i] = 'rs:' .. w.field
  end
end
local s = redis.call('HMGET', state, unpack(sfields))
if s[1] ~= '1' then
  return {'not_loaded', 0, 0, 0, 0}
end

--#include holds

-- Expired holds (left by a crashed or timed-out request) stop counting.
if expire_holds(state, hz, hv, ARGV[1], '100') > 0 then
  s = redis.call('HMGET', state, unpack(sfields))
end

if not entry then return refuse('invalid_api_key') end
if kexp ~= nil then
  if kexp ~= '' and now >= tonumber(kexp) then return refuse('key_expired') end
  if kmodels ~= '' and not string.find(kmodels, ',' .. model .. ',', 1, true) then
    return refuse('model_not_allowed')
  end
end
if redis.call('SISMEMBER', blocked, model) == 1 then return refuse('model_not_allowed') end

-- This period's allowance is fixed on the period's first request from the subscription.
local p = redis.call('HMGET', period, unpack(pfields))
local alw = p[1]
if not alw then
  alw = redis.call('HGET', state, 'sub_alw') or '0'
  redis.call('HSET', period, 'alw', alw)
  redis.call('EXPIRE', period, tonumber(ARGV[8]))
end
alw = tonumber(alw)

local disc = num(c[1], 0)
if disc < 0 then disc = 0 elseif disc > 10000 then disc = 10000 end
local keep = 10000 - disc
-- floor(worst * keep / 10000), exact: split worst into whole ten-thousands and the rest.
local hold = math.floor(worst / 10000) * keep + math.floor((worst % 10000) * keep / 10000)

local credits, holds, member_holds = num(s[2], 0), num(s[3], 0), num(s[4], 0)
-- The member's spend in the team this period: here (ms) + billed to the other account (mx).
local aspent, spend, member_spend = num(p[2], 0), num(p[3], 0), num(p[4], 0) + num(p[5], 0)

-- Each limited log's count, oldest stamp and token sum, from the state hash (counted from the log
-- when the state has none); the entries that aged out are trimmed from its head (ZRANGE of a
-- page, ZREMRANGEBYRANK), only when the oldest has.
-- The stamp, the tokens and the TTL go to Redis as the strings they came as (formatting a number
-- costs about what a call does).
local tokens, window, t, t_s
local rset = {}  -- state's rate fields to write, as field, value, ...: one HSET at the end
if limited then
  tokens, window = tonumber(ARGV[10]), tonumber(ARGV[11])
  t, t_s = tonumber(ARGV[9]), ARGV[9]
  local last = num(s[rfirst], 0)
  if t < last then
    t, t_s = last, s[rfirst]
  elseif t > last then
    rset[1], rset[2] = 'rlast', t_s
  end
  local cutoff = t - window
  for i, w in ipairs(wins) do
    local count, oldest, mark = 0, nil, nil
    local meta = s[rfirst + 2 * i - 1]
    local sum = num(s[rfirst + 2 * i], 0)
    if meta then
      local n, o, m = string.match(meta, '^(%d+)|(%d*)|(%d*)$')
      count, oldest, mark = tonumber(n), o, m
    else
      -- No fields for this log (its first request, or a state hash lost without its logs): they
      -- are counted from the log itself, if any, and the ones that aged out trimmed below.
      local all = redis.call('ZRANGE', w.key, 0, -1, 'WITHSCORES')
      count, sum = #all / 2, 0
      for j = 1, #all, 2 do sum = sum + tonumber(string.match(all[j], '|(%d+)$')) end
      oldest = all[2]
      w.trimmed = true
    end
    if count == 0 then oldest, sum = nil, 0 end
    local at = oldest and tonumber(oldest)
    if at and at <= cutoff then
      -- Page through the head: the entries at or before the cutoff go, the first after it is the
      -- new oldest. A log that is gone (expired: every entry had aged out) counts nothing.
      -- The first page is two entries: a busy log trims about one entry per hold.
      local gone, first, size = 0, nil, 2
      while true do
        local page
        if gone == 0 then  -- the usual first page, its bounds as strings (no number to format)
          page = redis.call('ZRANGE', w.key, '0', '1', 'WITHSCORES')
        else
          page = redis.call('ZRANGE', w.key, gone, gone + size - 1, 'WITHSCORES')
        end
        for j = 1, #page, 2 do
          if tonumber(page[j + 1]) > cutoff then
            first = page[j + 1]
            break
          end
          sum = sum - tonumber(string.match(page[j], '|(%d+)$'))
          gone = gone + 1
        end
        if first or #page < 2 * size then break end
        size = 32
      end
      if gone == 1 then
        redis.call('ZREMRANGEBYRANK', w.key, '0', '0')
      elseif gone > 1 then
        redis.call('ZREMRANGEBYRANK', w.key, '0', gone - 1)
      end
      if first then count = count - gone else count, sum = 0, 0 end
      oldest, at = first, first and tonumber(first)
      w.trimmed = true
    end
    w.count, w.sum, w.oldest_s, w.mark = count, sum, oldest, mark
    w.oldest = at  -- nil: the log is empty
  end
end

-- The rate fields of the logs trimmed, to write also without an admission (a refusal).
local function rate_trimmed()
  for _, w in ipairs(wins) do
    if w.trimmed then
      rset[#rset + 1] = 'rc:' .. w.field
      rset[#rset + 1] = w.count .. '|' .. (w.oldest_s or '') .. '|' .. (w.mark or '')
      rset[#rset + 1] = 'rs:' .. w.field
      rset[#rset + 1] = str(w.sum)
    end
  end
  if rset[1] then redis.call('HSET', state, unpack(rset)) end
end

-- The x-ratelimit-* figures: the tightest limit of each kind (ratelimits.view).
local function rate_reply(status, held, warn, alerted, retry, admitted)
  local rq, tk = nil, nil
  for _, w in ipairs(wins) do
    local count, sum, oldest = w.count, w.sum, w.oldest
    if admitted then
      count, sum = count + 1, sum + tokens
      if oldest == nil then oldest = t end
    end
    local reset = 0
    if oldest ~= nil then reset = oldest + window - t end
    if w.rpm ~= nil then
      local left = math.max(0, w.rpm - count)
      if rq == nil or left < rq[2] or (left == rq[2] and w.rpm < rq[1]) then
        rq = {w.rpm, left, reset}
      end
    end
    if w.tpm ~= nil then
      local left = math.max(0, w.tpm - sum)
      if tk == nil or left < tk[2] or (left == tk[2] and w.tpm < tk[1]) then
        tk = {w.tpm, left, reset}
      end
    end
  end
  rq = rq or {-1, -1, -1}
  tk = tk or {-1, -1, -1}
  local d = 0
  if admitted then d = disc end
  return {status, held, d, warn, alerted, retry, t, rq[1], rq[2], rq[3], tk[1], tk[2], tk[3]}
end

local function refused(code, alerted)
  if limited then
    rate_trimmed()
    return rate_reply(code, 0, 0, alerted, 0, false)
  end
  return {code, 0, 0, 0, alerted}
end

-- A refusal by a limit: "100 % reached" alert, once per period and limit value.
local function refuse_limit(code, kind, subject, limit, spent, enforcement)
  local alerted = 0
  if redis.call('HSETNX', period, 'al:' .. subject .. ':100:' .. str(limit), '1') == 1 then
    redis.call('XADD', alerts, '*', 'kind', kind, 'scope', scope, 'threshold', '100',
      'limit', str(limit), 'spend', str(spent), 'enforcement', enforcement, 'trigger', 'refusal',
      'period', string.match(period, ':p:([^:]+)$'), 'at', ARGV[1])
    alerted = 1
  end
  return refused(code, alerted)
end

local left = alw - aspent
if left < 0 then left = 0 end
if left + credits - holds < hold then return refused('insufficient_quota', 0) end

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

-- Key limit: the key's spend here (ks) + billed to the other account (kx) + its holds.
if klimit >= 0 and num(p[6], 0) + num(p[7], 0) + num(s[5], 0) + hold > klimit then
  return refused('key_limit_reached', 0)
end

-- Rate limits: one more request, and its worst-case tokens, must fit every window.
if limited then
  local wait = -1
  for _, w in ipairs(wins) do
    if w.rpm ~= nil and w.count + 1 > w.rpm then
      local ms = window
      if w.rpm > 0 then
        local e = redis.call('ZRANGE', w.key, w.count - w.rpm, w.count - w.rpm, 'WITHSCORES')
        if e[2] then ms = tonumber(e[2]) + window - t end
      end
      if ms > wait then wait = ms end
    end
    if w.tpm ~= nil and w.sum + tokens > w.tpm then
      local ms = window
      if tokens <= w.tpm then
        local excess = w.sum + tokens - w.tpm
        local all = redis.call('ZRANGE', w.key, 0, -1, 'WITHSCORES')
        for i = 1, #all, 2 do
          excess = excess - tonumber(string.match(all[i], '|(%d+)$'))
          if excess <= 0 then
            ms = tonumber(all[i + 1]) + window - t
            break
          end
        end
      end
      if ms > wait then wait = ms end
    end
  end
  if wait >= 0 then
    local retry = math.ceil(wait / 1000)
    if retry < 1 then retry = 1 end
    rate_trimmed()
    return rate_reply('rate_limit_exceeded', 0, 0, 0, retry, false)
  end
end

redis.call('ZADD', hz, now + tonumber(ARGV[7]), hold_id)
local hold_s = str(hold)  -- formatted once (string.format is no small part of the script)
redis.call('HINCRBY', state, 'holds', hold_s)
redis.call('HINCRBY', state, 'mh:' .. scope, hold_s)
local flags = ''
if klimit >= 0 then
  flags = 'h'
  redis.call('HINCRBY', state, 'kh:' .. key_id, hold_s)
end
if limited then
  -- Each log's TTL (two windows) is set when it starts and renewed every half window, so a log
  -- outlives its newest entry by at least a window and a half: it expires only once every entry
  -- has aged out, which is when its count may start from nothing again.
  local member, half = hold_id .. '|' .. ARGV[10], window / 2
  for _, w in ipairs(wins) do
    flags = flags .. w.flag
    redis.call('ZADD', w.key, t_s, member)
    local mark = w.mark
    if w.count == 0 or mark == nil or mark == '' or t - tonumber(mark) >= half then
      redis.call('PEXPIRE', w.key, 2 * window)
      mark = t_s
    end
    rset[#rset + 1] = 'rc:' .. w.field
    rset[#rset + 1] = (w.count + 1) .. '|' .. (w.oldest_s or t_s) .. '|' .. mark
    rset[#rset + 1] = 'rs:' .. w.field
    rset[#rset + 1] = str(w.sum + tokens)
  end
  if rset[1] then redis.call('HSET', state, unpack(rset)) end
end
if flags == '' then
  redis.call('HSET', hv, hold_id, hold_s .. '|' .. scope)
else
  local logged = ''
  if wins[1] then logged = ARGV[10] .. '@' .. t_s end
  redis.call('HSET', hv, hold_id, hold_s .. '|' .. scope .. '|' .. flags .. '|' .. logged
    .. '|' .. key_id)
end
if limited then return rate_reply('ok', hold, warn, 0, 0, true) end
return {'ok', hold, disc, warn, 0}
