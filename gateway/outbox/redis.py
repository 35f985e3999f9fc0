"""The shared outbox: orders in Redis, for several gateway processes and replicas.

Every change is one Lua script (atomic across processes). An order is a hash; due orders wait in a
sorted set scored by their next attempt time, and ``take_due`` re-scores what it takes to the end
of its lease in the same script, so one deliverer sends each order and a lapsed lease (a killed
process) makes it due again. Per-status sorted sets (scored by last update) answer counts, lists
and purges without a scan. Needs one Redis (not a cluster): scripts reach keys they find in sets.

``open`` checks the configured keys against canaries sealed by the replicas before (one per first
key): a replica with a wrong key refuses orders rather than seal what the others cannot open.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from pydantic import SecretStr
from redis.exceptions import RedisError

from gateway.errors import StateUnavailableError
from gateway.observability import log_event
from gateway.outbox import (
    CallbackMessage,
    DueOrder,
    IncomingWebhook,
    LedgerEntry,
    LedgerEvent,
    NewOrder,
    OrderStatus,
    OutboxStats,
    Remember,
    Settlement,
    WebhookResult,
)
from gateway.outbox import redis_scripts as lua
from gateway.outbox.redis_webhooks import RedisWebhooks
from gateway.outbox.sealing import Sealer, SealError
from gateway.state.redis import NAMESPACE, RedisStore

PURGE_BATCH: Final = 500  # orders forgotten per script call: Redis serves others in between
CANARY: Final = b"telemed-gateway outbox"
T = TypeVar("T")


class RedisOutbox(RedisStore):
    """:class:`gateway.outbox.OutboxStore` in Redis, and the gateway's state store with it.

    Idempotency records and rate-limit buckets are :class:`RedisStore`'s; ``put`` and ``settle``
    write the record in the same script as the order. Durable as far as Redis is (AOF).
    """

    def __init__(
        self,
        url: str,
        *,
        keys: Sequence[SecretStr] = (),
        owner: bool = True,
        namespace: str = NAMESPACE,
    ) -> None:
        """``keys``: the outbox keys, checked by :meth:`open`. ``owner``: a serving process,
        which leaves a canary of its first key (the CLI does not)."""
        super().__init__(url, namespace=namespace)
        self._keys = tuple(keys)
        self._owner = owner
        self._canaries = self.key("outbox", "canaries")
        self.problem: str | None = None
        self._prefix = self.key("outbox", "order", "")
        self._due = self.key("outbox", "due")
        self._queued_since = self.key("outbox", "queued-since")
        self._indexes = {
            status: self.key("outbox", "status", status.value) for status in lua.STATUSES
        }
        register = self.client.register_script
        self._put, self._settle = register(lua.PUT), register(lua.SETTLE)
        self._requeue, self._drop = register(lua.REQUEUE), register(lua.DROP)
        self._take_due, self._list = register(lua.TAKE_DUE), register(lua.LIST)
        self._purge = register(lua.PURGE)
        self._webhooks = RedisWebhooks(
            self, order_prefix=self._prefix, indexes=list(self._indexes.values()),
            member_of=build_member, time=_time,
        )  # fmt: skip

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Check that the configured keys open a canary left by the replicas before.

        None of them opens one: the store stays unavailable (every call answers
        :class:`StateUnavailableError`, ``ping`` is False). Redis down now: no check.
        """
        if not self._keys:
            return
        try:
            found = await self.client.smembers(self._canaries)
            canaries = [c if isinstance(c, bytes) else c.encode() for c in found]
            if canaries and not any(_opens(Sealer(self._keys), c) for c in canaries):
                self.problem = "the outbox in Redis was sealed with other keys: put them back"
                log_event(50, "outbox_unavailable", reason=self.problem)
                return
            first = Sealer(self._keys[:1])
            if self._owner and not any(_opens(first, canary) for canary in canaries):
                await self.client.sadd(self._canaries, first.seal(CANARY))
        except (RedisError, OSError):
            log_event(30, "outbox_key_check_skipped", reason="Redis does not answer")

    async def ping(self) -> bool:
        return self.problem is None and await super().ping()

    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        if self.problem is not None:
            raise StateUnavailableError("The order store is unavailable; nothing was forwarded.")
        return await super()._guard(call)

    # --- the outbox --------------------------------------------------------------------------

    def _keys_of(self, partner: str, reference: str, remember: Remember | None = None) -> list[str]:
        keys = [
            self._prefix + build_member(partner, reference),
            self._due,
            self._queued_since,
            *self._indexes.values(),
        ]
        if remember is not None:
            keys.append(self.key(remember.key))
        return keys

    async def put(self, order: NewOrder, remember: Remember) -> None:
        args = [
            build_member(order.partner, order.reference), order.partner, order.reference,
            order.org_id, order.sealed, _time(order.now), _time(order.lease_until),
            _time(order.expires_at), *_remember_args(remember),
        ]  # fmt: skip
        await self.call(self._put, self._keys_of(order.partner, order.reference, remember), args)

    async def take_due(self, now: float, lease_s: float, limit: int) -> list[DueOrder]:
        args = [_time(now), _time(now + lease_s), limit, self._prefix]
        rows = await self.call(self._take_due, [self._due], args)
        return [_to_due(row) for row in rows]

    async def settle(
        self,
        partner: str,
        reference: str,
        settlement: Settlement,
        remember: Remember | None = None,
    ) -> LedgerEntry | None:
        event = settlement.event
        args = [
            build_member(partner, reference), settlement.status.value, _time(settlement.now),
            settlement.calls, _time(settlement.next_attempt_at or settlement.now),
            _optional(settlement.last_error), _optional(settlement.order_request_id),
            _optional(settlement.manager_status),
            _optional(None if event is None else _dump_event(event)),
            *_remember_args(remember), self._webhooks.manager_id_prefix,
        ]  # fmt: skip
        row = await self.call(self._settle, self._keys_of(partner, reference, remember), args)
        return None if row is None else _to_entry(row)

    async def get(self, partner: str, reference: str) -> LedgerEntry | None:
        key = self._prefix + build_member(partner, reference)
        row = await self._guard(lambda: self.client.hmget(key, lua.FIELDS))
        return None if row[0] is None else _to_entry(row)

    async def list_entries(
        self, status: OrderStatus | None = None, limit: int = 100
    ) -> list[LedgerEntry]:
        indexes = list(self._indexes.values()) if status is None else [self._indexes[status]]
        rows = await self.call(self._list, indexes, [limit, self._prefix])
        return [_to_entry(row) for row in rows]

    async def requeue(self, partner: str, reference: str, now: float, expires_at: float) -> bool:
        args = [build_member(partner, reference), _time(now), _time(expires_at)]
        return bool(await self.call(self._requeue, self._keys_of(partner, reference), args))

    async def drop(self, partner: str, reference: str, now: float) -> bool:
        args = [build_member(partner, reference), _time(now)]
        return bool(await self.call(self._drop, self._keys_of(partner, reference), args))

    async def stats(self) -> OutboxStats:
        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            for index in self._indexes.values():
                pipe.zcard(index)
            pipe.zrange(self._queued_since, 0, 0, withscores=True)
            return list(await pipe.execute())

        *counts, oldest = await self._guard(read)
        by_status = {
            status.value: int(count)
            for status, count in zip(lua.STATUSES, counts, strict=True)
            if count
        }
        return OutboxStats(
            queued=by_status.get(OrderStatus.QUEUED.value, 0),
            failed=by_status.get(OrderStatus.FAILED.value, 0),
            oldest_queued_at=float(oldest[0][1]) if oldest else None,
            by_status=by_status,
        )

    async def purge(self, now: float, ledger_s: float) -> int:
        indexes = [
            index for status, index in self._indexes.items() if status is not OrderStatus.QUEUED
        ]
        args = [_time(now - ledger_s), PURGE_BATCH, self._prefix, self._webhooks.manager_id_prefix]
        total = 0
        while True:
            purged = int(await self.call(self._purge, indexes, args))
            total += purged
            if purged < PURGE_BATCH:
                return total

    # --- Manager's webhooks and partner callbacks (redis_webhooks.py) -------------------------

    async def record_webhook(self, webhook: IncomingWebhook) -> WebhookResult:
        return await self._webhooks.record_webhook(webhook)

    async def put_callback(self, message: CallbackMessage) -> None:
        await self._webhooks.put_callback(message)

    async def take_due_callbacks(
        self, now: float, lease_s: float, limit: int
    ) -> list[CallbackMessage]:
        return await self._webhooks.take_due_callbacks(now, lease_s, limit)

    async def settle_callback(
        self, message_id: str, now: float, next_attempt_at: float | None
    ) -> None:
        await self._webhooks.settle_callback(message_id, now, next_attempt_at)


