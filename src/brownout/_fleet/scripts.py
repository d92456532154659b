"""The shared breaker's transitions: one Lua script each, so every transition is atomic fleet-wide.

Keys (one set per breaker name): KEYS[1] a hash {state, open_until, successes,
epoch}, KEYS[2] the failures of the window (a sorted set scored by time),
KEYS[3] the HALF_OPEN trial lease. Time is Redis's own (`TIME`): processes on
several machines never compare their clocks. Every script answers
{state, milliseconds until open_until, epoch} and publishes a transition on
ARGV[1] (the channel) as "state:remaining_ms:epoch"; `epoch` grows with each
transition, so a process ignores news older than what it knows.
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function view()
  local h = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'epoch')
  local state = h[1] or 'closed'
  local remaining = math.max(0, (tonumber(h[2]) or 0) - now)
  return {state, remaining, tonumber(h[3]) or 0}
end
local function move(state, open_ms)
  local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
  local open_until = 0
  if state == 'open' then open_until = now + open_ms end
  redis.call('HSET', KEYS[1], 'state', state, 'open_until', open_until, 'successes', 0)
  if state ~= 'open' then redis.call('DEL', KEYS[2]) end
  local remaining = math.max(0, open_until - now)
  redis.call('PUBLISH', ARGV[1], state .. ':' .. remaining .. ':' .. epoch)
  return {state, remaining, epoch}
end
"""

# ARGV: channel, member, window ms, threshold, open ms. Answers a 4th element: 1 when this failure opened it.
FAILURE = (
    _PRELUDE
    + """
local v = view()
if v[1] ~= 'closed' then return {v[1], v[2], v[3], 0} end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  local opened = move('open', tonumber(ARGV[5]))
  return {opened[1], opened[2], opened[3], 1}
end
return {v[1], v[2], v[3], 0}
"""
)

# ARGV: channel, token, lease ms, probe_gated ('1' or '0'). Answers a 4th element: 1 when the lease is ours.
TRIAL = (
    _PRELUDE
    + """
local v = view()
if v[1] == 'closed' then return {v[1], v[2], v[3], 0} end
if v[1] == 'open' then
  if ARGV[4] == '1' or v[2] > 0 then return {v[1], v[2], v[3], 0} end
  v = move('half_open', 0)
end
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return {v[1], v[2], v[3], 1} end
return {v[1], v[2], v[3], 0}
"""
)

# ARGV: channel, token, verdict ('ok', 'fail' or 'release'), success threshold, open ms
TRIAL_RESULT = (
    _PRELUDE
    + """
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return view() end
redis.call('DEL', KEYS[3])
local v = view()
if v[1] ~= 'half_open' or ARGV[3] == 'release' then return v end
if ARGV[3] == 'fail' then return move('open', tonumber(ARGV[5])) end
if redis.call('HINCRBY', KEYS[1], 'successes', 1) >= tonumber(ARGV[4]) then return move('closed', 0) end
return v
"""
)

# ARGV: channel. A passing health check: OPEN -> HALF_OPEN (probe-gated recovery).
PROBE_PASSED = (
    _PRELUDE
    + """
local v = view()
if v[1] == 'open' then return move('half_open', 0) end
return v
"""
)

# ARGV: channel. The operator's reset: CLOSED with clean counts.
RESET = (
    _PRELUDE
    + """
local v = view()
redis.call('DEL', KEYS[3])
if v[1] ~= 'closed' then return move('closed', 0) end
redis.call('DEL', KEYS[2])
return v
"""
)

VIEW = _PRELUDE + "\nreturn view()\n"
