-- wrk script for benchmarks/gateway.py: POST one JSON body, print one machine-readable line.
-- Environment: BODYFILE (path of the body), AUTH (Authorization header value, optional),
-- XKEY (X-API-Key header value, optional: LitServe's scheme).
local f = assert(io.open(os.getenv("BODYFILE"), "r"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local xkey = os.getenv("XKEY")
if xkey and xkey ~= "" then wrk.headers["X-API-Key"] = xkey end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d"
      .. " err_status=%d err_connect=%d err_read=%d err_write=%d err_timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
