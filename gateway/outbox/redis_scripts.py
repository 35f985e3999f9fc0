"""The Lua scripts of the Redis outbox (``redis.py``): every change to an order is one of them.

Redis runs a script alone, so each decision (taken or not, which status follows which) holds
across processes. Times arrive as Python's ``repr`` of a float and stay strings in Lua (whose
``tostring`` would round them to 14 digits); sorted-set scores parse them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from gateway.outbox import OrderStatus

FIELDS: Final = (
    "partner", "reference", "org_id", "status", "attempts", "created_at", "updated_at",
    "order_request_id", "manager_status", "last_error", "events",
)  # fmt: skip
DUE_FIELDS: Final = (
    "partner", "reference", "org_id", "body", "attempts", "created_at", "expires_at",
)  # fmt: skip
STATUSES: Final = tuple(OrderStatus)


def _lua_list(names: Sequence[str]) -> str:
    return "{" + ", ".join(f"'{name}'" for name in names) + "}"


# Field lists for HMGET, shared by the scripts.
LISTS: Final = (
    f"local LEDGER = {_lua_list(FIELDS)}\n"
    f"local DUE = {_lua_list(DUE_FIELDS)}\n"
    f"local STATUSES = {_lua_list([status.value for status in STATUSES])}\n"
)
# The keys of every write script: KEYS[1] the order, KEYS[2] due orders (score: next attempt),
# KEYS[3] queued orders (score: creation), KEYS[4..8] one index per status (score: last update),
# KEYS[9] the idempotency record, where ARGV asks for one. ARGV[1] is always the order's member.
PRELUDE: Final = (
    LISTS
    + """
local INDEX = {}
for i, status in ipairs(STATUSES) do INDEX[status] = KEYS[3 + i] end
local function ledger() return redis.call('HMGET', KEYS[1], unpack(LEDGER)) end
local function move(from, to, at)
  if from then redis.call('ZREM', INDEX[from], ARGV[1]) end
  redis.call('ZADD', INDEX[to], at, ARGV[1])
end
-- ARGV[at..at+5]: mode ('' none, 'forget', 'keep'), fingerprint, status, type, body, ttl ms.
-- 'keep' writes the completed record that RedisStore's claim replays.
local function remember(at)
  local mode = ARGV[at]
  if mode == '' then return end
  redis.call('DEL', KEYS[9])
  if mode == 'keep' then
    redis.call('HSET', KEYS[9], 'fp', ARGV[at + 1], 'state', 'done', 'status', ARGV[at + 2],
      'type', ARGV[at + 3], 'body', ARGV[at + 4])
    redis.call('PEXPIRE', KEYS[9], ARGV[at + 5])
  end
end
"""
)

# ARGV member, partner, reference, org_id, sealed, now, lease until, expires at, remember (6).
# A previous entry with the same reference (settled) is replaced by the new order.
PUT: Final = (
    PRELUDE
    + """
