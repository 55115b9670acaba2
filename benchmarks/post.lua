-- wrk script for the benchmarks: POST JSON, print one machine-readable line.
-- Environment: BODYFILE (the body; with several lines, one body per line, sent in turn so
-- that a model sees different inputs), AUTH (Authorization header value, optional),
-- XKEY (X-API-Key header value, optional: LitServe's scheme).
local bodies = {}
for line in io.lines(os.getenv("BODYFILE")) do
  if line ~= "" then bodies[#bodies + 1] = line end
end
wrk.method = "POST"
wrk.body = bodies[1]
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local xkey = os.getenv("XKEY")
if xkey and xkey ~= "" then wrk.headers["X-API-Key"] = xkey end

if #bodies > 1 then
  -- Only then a request function: wrk sends a fixed body faster without one.
  local i = 0
  request = function()
    i = i % #bodies + 1
    return wrk.format(nil, nil, nil, bodies[i])
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d"
      .. " err_status=%d err_connect=%d err_read=%d err_write=%d err_timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
