-- wrk script for `make bench`: POST a JSON body, optional exponential think time per
-- connection, and one machine-readable summary line.
--
-- Environment: BENCH_BODY_FILE (the JSON body, required), BENCH_API_KEY (sent as a Bearer
-- token when set), BENCH_THINK_MS (mean think time between a response and the connection's
-- next request; 0 = closed loop at full speed), BENCH_HEADERS (extra headers, see below).
-- wrk's latency is from writing the request to reading the whole response; think time is not
-- part of it.

local f = assert(io.open(assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_API_KEY") or ""
if key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
-- BENCH_HEADERS: extra request headers, "Name: value" pairs separated by "|"
for pair in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end
local think = tonumber(os.getenv("BENCH_THINK_MS") or "0") or 0

function setup(thread)
  thread:set("seed", math.random(1, 2147483647))
end

function init(args)
  math.randomseed((seed or 1) + os.time())
end

if think > 0 then
  -- wrk takes the delay path only when a global delay() exists
  function delay()
    local u = math.random()
    if u >= 1 then u = 0.999999 end
    return math.floor(-think * math.log(1 - u) + 0.5)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local p = function(q) return latency:percentile(q) end
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p99_9":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, p(50), p(90), p(99), p(99.9)))
end
