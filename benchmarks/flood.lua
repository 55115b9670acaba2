-- wrk script for benchmarks/auth_flood.py: every request carries a well-formed API key with a
-- made-up public id (as an attacker guessing keys would send), and one line is printed.
math.randomseed(os.time())
local secret = string.rep("a", 52)

request = function()
  local id = string.format("%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
  return wrk.format("GET", "/v1/models", {["Authorization"] = "Bearer bsk_" .. id .. "_" .. secret})
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d\n", summary.requests, summary.duration))
end
