--[=[ load.lua — install an account's state rebuilt from PostgreSQL, unless it is loaded already.
The caller holds the account's PostgreSQL advisory lock, so no management write interleaves.
The state counts the ledger plus the usage stream's records up to ARGV[4] that the ledger did not
have (policies/ledger.py); a record appended to the stream since then would be missing from it,
so the script installs nothing and answers -1 (read again and retry).

KEYS[1]  {acct:A}:s            state hash
KEYS[2]  {acct:A}:p:<period>   the current period's counters
KEYS[3]  {acct:A}:cfg          policy hash
KEYS[4]  {acct:A}:keys         active keys
KEYS[5]  {acct:A}:hz           hold expiries (kept)
KEYS[6]  {acct:A}:hv           hold values (kept: the state's holds, mh:<scope> and kh:<key>
                               are their sums, as hold.lua counts them)
KEYS[7]  {acct:A}:usage        usage stream
KEYS[8..] {acct:A}:blk:<scope> blocked-model sets, in the order of ARGV[1]'s "blocked" list

ARGV[1]  JSON {"state": {...}, "period": {...}, "cfg": {...}, "keys": {...},
               "blocked": [[model, ...], ...]}   (all values strings)
ARGV[2]  period hash lifetime, seconds
ARGV[3]  "force": reload even when loaded (operator rebuild)
ARGV[4]  id of the last usage stream entry the state counts ("0-0": none)

The rate logs' fields of the state hash (rlast, rc:*, rs:*: hold.lua) stay, as the logs do.
The holds in flight stay: a rebuild of a loaded account (an operator's, or after settles were
sent again, resettle.lua) forgets no reservation, so no hard limit is passed by requests admitted
meanwhile. On a Redis that lost its data there are none.

Returns 1 when it installed the state, 0 when the account was loaded already, -1 when the stream
has entries past ARGV[4].
(This comment's long brackets are of level 1, with an '=': the Lua 5.1 of Redis refuses a
double '[' inside a level 0 comment, "nesting of [[...]] is deprecated", and the script with it.)
]=]
if ARGV[3] ~= 'force' and redis.call('HGET', KEYS[1], 'loaded') == '1' then
  return 0
end
if #redis.call('XRANGE', KEYS[7], '(' .. ARGV[4], '+', 'COUNT', 1) > 0 then
  return -1
end
local data = cjson.decode(ARGV[1])
local old = redis.call('HGETALL', KEYS[1])
for j = 1, #old, 2 do
  local field, prefix = old[j], string.sub(old[j], 1, 3)
  if prefix == 'rc:' or prefix == 'rs:' or field == 'rlast' then data.state[field] = old[j + 1] end
end
for i = 1, #KEYS do
  if i < 5 or i > 7 then redis.call('DEL', KEYS[i]) end
end

local function put(key, map)
  local args = {}
  for k, v in pairs(map) do
    args[#args + 1] = k
    args[#args + 1] = tostring(v)
  end
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
end

put(KEYS[2], data.period)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
put(KEYS[3], data.cfg)
put(KEYS[4], data.keys)
for i, models in ipairs(data.blocked or {}) do
  if #models > 0 then redis.call('SADD', KEYS[7 + i], unpack(models)) end
end
-- The holds in flight: "<amount>|<scope>" or "<amount>|<scope>|<flags>|<tokens>|<key>", flag
-- h: counted in kh:<key> too (policies/reconcile.py:held)
local sums = {holds = 0}
local held = redis.call('HGETALL', KEYS[6])
for j = 2, #held, 2 do
  local amount, rest = string.match(held[j], '^([^|]*)|(.*)$')
  local hscope, flags, _, hkey = string.match(rest, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not hscope then hscope, flags = rest, '' end
  amount = tonumber(amount)
  sums.holds = sums.holds + amount
  sums['mh:' .. hscope] = (sums['mh:' .. hscope] or 0) + amount
  if string.find(flags, 'h', 1, true) then
    sums['kh:' .. hkey] = (sums['kh:' .. hkey] or 0) + amount
  end
end
for name, amount in pairs(sums) do data.state[name] = string.format('%.0f', amount) end
data.state.loaded = '1'
put(KEYS[1], data.state)
return 1