def _opens(sealer: Sealer, canary: bytes) -> bool:
    try:
        return sealer.open(canary) == CANARY
    except SealError:
        return False


def build_member(partner: str, reference: str) -> str:
    """An order's name in Redis: the partner and a hash of the reference (it may carry customer
    data; the same hash as ``idempotency.build_key``)."""
    digest = hashlib.sha256(f"{partner}\x00{reference}".encode()).hexdigest()
    return f"{partner}:{digest}"


def _dump_event(event: LedgerEvent) -> str:
    return json.dumps({"type": event.type, "status": event.status, "at": event.at})


def _time(value: float) -> str:
    # repr keeps every digit of a float; Lua's tostring would round it to 14.
    return repr(float(value))


def _optional(value: str | None) -> str:
    return "" if value is None else "=" + value


def _remember_args(remember: Remember | None) -> list[str | bytes | int]:
    if remember is None:
        return ["", "", "", "", "", 0]
    reply = remember.reply
    if reply is None:
        return ["forget", remember.fingerprint, "", "", "", 0]
    ttl_ms = max(1, int(remember.ttl_s * 1000))
    return ["keep", remember.fingerprint, reply.status, reply.content_type, reply.body, ttl_ms]


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _to_entry(row: Sequence[object]) -> LedgerEntry:
    partner, reference, org_id, status, attempts, created, updated = map(_text, row[:7])
    manager_id, manager_status, last_error, events = map(_text, row[7:])
    assert partner is not None and reference is not None and org_id is not None
    assert status is not None and events is not None
    return LedgerEntry(
        partner=partner,
        reference=reference,
        org_id=org_id,
        status=OrderStatus(status),
        attempts=int(attempts or 0),
        created_at=float(created or 0),
        updated_at=float(updated or 0),
        order_request_id=manager_id,
        manager_status=manager_status,
        last_error=last_error,
        events=tuple(LedgerEvent(e["type"], e.get("status"), e["at"]) for e in json.loads(events)),
    )


def _to_due(row: Sequence[bytes | None]) -> DueOrder:
    partner, reference, org_id, body, attempts, created, expires = row
    assert partner is not None and reference is not None and org_id is not None
    assert body is not None
    return DueOrder(
        partner=partner.decode(),
        reference=reference.decode(),
        org_id=org_id.decode(),
        sealed=bytes(body),
        attempts=int(attempts or 0),
        created_at=float(created or 0),
        expires_at=float(expires or 0),
    )
