"""The Redis outbox's part of section 11: Manager's webhooks recorded, partner callbacks queued.

Each change is one Lua script, as for orders (``redis_scripts.py``): the delivery id, the match,
the event and the callback are written together or not at all. A delivery id is a key that
expires after ``dedupe_hours``. Manager's ids lead to their orders through ``manager-id:<sha1>``
keys that the order scripts keep (set when Manager's id becomes known, deleted with the order); a
reference is matched through the members its org's partners would give it. Callbacks are hashes,
due in a sorted set scored by their next attempt; taking one re-scores it to the end of its lease,
so a sender that dies leaves it due again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from gateway.outbox import CallbackMessage, IncomingWebhook, WebhookResult
from gateway.outbox import redis_scripts as lua

CALLBACK_FIELDS: Final = (
    "id", "partner", "type", "reference", "status", "order_request_id", "manager_status",
    "event", "created_at", "expires_at", "attempts",
)  # fmt: skip
EXPIRY_SLACK_MS: Final = 60_000  # the key outlives its time a little: clocks of replicas differ
_FIELDS: Final = "{" + ", ".join(f"'{name}'" for name in CALLBACK_FIELDS) + "}"

# KEYS[1] the delivery id, KEYS[2] due callbacks, KEYS[3] the callback, KEYS[4..8] the status
# indexes. ARGV: now, dedupe ms, org, Manager's id or '', order key prefix, manager-id key prefix,
# event JSON, Manager's status ('' or '=' and it), the org's partners and the partners with
# callbacks (",a,b,"), callback id, callback expiry, event type, remembered until, then the members
# the reference would have for the org's partners.
RECORD_WEBHOOK: Final = (
    lua.LISTS
    + """
-- The delivery id is remembered until the time it holds (the key itself expires a little later).
local seen = redis.call('GET', KEYS[1])
if seen and tonumber(seen) > tonumber(ARGV[1]) then return 'duplicate' end
redis.call('SET', KEYS[1], ARGV[14], 'PX', ARGV[2])
local now, org, id, prefix = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local function among(list, partner) return string.find(list, ',' .. partner .. ',', 1, true) end
local member = nil
if id ~= '' then
  local found = redis.call('GET', ARGV[6] .. redis.sha1hex(org .. '\\n' .. id))
  if found then
    local order = redis.call('HMGET', prefix .. found, 'org_id', 'order_request_id', 'partner')
    if order[1] == org and order[2] == id and among(ARGV[9], order[3]) then member = found end
  end
end
if not member then
  local newest = nil
  for i = 15, #ARGV do
    local order = redis.call('HMGET', prefix .. ARGV[i], 'org_id', 'order_request_id',
      'updated_at')
    if order[1] == org and (not order[2] or id == '') then
      local updated = tonumber(order[3])
      if not newest or updated > newest then newest, member = updated, ARGV[i] end
    end
  end
end
if not member then return 'ignored' end
local key = prefix .. member
local events = redis.call('HGET', key, 'events')
if events == '[]' then events = '[' .. ARGV[7] .. ']'
else events = string.sub(events, 1, -2) .. ',' .. ARGV[7] .. ']' end
redis.call('HSET', key, 'events', events, 'updated_at', now)
if ARGV[8] ~= '' then redis.call('HSET', key, 'manager_status', string.sub(ARGV[8], 2)) end
if id ~= '' and redis.call('HEXISTS', key, 'order_request_id') == 0 then
  redis.call('HSET', key, 'order_request_id', id)
  redis.call('SET', ARGV[6] .. redis.sha1hex(org .. '\\n' .. id), member)
end
local order = redis.call('HMGET', key, 'status', 'partner', 'reference', 'order_request_id',
  'manager_status')
for i, status in ipairs(STATUSES) do
  if status == order[1] then redis.call('ZADD', KEYS[3 + i], now, member) end
end
if among(ARGV[10], order[2]) and redis.call('EXISTS', KEYS[3]) == 0 then
  local function opt(value) if value then return '=' .. value end return '' end
  redis.call('HSET', KEYS[3], 'id', ARGV[11], 'partner', order[2], 'type', 'order.updated',
    'reference', order[3], 'status', order[1], 'order_request_id', opt(order[4]),
    'manager_status', opt(order[5]), 'event', '=' .. ARGV[13], 'created_at', now,
    'expires_at', ARGV[12], 'attempts', 0)
  redis.call('ZADD', KEYS[2], now, ARGV[11])
end
return 'accepted'
"""
)

# KEYS[1] the callback, KEYS[2] due callbacks; ARGV the fields in CALLBACK_FIELDS' order, then
# when it is due. A message already queued is kept as it is.
PUT_CALLBACK: Final = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local FIELDS = {_FIELDS}
for i, name in ipairs(FIELDS) do redis.call('HSET', KEYS[1], name, ARGV[i]) end
redis.call('ZADD', KEYS[2], ARGV[#FIELDS + 1], ARGV[1])
return 1
"""

