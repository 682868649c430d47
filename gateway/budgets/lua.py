"""The ledger's Lua scripts: reserve, settle, cancel and read, each atomic on one hash tag.

One ledger is two keys sharing a hash tag (Redis Cluster safe: a script never crosses slots):

    KEYS[1]  HASH  `<counter>#s` settled amount, `<counter>#h` amount held by live
                   reservations, `r:<record id>` a live reservation, or `=` once settled
                   (the tombstone that makes settle idempotent)
    KEYS[2]  ZSET  expiry in epoch ms of every `r:<record id>` and `w:<counter>` member

Each script first prunes what is due in KEYS[2]: an expired reservation gives back what
it held (a dead gateway's hold stops counting with no sweeper), an expired tombstone or
window counter is deleted. A counter's expiry is the end of its window, pushed out to the
expiry of any reservation that holds on it, so a record never outlives its counters; and a
counter's fields exist exactly as long as its `w:` member. Both keys also get a TTL past
their last member, so a ledger nobody touches again still goes away.

Reservation record: one line per counter, `<kind><amount> <counter>`; kind u (nano-USD),
t (tokens) or r (a request, counted at once and never held). Amounts travel as decimal
strings and are written back with `%.0f`; Lua computes in doubles, exact below 2^53
(9e6 USD in nano-USD). Needs Redis 5+ (scripts replicated by effects); no Redis-side
clock is used: `now` comes from the gateway.
"""

from __future__ import annotations

__all__ = ["CANCEL", "PRUNE_BATCH", "READ", "RESERVE", "SETTLE"]

PRUNE_BATCH = 1000  # expired members handled per call; any left wait for the next call

_PRELUDE = (
    """
local led, exp = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])

local function num(value)
  if value == 0 then return '0' end
  return string.format('%.0f', value)
end

local function bump(member, score)
  local current = redis.call('ZSCORE', exp, member)
  if (not current) or tonumber(current) < score then
    redis.call('ZADD', exp, num(score), member)
  end
end

local function each_line(raw, fn)
  for line in string.gmatch(raw, '[^\\n]+') do
    local space = string.find(line, ' ', 1, true)
    fn(string.sub(line, 1, 1), string.sub(line, 2, space - 1), string.sub(line, space + 1))
  end
end

local function give_back(raw, uncount_requests)
  each_line(raw, function(kind, amount, counter)
    if kind == 'r' then
      if uncount_requests then redis.call('HINCRBY', led, counter .. '#s', -1) end
    elseif amount ~= '0' then
      redis.call('HINCRBY', led, counter .. '#h', '-' .. amount)
    end
  end)
end

-- Keep both keys alive until a minute past `last` (never shorten; refresh with slack).
local function keep_until(last)
  local want = last - now + 60000
  if redis.call('PTTL', led) < want - 30000 then
    redis.call('PEXPIRE', led, num(want))
    redis.call('PEXPIRE', exp, num(want))
  end
end

-- Add `deltas[i]` to field `names[i]`, and set the `extra` pairs: one HMGET, one HSET.
local function add_all(names, deltas, extra)
  local values = {}
  if #names > 0 then values = redis.call('HMGET', led, unpack(names)) end
  local pairs_ = extra
  for i = 1, #names do
    pairs_[#pairs_ + 1] = names[i]
    pairs_[#pairs_ + 1] = num(tonumber(values[i] or '0') + deltas[i])
  end
  redis.call('HSET', led, unpack(pairs_))
end

local due = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, """
    + str(PRUNE_BATCH)
    + """)
if #due > 0 then
  local fields = {}
  for _, member in ipairs(due) do
    if string.sub(member, 1, 1) == 'w' then
      local counter = string.sub(member, 3)
      fields[#fields + 1] = counter .. '#s'
      fields[#fields + 1] = counter .. '#h'
    else
      local raw = redis.call('HGET', led, member)
      if raw and raw ~= '=' then give_back(raw, false) end
      fields[#fields + 1] = member
    end
  end
  redis.call('HDEL', led, unpack(fields))
  redis.call('ZREM', exp, unpack(due))
end
"""
)

