--[[ ack.lua — acknowledge and delete usage stream entries whose records are in PostgreSQL, and
shorten their settle markers' life.
One command per stream for a whole batch: the ids travel as one argument (packing thousands of
separate arguments costs the writer more than the insert).

KEYS[1]  {acct:A}:usage   usage stream

ARGV[1]  consumer group
ARGV[2]  entry ids, separated by single spaces
ARGV[3]  the account's settle marker prefix, {acct:A}:rid: (policies/keyspace.py)
ARGV[4]  the request ids of those records, separated by single spaces (may be empty)
ARGV[5]  the markers' life from now, seconds (keyspace.RID_AFTER_LEDGER_S)

The markers are named from ARGV, not KEYS (thousands of key arguments cost the writer more than
the insert): each has KEYS[1]'s hash tag, so the same slot. A marker lives a day from its settle
(settle.lua) only to guard against a settle sent twice while its record is not in PostgreSQL;
once it is, every replay is dropped by the ledger check it makes first, so the marker needs to
outlive only a replay already on its way ('LT': never lengthened). Without this, markers held
~180 bytes of Redis per request for a day under any load.

Returns the number of entries deleted.
]]
local deleted = 0
local ids = {}
local function flush()
  if #ids > 0 then
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
    deleted = deleted + redis.call('XDEL', KEYS[1], unpack(ids))
    ids = {}
  end
end
for id in string.gmatch(ARGV[2], '%S+') do
  ids[#ids + 1] = id
  if #ids == 1000 then flush() end
end
flush()
local prefix, life = ARGV[3], tonumber(ARGV[5])
if prefix ~= nil and prefix ~= '' then
  for rid in string.gmatch(ARGV[4], '%S+') do
    redis.call('EXPIRE', prefix .. rid, life, 'LT')
  end
end
return deleted