# KEYS[1] due callbacks; ARGV now, lease until, limit, callback key prefix.
TAKE_DUE_CALLBACKS: Final = f"""
local FIELDS = {_FIELDS}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local taken = {{}}
for _, id in ipairs(ids) do
  local message = redis.call('HMGET', ARGV[4] .. id, unpack(FIELDS))
  if message[1] then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    taken[#taken + 1] = message
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return taken
"""

# KEYS[1] the callback, KEYS[2] due callbacks; ARGV id, next attempt ('' forgets the message).
SETTLE_CALLBACK: Final = """
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return 1
"""


class _Store(Protocol):
    """What of :class:`gateway.outbox.redis.RedisOutbox` the webhook scripts use."""

    @property
    def client(self) -> Any: ...

    def key(self, *parts: str) -> str: ...

    async def call(self, script: Any, keys: list[str], args: list[Any]) -> Any: ...


class RedisWebhooks:
    """The scripts of section 11 over a Redis outbox's keys (its order prefix and indexes)."""

    def __init__(
        self,
        store: _Store,
        *,
        order_prefix: str,
        indexes: Sequence[str],
        member_of: Callable[[str, str], str],
        time: Callable[[float], str],
    ) -> None:
        self._store = store
        self._order_prefix = order_prefix
        self._indexes = list(indexes)
        self._member_of = member_of
        self._time = time
        self.manager_id_prefix = store.key("outbox", "manager-id", "")
        self._delivery_prefix = store.key("outbox", "delivery", "")
        self._callback_prefix = store.key("outbox", "callback", "")
        self._due = store.key("outbox", "callbacks-due")
        register = store.client.register_script
        self._record = register(RECORD_WEBHOOK)
        self._put = register(PUT_CALLBACK)
        self._take = register(TAKE_DUE_CALLBACKS)
        self._settle = register(SETTLE_CALLBACK)

    async def record_webhook(self, webhook: IncomingWebhook) -> WebhookResult:
        delivery = hashlib.sha256(webhook.delivery_id.encode()).hexdigest()
        event = webhook.event
        candidates = (
            [
                self._member_of(partner, webhook.reference)
                for partner in sorted(webhook.org_partners)
            ]
            if webhook.reference is not None
            else []
        )
        keys = [
            self._delivery_prefix + delivery, self._due,
            self._callback_prefix + webhook.callback_id, *self._indexes,
        ]  # fmt: skip
        args = [
            self._time(webhook.now),
            max(1, int((webhook.dedupe_until - webhook.now) * 1000) + EXPIRY_SLACK_MS),
            webhook.org_id, webhook.order_request_id or "", self._order_prefix,
            self.manager_id_prefix,
            json.dumps({"type": event.type, "status": event.status, "at": event.at}),
            _optional(webhook.manager_status), _listed(webhook.org_partners),
            _listed(webhook.callback_partners), webhook.callback_id,
            self._time(webhook.callback_expires_at), event.type, self._time(webhook.dedupe_until),
            *candidates,
        ]  # fmt: skip
        result = await self._store.call(self._record, keys, args)
        return WebhookResult(_text(result))

    async def put_callback(self, message: CallbackMessage) -> None:
        keys = [self._callback_prefix + message.id, self._due]
        args = [*_fields(message, self._time), self._time(message.created_at)]
        await self._store.call(self._put, keys, args)

    async def take_due_callbacks(
        self, now: float, lease_s: float, limit: int
    ) -> list[CallbackMessage]:
        args = [self._time(now), self._time(now + lease_s), limit, self._callback_prefix]
        rows = await self._store.call(self._take, [self._due], args)
        return [_to_message(row) for row in rows]

    async def settle_callback(
        self, message_id: str, now: float, next_attempt_at: float | None
    ) -> None:
        keys = [self._callback_prefix + message_id, self._due]
        due = "" if next_attempt_at is None else self._time(next_attempt_at)
        await self._store.call(self._settle, keys, [message_id, due])


def _listed(partners: frozenset[str]) -> str:
    # Partner names are letters, digits, '_', '-', '.' (config.py): a comma separates them.
    return "," + ",".join(sorted(partners)) + ","


def _optional(value: str | None) -> str:
    return "" if value is None else "=" + value


def _fields(message: CallbackMessage, time: Callable[[float], str]) -> list[str | int]:
    return [
        message.id, message.partner, message.type, message.reference, message.status,
        _optional(message.order_request_id), _optional(message.manager_status),
        _optional(message.event), time(message.created_at), time(message.expires_at),
        message.attempts,
    ]  # fmt: skip


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_optional(value: object) -> str | None:
    text = _text(value) if value is not None else ""
    return text[1:] if text else None


def _to_message(row: Sequence[object]) -> CallbackMessage:
    (message_id, partner, kind, reference, status, manager_id, manager_status, event, created,
     expires, attempts) = row  # fmt: skip
    return CallbackMessage(
        id=_text(message_id),
        partner=_text(partner),
        type=_text(kind),
        reference=_text(reference),
        status=_text(status),
        order_request_id=_from_optional(manager_id),
        manager_status=_from_optional(manager_status),
        event=_from_optional(event),
        created_at=float(_text(created)),
        expires_at=float(_text(expires)),
        attempts=int(_text(attempts)),
    )
