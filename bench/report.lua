-- wrk script for `make bench`: optionally sends a POST body or paces the requests, and at the
-- end prints one line
--   BENCHJSON {...}
-- with the totals and latency percentiles (microseconds) that bench/bench.py parses.
-- BENCH_BODY_BYTES=N (environment) makes every request a POST with an N-byte body.
local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0")
if body_bytes > 0 then
   local pattern = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
   local full = math.floor(body_bytes / #pattern)
   local body = string.rep(pattern, full) .. string.sub(pattern, 1, body_bytes - full * #pattern)
   wrk.method = "POST"
   wrk.body = body
   wrk.headers["Content-Type"] = "application/octet-stream"
end

-- BENCH_PACE_MS=N (environment) makes each connection wait N ms on average (0 to 2N, at
-- random) after a response before it sends its next request: a fixed load instead of as many
-- requests as the server can take. Random, so the connections do not stay in step and send
-- their requests in bursts.
local pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "0")
if pace_ms > 0 then
   delay = function()
      return math.random(0, 2 * pace_ms)
   end
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
