--[[ ack.lua — acknowledge and delete usage stream entries whose records are in PostgreSQL.
One command per stream for a whole batch: the ids travel as one argument (packing thousands of
separate arguments costs the writer more than the insert).

KEYS[1]  {acct:A}:usage   usage stream

ARGV[1]  consumer group
ARGV[2]  entry ids, separated by single spaces

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
return deleted
