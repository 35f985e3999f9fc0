"""Store and forward: the inline attempt after an order is stored, and the background deliverer.

``Outbox.forward`` stores an order, then tries Manager once (with the Manager client's own quick
retries) and decides: delivered, rejected, or queued (202). ``Outbox.run`` sends queued orders
later with backoff and jitter, and gives up after ``max_age_hours`` (failed, operator alerted).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import orjson

from gateway.config import OutboxConfig
from gateway.errors import (
    GatewayError,
    StateUnavailableError,
    UpstreamError,
    UpstreamRejectedError,
)
from gateway.manager import CallCount, ManagerClient, UpstreamReply, UpstreamTarget
from gateway.observability import Metrics, log_event
from gateway.outbox import (
    DueOrder,
    LedgerEntry,
    NewOrder,
    OrderStatus,
    OutboxStore,
    Remember,
    Settlement,
)
from gateway.outbox.polling import run_polling
from gateway.outbox.sealing import Sealer, SealError
from gateway.retry import order_retry_delay
from gateway.state import StoredReply

STATUS_PATH: Final = "/api/v1/external-order/{reference}"
BATCH: Final = 16  # orders delivered at once by one deliverer
PURGE_EVERY_S: Final = 3600.0
QUEUED_MESSAGE: Final = (
    "Manager cannot take the order now; the gateway has stored it and will deliver it. "
    "Ask its status at the Location given."
)

SettledHook = Callable[[LedgerEntry], Awaitable[None]]


def build_status_path(reference: str) -> str:
    """The status URL of an order (section 10): the reference as one percent-encoded segment."""
    return STATUS_PATH.format(reference=quote(reference, safe=""))


def build_queued_reply(reference: str, request_id: str | None) -> StoredReply:
    """The ``202 queued`` answer, stored as the order's idempotency reply (replayed as is)."""
    body = {
        "status": OrderStatus.QUEUED.value,
        "external_reference": reference,
        "message": QUEUED_MESSAGE,
        "request_id": request_id,
    }
    return StoredReply(202, orjson.dumps(body), "application/json")


def parse_manager_reply(body: bytes) -> tuple[str | None, str | None]:
    """Manager's ``id`` and ``status`` from its success reply, where they are strings."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    found = data.get("id"), data.get("status")
    return tuple(value if isinstance(value, str) else None for value in found)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Stored:
    """What ``Outbox.forward`` answers with: Manager's reply, or the stored 202."""

    reply: StoredReply
    queued: bool


