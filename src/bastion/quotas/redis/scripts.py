"""The Lua scripts of the Redis limiter: each runs atomically in Redis, on Redis's clock.

Each subject (a tenant, a key) has a hash of its counts and, when it limits concurrency, a
sorted set of leases. The hash holds, for its minute buckets, the level, when it was last
refilled and the capacity it was refilled for (`rl ra rc`: requests; `tl ta tc`: tokens),
and the day (days since the Unix epoch, UTC) with the tokens used on it (`d dt`). A lease
is a member per admitted request, scored by when it expires (milliseconds). Numbers are
written with 17 significant digits: a level is a double, as it is in InMemoryLimiter, and
Redis would round a Lua number to 14.

The bucket arithmetic is InMemoryLimiter's, step for step (resize keeping what was used,
then refill; refuse on the same conditions in the same order), so that both limiters admit
and refuse the same requests and report the same headers. Every key is given an expiry
after which it holds nothing worth keeping (its buckets full, its day over), so idle
subjects cost no memory.
"""

from __future__ import annotations

_PRELUDE = """
local MINUTE, DAY = 60, 86400

local function fmt(x) return string.format('%.17g', x) end

-- Redis's clock: seconds (a double) and whole milliseconds.
local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s + us / 1e6, s * 1000 + math.floor(us / 1000)
end

-- A bucket's level now (nil: no such limit). A bucket seen for the first time is full; one
-- whose capacity changed keeps what was used of it.
local function bucket(level, at, old, cap, now)
  if cap < 0 then return nil end
  level, at, old = tonumber(level), tonumber(at), tonumber(old)
  if level == nil or at == nil or old == nil then return cap end
  if old ~= cap then level = cap - (old - level) end
  return math.min(cap, level + math.max(0, now - at) * cap / MINUTE)
end

-- Seconds until a bucket holds `amount` ('' : never, a bucket of capacity 0).
local function wait_for(level, cap, amount)
  local missing = amount - level
  if missing <= 0 then return '0' end
  if cap <= 0 then return '' end
  return fmt(missing * MINUTE / cap)
end

local function load(key, rpm, tpm, now)
  local v = redis.call('HMGET', key, 'rl', 'ra', 'rc', 'tl', 'ta', 'tc', 'd', 'dt')
  local s = {rpm = rpm, tpm = tpm}
  -- A bucket kept for a limit that was lifted since.
  s.stale_requests, s.stale_tokens = v[1] and rpm < 0, v[4] and tpm < 0
  s.requests = bucket(v[1], v[2], v[3], rpm, now)
  s.tokens = bucket(v[4], v[5], v[6], tpm, now)
  s.day = math.floor(now / DAY)
  s.day_tokens = 0
  if tonumber(v[7]) == s.day then s.day_tokens = tonumber(v[8]) or 0 end
  return s
end

local function store(key, s, now)
  local keep = 1
  local set, drop = {'d', fmt(s.day), 'dt', fmt(s.day_tokens)}, {}
  if s.requests then
    for _, x in ipairs({'rl', fmt(s.requests), 'ra', fmt(now), 'rc', fmt(s.rpm)}) do
      set[#set + 1] = x
    end
    if s.rpm > 0 then keep = math.max(keep, (s.rpm - s.requests) * MINUTE / s.rpm) end
  elseif s.stale_requests then
    -- The limit was lifted: should it come back, its bucket starts full.
    drop = {'rl', 'ra', 'rc'}
  end
  if s.tokens then
    for _, x in ipairs({'tl', fmt(s.tokens), 'ta', fmt(now), 'tc', fmt(s.tpm)}) do
      set[#set + 1] = x
    end
    if s.tpm > 0 then keep = math.max(keep, (s.tpm - s.tokens) * MINUTE / s.tpm) end
  elseif s.stale_tokens then
    for _, x in ipairs({'tl', 'ta', 'tc'}) do drop[#drop + 1] = x end
  end
  if s.day_tokens > 0 then keep = math.max(keep, (s.day + 1) * DAY - now) end
  redis.call('HSET', key, unpack(set))
  if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end
  redis.call('PEXPIRE', key, math.ceil(keep * 1000) + 1000)
end

local function levels(subjects, out)
  for i = 1, #subjects do
    local s = subjects[i]
    out[#out + 1] = s.requests and fmt(s.requests) or ''
    out[#out + 1] = s.tokens and fmt(s.tokens) or ''
  end
  return out
end
"""