local old = redis.call('HGET', KEYS[1], 'status')
if old then redis.call('ZREM', INDEX[old], ARGV[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'partner', ARGV[2], 'reference', ARGV[3], 'org_id', ARGV[4],
  'status', 'queued', 'body', ARGV[5], 'attempts', 0, 'created_at', ARGV[6],
  'updated_at', ARGV[6], 'expires_at', ARGV[8], 'events', '[]')
move(nil, 'queued', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
remember(9)
return 1
"""
)

# ARGV member, status, now, calls made, next attempt, then optional values ('' for none,
# else '=' and the value): last error, Manager's id, Manager's status, event (JSON); remember (6);
# the prefix of the keys that lead from Manager's ids to orders.
SETTLE: Final = (
    PRELUDE
    + """
local function opt(value) if value == '' then return nil end return string.sub(value, 2) end
remember(10)
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
local new, now = ARGV[2], ARGV[3]
-- A queued order takes any result; a settled one only Manager's final word on it.
if current ~= 'queued' and new ~= 'delivered' and new ~= 'rejected' then return ledger() end
move(current, new, now)
redis.call('HSET', KEYS[1], 'status', new, 'updated_at', now)
redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[4])
if new == 'queued' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if new == 'delivered' or new == 'rejected' or new == 'dropped' then
  redis.call('HDEL', KEYS[1], 'body')
end
-- No error given: a failed order still says why; a delivered one has none.
local last_error = opt(ARGV[6])
if last_error then
  redis.call('HSET', KEYS[1], 'last_error', last_error)
elseif new == 'delivered' then
  redis.call('HDEL', KEYS[1], 'last_error')
end
local order_request_id, manager_status = opt(ARGV[7]), opt(ARGV[8])
if order_request_id then
  redis.call('HSET', KEYS[1], 'order_request_id', order_request_id)
  -- Manager's webhooks find the order by its id (redis_webhooks.py); ARGV[16]: the key prefix.
  local org = redis.call('HGET', KEYS[1], 'org_id')
  redis.call('SET', ARGV[16] .. redis.sha1hex(org .. '\\n' .. order_request_id), ARGV[1])
end
if manager_status then redis.call('HSET', KEYS[1], 'manager_status', manager_status) end
local event = opt(ARGV[9])
if event then
  local events = redis.call('HGET', KEYS[1], 'events')
  if events == '[]' then events = '[' .. event .. ']'
  else events = string.sub(events, 1, -2) .. ',' .. event .. ']' end
  redis.call('HSET', KEYS[1], 'events', events)
end
return ledger()
"""
)

# ARGV member, now, expires at. Only a failed order goes back to the queue, due now.
REQUEUE: Final = (
    PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'failed' then return 0 end
move('failed', 'queued', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[2], 'expires_at', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return 1
"""
)

# ARGV member, now. A queued or failed order loses its body for good.
DROP: Final = (
    PRELUDE
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if current ~= 'queued' and current ~= 'failed' then return 0 end
move(current, 'dropped', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'dropped', 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'body')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
)

# KEYS[1] due orders; ARGV now, lease until, limit, order key prefix. Each order taken is
# re-scored to the end of its lease here, so no other deliverer takes it meanwhile.
TAKE_DUE: Final = (
    LISTS
    + """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local taken = {}
for _, member in ipairs(members) do
  local order = redis.call('HMGET', ARGV[4] .. member, unpack(DUE))
  if order[4] then
    redis.call('ZADD', KEYS[1], ARGV[2], member)
    taken[#taken + 1] = order
  else  -- not a queued order (cannot happen: every change moves both); never due again
    redis.call('ZREM', KEYS[1], member)
  end
end
return taken
"""
)

# KEYS the status indexes to read; ARGV limit, order key prefix. Most recently updated first.
LIST: Final = (
    LISTS
    + """
local found = {}
for _, index in ipairs(KEYS) do
  local page = redis.call('ZREVRANGE', index, 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
  for i = 1, #page, 2 do found[#found + 1] = {page[i], tonumber(page[i + 1])} end
end
table.sort(found, function(a, b) return a[2] > b[2] end)
local entries = {}
for i = 1, math.min(#found, tonumber(ARGV[1])) do
  entries[i] = redis.call('HMGET', ARGV[2] .. found[i][1], unpack(LEDGER))
end
return entries
"""
)

# KEYS the indexes of orders no longer queued; ARGV cutoff, limit, order key prefix, the prefix
# of the keys that lead from Manager's ids to orders (deleted with their orders).
PURGE: Final = """
local left = tonumber(ARGV[2])
for _, index in ipairs(KEYS) do
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. ARGV[1], 'LIMIT', 0, left)
  for _, member in ipairs(old) do
    local order = redis.call('HMGET', ARGV[3] .. member, 'org_id', 'order_request_id')
    if order[2] then redis.call('DEL', ARGV[4] .. redis.sha1hex(order[1] .. '\\n' .. order[2])) end
    redis.call('DEL', ARGV[3] .. member)
    redis.call('ZREM', index, member)
  end
  left = left - #old
  if left == 0 then break end
end
return tonumber(ARGV[2]) - left
"""