class Outbox:
    """The outbox of one gateway process: its store, its key, its deliverer."""

    def __init__(
        self,
        store: OutboxStore,
        sealer: Sealer,
        config: OutboxConfig,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_purge = 0.0
        # Told of every order the deliverer settles for good (not the inline ones: the partner
        # has its answer), before the settle is written: partner callbacks hook in here.
        self.on_settled: SettledHook | None = None

    # --- the inline attempt ------------------------------------------------------------------

    async def forward(
        self,
        *,
        partner: str,
        reference: str,
        target: UpstreamTarget,
        body: bytes,
        send: Callable[[UpstreamTarget, bytes, CallCount], Awaitable[UpstreamReply]],
        key: str,
        fingerprint: str,
        ttl_s: float,
        lease_s: float,
        request_id: str | None,
    ) -> Stored:
        """Store the order durably, then try Manager once.

        Raises:
            StateUnavailableError: the order could not be stored; nothing was sent.
            UpstreamRejectedError: Manager refused the order (not retried, not kept).
        """
        config = self.config
        now = self._clock()
        queued = build_queued_reply(reference, request_id)
        # A queued order is replayed as queued for as long as it may still be delivered.
        queued_ttl = max(ttl_s, config.max_age_s)
        stored_order = NewOrder(
            partner=partner,
            reference=reference,
            org_id=target.org_id,
            sealed=self.sealer.seal(body),
            now=now,
            lease_until=now + lease_s,
            expires_at=now + config.max_age_s,
        )
        await self.store.put(stored_order, Remember(key, fingerprint, queued, queued_ttl))
        calls = CallCount()
        try:
            reply = await send(target, body, calls)
        except UpstreamRejectedError as exc:
            forget = Remember(key, fingerprint, None, 0)
            rejected = _rejected(self._clock(), exc, calls.value)
            await self._settle_quietly(partner, reference, rejected, forget)
            self._metrics.outbox_deliveries.labels(result="rejected").inc()
            raise
        except UpstreamError as exc:
            # Manager cannot take it now (or refuses the gateway's own credential: the
            # operator's to fix): the partner has it stored, the deliverer takes over.
            settlement = self._retry_later(stored_order, exc.code, self._clock(), calls.value)
            await self._settle_quietly(partner, reference, settlement)
            self._metrics.outbox_deliveries.labels(result="retried").inc()
            log_event(30, "order_queued", code=exc.code)
            return Stored(queued, queued=True)
        stored = StoredReply(reply.status, reply.body, reply.content_type)
        await self._settle_quietly(
            partner,
            reference,
            _delivered(self._clock(), reply, calls.value),
            Remember(key, fingerprint, stored, ttl_s),
        )
        self._metrics.outbox_deliveries.labels(result="delivered").inc()
        return Stored(stored, queued=False)

    async def _settle_quietly(
        self,
        partner: str,
        reference: str,
        settlement: Settlement,
        remember: Remember | None = None,
    ) -> LedgerEntry | None:
        try:
            return await self.store.settle(partner, reference, settlement, remember)
        except StateUnavailableError:
            # The order is stored and its lease will lapse: the deliverer sends it again (Manager
            # may then see it twice). The partner's answer stays the truth about this attempt.
            log_event(40, "outbox_settle_failed", result=settlement.status.value)
            return None

    def _retry_later(
        self, order: NewOrder | DueOrder, code: str, now: float, calls: int
    ) -> Settlement:
        """Queued again: about as long again as the order has waited, never past its end
        (it is given up on time, not one backoff later)."""
        config = self.config
        waited = now - (order.now if isinstance(order, NewOrder) else order.created_at)
        delay = order_retry_delay(waited, config.retry_min_s, config.retry_max_s, self._rand)
        next_at = min(now + delay, order.expires_at)
        return Settlement(
            OrderStatus.QUEUED, now, calls=calls, next_attempt_at=next_at, last_error=code
        )

    # --- the deliverer -----------------------------------------------------------------------

    async def run(
        self,
        targets: Callable[[], Mapping[str, UpstreamTarget]],
        manager: Callable[[], ManagerClient],
        *,
        poll_s: float,
    ) -> None:
        """Deliver due orders until :meth:`stop`; ``targets`` and ``manager`` are read afresh
        each round, so a reload applies to orders already queued."""
        await run_polling(
            lambda: self.run_once(targets(), manager()),
            wake=self._wake,
            stopping=lambda: self._stopping,
            poll_s=poll_s,
            error_event="outbox_deliverer_error",
        )

    def stop(self) -> None:
        """Finish the deliveries in flight, take no more."""
        self._stopping = True
        self._wake.set()

    async def run_once(self, targets: Mapping[str, UpstreamTarget], manager: ManagerClient) -> int:
        """Deliver the orders due now (at most one batch); how many were taken."""
        now = self._clock()
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            purged = await self.store.purge(now, self.config.ledger_s)
            if purged:
                log_event(20, "outbox_purged", result=purged)
        lease_s = manager.timeout_s + 30
        due = await self.store.take_due(now, lease_s, BATCH)
        await asyncio.gather(*(self._deliver(order, targets, manager) for order in due))
        return len(due)

    async def _deliver(
        self, order: DueOrder, targets: Mapping[str, UpstreamTarget], manager: ManagerClient
    ) -> None:
        now = self._clock()
        if now >= order.expires_at:
            await self._give_up(order, now)
            return
        target = targets.get(order.partner)
        try:
            if target is None:
                raise _Undeliverable("the order's partner is no longer configured")
            body = self.sealer.open(order.sealed)
        except (SealError, _Undeliverable) as exc:
            log_event(40, "outbox_order_undeliverable", partner=order.partner, reason=str(exc))
            await self._settle(order, self._retry_later(order, GatewayError.code, now, 0))
            return
        calls = CallCount()
        try:
            reply = await manager.send_order_request(target, body, calls)
        except UpstreamRejectedError as exc:
            rejected = _rejected(self._clock(), exc, calls.value)
            await self._settle(order, rejected, result="rejected")
        except UpstreamError as exc:
            settlement = self._retry_later(order, exc.code, self._clock(), calls.value)
            await self._settle(order, settlement, result="retried")
        except Exception:  # a bug must not stop the deliverer: the order waits for a fix
            log_event(40, "outbox_delivery_error", partner=order.partner, exc_info=True)
            await self._settle(order, self._retry_later(order, GatewayError.code, now, calls.value))
        else:
            delivered = _delivered(self._clock(), reply, calls.value)
            await self._settle(order, delivered, result="delivered")

    async def _give_up(self, order: DueOrder, now: float) -> None:
        entry = await self._settle(
            order, Settlement(OrderStatus.FAILED, now, calls=0), result="failed"
        )
        log_event(
            40, "outbox_order_failed", partner=order.partner,
            external_reference=order.reference, attempts=order.attempts,
            code=entry.last_error if entry else None, age_s=round(now - order.created_at),
        )  # fmt: skip

    async def _settle(
        self, order: DueOrder, settlement: Settlement, *, result: str | None = None
    ) -> LedgerEntry | None:
        if self.on_settled is not None and settlement.status in ANNOUNCED:
            # The partner's callback is stored first: a crash before the settle below leaves
            # the order queued, it is sent again, and the callback (same id) is stored once.
            await self.on_settled(_announced_entry(order, settlement))
        entry = await self.store.settle(order.partner, order.reference, settlement)
        if result is not None:
            self._metrics.outbox_deliveries.labels(result=result).inc()
        return entry

    # --- metrics -----------------------------------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Set the depth and age gauges from the store (before /metrics is rendered)."""
        stats = await self.store.stats()
        self._metrics.outbox_depth.labels(status="queued").set(stats.queued)
        self._metrics.outbox_depth.labels(status="failed").set(stats.failed)
        oldest = stats.oldest_queued_at
        self._metrics.outbox_oldest.set(0 if oldest is None else self._clock() - oldest)


class _Undeliverable(Exception):
    pass


# What the background deliverer tells a partner: orders it settled for good.
ANNOUNCED: Final = frozenset({OrderStatus.DELIVERED, OrderStatus.REJECTED, OrderStatus.FAILED})


def _announced_entry(order: DueOrder, settlement: Settlement) -> LedgerEntry:
    """The ledger entry as ``settlement`` leaves it, for the partner's callback.

    A due order was never delivered, so Manager's id and status are the settlement's own.
    """
    return LedgerEntry(
        partner=order.partner,
        reference=order.reference,
        org_id=order.org_id,
        status=settlement.status,
        attempts=order.attempts + settlement.calls,
        created_at=order.created_at,
        updated_at=settlement.now,
        order_request_id=settlement.order_request_id,
        manager_status=settlement.manager_status,
        last_error=settlement.last_error,
    )


def _delivered(now: float, reply: UpstreamReply, calls: int) -> Settlement:
    order_request_id, manager_status = parse_manager_reply(reply.body)
    return Settlement(
        OrderStatus.DELIVERED,
        now,
        calls=calls,
        order_request_id=order_request_id,
        manager_status=manager_status,
    )


def _rejected(now: float, exc: UpstreamRejectedError, calls: int) -> Settlement:
    return Settlement(OrderStatus.REJECTED, now, calls=calls, last_error=exc.code)