# KEYS: per subject, its hash and its leases. ARGV: tokens, request bytes, up to (-1: none),
# the lease's member, the lease's life (ms), then per subject its requests per minute,
# tokens per minute, concurrent requests, tokens per day and request bytes (-1: no limit).
# Returns {outcome, subject (1-based; 0: none), wait (s; '': never), tokens reserved,
# token limited (0/1)}, then each subject's requests and tokens levels ('': no bucket).
# Every subject is checked before anything is taken: a refusal takes nothing.
RESERVE = (
    _PRELUDE
    + """
local now, now_ms = clock()
local tokens, request_bytes, up_to = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, lease_ms = ARGV[4], tonumber(ARGV[5])
local subjects = {}
for i = 1, #KEYS / 2 do
  local a = 5 + (i - 1) * 5
  local s = load(KEYS[2 * i - 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), now)
  s.concurrent, s.tpd = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  s.max_bytes = tonumber(ARGV[a + 5])
  subjects[i] = s
end

for i, s in ipairs(subjects) do
  local refused
  if s.max_bytes >= 0 and request_bytes > s.max_bytes then
    refused = {'too_large', i, ''}
  end
  if not refused and s.concurrent >= 0 then
    local leases = KEYS[2 * i]
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
    if redis.call('ZCARD', leases) >= s.concurrent then refused = {'concurrency', i, ''} end
  end
  if not refused and s.requests and s.requests < 1 then
    refused = {'requests', i, wait_for(s.requests, s.rpm, 1)}
  end
  if not refused and s.tokens and tokens > 0 then
    if tokens > s.tpm then
      refused = {'over_capacity', i, ''}
    elseif s.tokens < tokens then
      refused = {'tokens', i, wait_for(s.tokens, s.tpm, tokens)}
    end
  end
  if not refused and s.tpd >= 0 and s.day_tokens + tokens > s.tpd then
    refused = {'daily', i, fmt((s.day + 1) * DAY - now)}
  end
  if refused then
    refused[4], refused[5] = 0, 0
    return levels(subjects, refused)
  end
end

-- What every subject has left (at least `tokens`: the checks passed).
local least, limited = nil, 0
for _, s in ipairs(subjects) do
  local left
  if s.tokens then left = math.max(0, math.floor(s.tokens)) end
  if s.tpd >= 0 then
    local today = math.max(0, s.tpd - s.day_tokens)
    left = left and math.min(left, today) or today
  end
  if left then
    limited = 1
    least = least and math.min(least, left) or left
  end
end
if up_to >= 0 then
  tokens = math.max(tokens, least and math.min(up_to, least) or up_to)
end

for i, s in ipairs(subjects) do
  if s.requests then s.requests = s.requests - 1 end
  if s.tokens then s.tokens = s.tokens - tokens end
  s.day_tokens = s.day_tokens + tokens
  store(KEYS[2 * i - 1], s, now)
  if s.concurrent >= 0 then
    redis.call('ZADD', KEYS[2 * i], fmt(now_ms + lease_ms), member)
    redis.call('PEXPIRE', KEYS[2 * i], lease_ms + 1000)
  end
end
return levels(subjects, {'ok', 0, '', fmt(tokens), limited})
"""
)

# A reservation's tokens corrected (settle: the difference between what was used and what
# was reserved; charge: what was used after the settlement), and its lease freed.
# KEYS: per subject, its hash and its leases. ARGV: the difference, the lease's member
# ('': none), then per subject its requests and tokens per minute (-1: no limit).
ADJUST = (
    _PRELUDE
    + """
local now = clock()
local difference, member = tonumber(ARGV[1]), ARGV[2]
for i = 1, #KEYS / 2 do
  local a = 2 + (i - 1) * 2
  local s = load(KEYS[2 * i - 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), now)
  -- May go below zero: a request that used more than it reserved makes the next ones wait.
  if s.tokens then s.tokens = s.tokens - difference end
  s.day_tokens = math.max(0, s.day_tokens + difference)
  store(KEYS[2 * i - 1], s, now)
  if member ~= '' then redis.call('ZREM', KEYS[2 * i], member) end
end
return 1
"""
)

# The leases of a gateway's requests still in progress, extended.
# KEYS: lease sets. ARGV: the leases' life (ms), then per set its number of members and
# the members.
RENEW = (
    _PRELUDE
    + """
local _, now_ms = clock()
local lease_ms, a = tonumber(ARGV[1]), 2
for i = 1, #KEYS do
  local count = tonumber(ARGV[a])
  for j = 1, count do
    redis.call('ZADD', KEYS[i], fmt(now_ms + lease_ms), ARGV[a + j])
  end
  a = a + count + 1
  redis.call('PEXPIRE', KEYS[i], lease_ms + 1000)
end
return 1
"""
)

# A gateway's leases freed at once (it stops). KEYS: lease sets. ARGV: the lease's member.
RELEASE = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""

# One subject's buckets now, read only. KEYS: its hash. ARGV: its requests and tokens per
# minute (-1: no limit). Returns its requests and tokens levels ('': no bucket).
STATE = (
    _PRELUDE
    + """
local now = clock()
return levels({load(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)}, {})
"""
)