# ARGV: now_ms, record_id, expiry_ms, usd, tokens, then per counter: name, kind, limit,
# window_end_ms. Returns {status, used_1, ..., used_n}: status 1 reserved, 0 refused
# (nothing changed), 2 this record id exists already, live or settled (nothing changed);
# used_i is the counter's settled + held amount after the call.
RESERVE = (
    _PRELUDE
    + """
local rid = 'r:' .. ARGV[2]
local expiry = tonumber(ARGV[3])
local amounts = {u = tonumber(ARGV[4]), t = tonumber(ARGV[5]), r = 1}
local n = (#ARGV - 5) / 4
local fields = {}
for i = 1, n do
  local counter = ARGV[2 + 4 * i]
  fields[2 * i - 1] = counter .. '#s'
  fields[2 * i] = counter .. '#h'
end
fields[2 * n + 1] = rid
local values = redis.call('HMGET', led, unpack(fields))
local used, fits = {}, true
for i = 1, n do
  local b = 2 + 4 * i
  used[i] = tonumber(values[2 * i - 1] or '0') + tonumber(values[2 * i] or '0')
  if used[i] + amounts[ARGV[b + 1]] > tonumber(ARGV[b + 2]) then fits = false end
end
if values[2 * n + 1] then return {2, unpack(used)} end
if not fits then return {0, unpack(used)} end
local lines, writes, last = {}, {}, expiry
for i = 1, n do
  local b = 2 + 4 * i
  local counter, kind, ends = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 3])
  local amount = amounts[kind]
  local settled = tonumber(values[2 * i - 1] or '0')
  local held = tonumber(values[2 * i] or '0')
  if kind == 'r' then settled = settled + 1 else held = held + amount end
  writes[#writes + 1] = counter .. '#s'
  writes[#writes + 1] = num(settled)
  writes[#writes + 1] = counter .. '#h'
  writes[#writes + 1] = num(held)
  used[i] = used[i] + amount
  lines[i] = kind .. num(amount) .. ' ' .. counter
  -- A counter that exists already has a `w:` member no earlier than its window's end.
  local exists = values[2 * i - 1] or values[2 * i]
  if ends < expiry then ends = expiry end
  if (not exists) or ends == expiry then bump('w:' .. counter, ends) end
  if ends > last then last = ends end
end
writes[#writes + 1] = rid
writes[#writes + 1] = table.concat(lines, '\\n')
redis.call('HSET', led, unpack(writes))
redis.call('ZADD', exp, ARGV[3], rid)
keep_until(last)
return {1, unpack(used)}
"""
)

# ARGV: now_ms, record_id, tombstone_expiry_ms, usd, tokens, count_request (0|1), then per
# counter: name, kind, window_end_ms (used only when no record is left). Returns 1 settled
# a live reservation, 2 recorded the spend without one (expired, lost or never made), 0
# settled before (nothing changed).
SETTLE = (
    _PRELUDE
    + """
local rid = 'r:' .. ARGV[2]
local raw = redis.call('HGET', led, rid)
if raw == '=' then return 0 end
local real = {u = tonumber(ARGV[4]), t = tonumber(ARGV[5]), r = tonumber(ARGV[6])}
local names, deltas = {}, {}
local last = tonumber(ARGV[3])
local status = 2
if raw then
  each_line(raw, function(kind, amount, counter)
    if kind ~= 'r' then
      names[#names + 1] = counter .. '#h'
      deltas[#deltas + 1] = -tonumber(amount)
      names[#names + 1] = counter .. '#s'
      deltas[#deltas + 1] = real[kind]
    end
  end)
  status = 1
else
  local n = (#ARGV - 6) / 3
  for i = 1, n do
    local b = 4 + 3 * i
    local counter, kind = ARGV[b], ARGV[b + 1]
    if real[kind] ~= 0 then
      names[#names + 1] = counter .. '#s'
      deltas[#deltas + 1] = real[kind]
      local ends = tonumber(ARGV[b + 2])
      bump('w:' .. counter, ends)
      if ends > last then last = ends end
    end
  end
end
add_all(names, deltas, {rid, '='})
redis.call('ZADD', exp, ARGV[3], rid)
keep_until(last)
return status
"""
)

# ARGV: now_ms, record_id. Undoes a live reservation entirely, its request count included
# (a later ledger refused, so the request never ran). Returns 1 undone, 0 nothing live.
CANCEL = (
    _PRELUDE
    + """
local rid = 'r:' .. ARGV[2]
local raw = redis.call('HGET', led, rid)
if (not raw) or raw == '=' then return 0 end
give_back(raw, true)
redis.call('HDEL', led, rid)
redis.call('ZREM', exp, rid)
return 1
"""
)

# ARGV: now_ms, then counter names. Returns {settled_1, held_1, settled_2, held_2, ...}.
READ = (
    _PRELUDE
    + """
local fields = {}
for i = 2, #ARGV do
  fields[2 * i - 3] = ARGV[i] .. '#s'
  fields[2 * i - 2] = ARGV[i] .. '#h'
end
return redis.call('HMGET', led, unpack(fields))
"""
)
