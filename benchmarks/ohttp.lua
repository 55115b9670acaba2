-- wrk script for benchmarks/ohttp.py: POST a different encapsulated request (OHTTP) each
-- time, read from a file of length-prefixed records, and print one machine-readable line.
-- Bastion refuses a repeated encapsulation (replay protection), so every request must carry
-- a body of its own: should the file run out, the script starts over from its first body,
-- counts the wrap in `wraps`, and each repeat then shows up as a non-2xx answer.
-- Environment: BODIES (the file: records of a 4-byte big-endian length, then the body),
-- AUTH (Authorization header value), MODEL (Bastion-Model header value).
-- Run it with -t1: each wrk thread would read the same file, and so send the same bodies.

local requests_by_index = {}
local count = 0
local next_index = 1
wraps = 0 -- globals: done() reads them from the thread's state with thread:get()
used = 0

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

-- Only the threads that send requests read the file (not the main state that runs done()).
-- Each request is formatted once here, so that sending costs wrk no more than post.lua does.
function init(args)
  local f = assert(io.open(os.getenv("BODIES"), "rb"))
  local data = f:read("*a")
  f:close()
  local headers = {
    ["Content-Type"] = "message/ohttp-req",
    ["Authorization"] = os.getenv("AUTH"),
    ["Bastion-Model"] = os.getenv("MODEL"),
  }
  local pos = 1
  while pos <= #data do
    local b1, b2, b3, b4 = data:byte(pos, pos + 3)
    local length = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
    local body = data:sub(pos + 4, pos + 3 + length)
    assert(#body == length, "truncated record in " .. os.getenv("BODIES"))
    count = count + 1
    requests_by_index[count] = wrk.format("POST", nil, headers, body)
    pos = pos + 4 + length
  end
  assert(count > 0, "no bodies in " .. os.getenv("BODIES"))
end

function request()
  if next_index > count then
    next_index = 1
    wraps = wraps + 1
  end
  local r = requests_by_index[next_index]
  next_index = next_index + 1
  used = used + 1
  return r
end

done = function(summary, latency, requests)
  local e = summary.errors
  local total_wraps, total_used = 0, 0
  for _, thread in ipairs(threads) do
    total_wraps = total_wraps + (thread:get("wraps") or 0)
    total_used = total_used + (thread:get("used") or 0)
  end
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d"
      .. " err_status=%d err_connect=%d err_read=%d err_write=%d err_timeout=%d"
      .. " wraps=%d bodies_used=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.write, e.timeout, total_wraps, total_used))
end
