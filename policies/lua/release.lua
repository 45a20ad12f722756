--[[ release.lua — drop a request's hold without charging anything (upstream error, timeout).

KEYS[1]  {acct:A}:s            state hash (holds, mh:<scope>, kh:<key>)
KEYS[2]  {acct:A}:hz           hold expiries
KEYS[3]  {acct:A}:hv           hold values (hold.lua)
KEYS[4]  {acct:A}:rl:k:<key>   the key's rate log (hold.lua; its sum: rs:k:<key> in KEYS[1])
KEYS[5]  {acct:A}:rl:m:<scope> the member's rate log (rs:m:<scope>)
KEYS[6]  {acct:A}:rl:t         the team's rate log (rs:t)
ARGV[1]  hold id

Returns the amount released (0 when the hold was gone already). The request stays counted in
the rate logs it was admitted to (it was sent upstream), with 0 tokens.
]]
--#include holds

local hold_id = ARGV[1]
local v = redis.call('HGET', KEYS[3], hold_id)
if not v then return 0 end
local amount, hscope, flags, worst, hkey = unhold(KEYS[1], v)
local logs = {k = {KEYS[4], 'rs:k:' .. (hkey or '')}, m = {KEYS[5], 'rs:m:' .. hscope},
  t = {KEYS[6], 'rs:t'}}
if flags ~= '' and flags ~= 'h' then
  local stamp
  worst, stamp = logged_at(worst)
  if worst ~= '0' then
    local old = hold_id .. '|' .. worst
    for f in string.gmatch(flags, '[kmt]') do
      if relog(logs[f][1], old, stamp, hold_id .. '|0') then
        redis.call('HINCRBY', KEYS[1], logs[f][2], neg(worst))
      end
    end
  end
end
redis.call('HDEL', KEYS[3], hold_id)
redis.call('ZREM', KEYS[2], hold_id)
return tonumber(amount)
