--[[ sweep.lua — clear a billing account's expired holds (left by a crashed worker or a request
that never settled) without waiting for the account's next request; hold.lua clears them the
same way as it admits one.

KEYS[1]  {acct:A}:s    state hash (holds, mh:<scope>, kh:<key>)
KEYS[2]  {acct:A}:hz   hold expiries
KEYS[3]  {acct:A}:hv   hold values (hold.lua)

ARGV[1]  now, unix seconds
ARGV[2]  the most holds to clear in this call (the rest on the next)

Returns the number of holds cleared.
]]
--#include holds

return expire_holds(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
