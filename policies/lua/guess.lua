--[[ guess.lua — count an attempt at a guarded action (login, token, signup) in its buckets, or
give it back after a success. The rules are policies/guessing.py's; this applies them atomically,
so that concurrent attempts cannot all pass before the first one is counted.

KEYS[2i-1]  mb:{guess}:K:S:I:n   attempts counted in bucket i
KEYS[2i]    mb:{guess}:K:S:I:w   set while bucket i waits
ARGV[1]     "try" or "ok"
then per bucket i, four values from ARGV[2 + 4(i-1)]:
  free       attempts before the first wait
  window_s   the count is forgotten this long after the bucket's last attempt
  success    what "ok" does: clear | refund | keep
  waits      the wait schedule in seconds after attempt free, free+1, … ("2,4,8"; the last repeats)

Returns, for "try": {1, 0} when the attempt may go on (it is counted), {0, ms} when a bucket
still waits ms milliseconds (nothing counted). For "ok": {1, 0}.
]]
local n = #KEYS / 2

if ARGV[1] == 'ok' then
  for i = 1, n do
    local success = ARGV[2 + 4 * (i - 1) + 2]
    if success == 'clear' then
      redis.call('DEL', KEYS[2 * i - 1], KEYS[2 * i])
    elseif success == 'refund' then
      local count = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
      if count > 0 then redis.call('DECR', KEYS[2 * i - 1]) end
    end
  end
  return {1, 0}
end

local longest = 0
for i = 1, n do
  local left = redis.call('PTTL', KEYS[2 * i])
  if left > longest then longest = left end
end
if longest > 0 then return {0, longest} end

for i = 1, n do
  local at = 2 + 4 * (i - 1)
  local free, window = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local count = redis.call('INCR', KEYS[2 * i - 1])
  redis.call('EXPIRE', KEYS[2 * i - 1], window)
  if count >= free then
    local waits = {}
    for w in string.gmatch(ARGV[at + 3], '%d+') do waits[#waits + 1] = tonumber(w) end
    local wait = waits[math.min(count - free + 1, #waits)]
    redis.call('SET', KEYS[2 * i], '1', 'EX', wait)
  end
end
return {1, 0}
