"""Store and forward (contract sections 9 and 10): the outbox and its ledger, behind one interface.

An order is written here, its body sealed (encrypted), before Manager is called; a background
deliverer (``deliverer.py``) sends what Manager could not take at once. The ledger is the part
a partner and an operator may read: statuses, attempts, error codes, Manager's id; never customer
data. ``sqlite.py`` is the embedded store for one process, ``redis.py`` the one for several.

A store is also the :class:`gateway.state.StateStore` of the gateway when the outbox is on, so
that idempotency records survive a restart and are written in the same transaction as the order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from gateway.state import StateStore, StoredReply


class OrderStatus(enum.StrEnum):
    """The gateway's delivery state of an order (``status`` in section 10)."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    REJECTED = "rejected"
    FAILED = "failed"
    DROPPED = "dropped"


SETTLED = frozenset({OrderStatus.DELIVERED, OrderStatus.REJECTED, OrderStatus.DROPPED})


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """Something that happened to an order: ``type``, the status it brought, when (Unix time)."""

    type: str
    status: str | None
    at: float


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What the partner (section 10) and the operator may see of an order. No customer data."""

    partner: str
    reference: str
    org_id: str
    status: OrderStatus
    attempts: int
    created_at: float
    updated_at: float
    order_request_id: str | None = None
    manager_status: str | None = None
    last_error: str | None = None
    events: tuple[LedgerEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class NewOrder:
    """An order to store before Manager is called; ``sealed`` is the encrypted envelope."""

    partner: str
    reference: str
    org_id: str
    sealed: bytes
    now: float
    lease_until: float  # the inline attempt owns the order until then; the deliverer waits
    expires_at: float  # given up (failed) when not delivered by then


@dataclass(frozen=True, slots=True)
class DueOrder:
    """An order taken by a deliverer under a lease (no other deliverer gets it meanwhile)."""

    partner: str
    reference: str
    org_id: str
    sealed: bytes
    attempts: int
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Settlement:
    """The result of one delivery attempt (or of an operator's action) for the ledger.

    ``status`` QUEUED means "try again at ``next_attempt_at``" (None: now). The sealed body is
    deleted for DELIVERED, REJECTED and DROPPED, kept for QUEUED and FAILED. A ``last_error`` of
    None keeps the entry's last error (a failed order still says why), except that DELIVERED
    clears it. ``order_request_id`` and ``manager_status`` of None keep the entry's.
    """

    status: OrderStatus
    now: float
    calls: int = 1  # requests to Manager's order-requests this result took (0: none)
    next_attempt_at: float | None = None
    last_error: str | None = None
    order_request_id: str | None = None
    manager_status: str | None = None
    event: LedgerEvent | None = None


@dataclass(frozen=True, slots=True)
class Remember:
    """The idempotency record written in the same transaction as an outbox change.

    ``reply`` None forgets the record: the order failed and the partner may send it again.
    """

    key: str
    fingerprint: str
    reply: StoredReply | None
    ttl_s: float


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counts for metrics and the console: orders waiting, orders given up, the oldest waiting."""

    queued: int
    failed: int
    oldest_queued_at: float | None = None
    by_status: dict[str, int] = field(default_factory=dict)


class WebhookResult(enum.StrEnum):
    """What became of a Manager webhook (the ``status`` of the answer, section 11)."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class CallbackMessage:
    """A partner callback waiting to be sent (Standard Webhooks), as stored: no customer data.

    ``id`` is the ``webhook-id``, the same on every attempt; ``created_at`` the body's
    ``timestamp``. The body is built from these fields, so every attempt sends the same bytes.
    """

    id: str
    partner: str
    type: str  # order.delivered | order.rejected | order.failed | order.updated
    reference: str
    status: str  # the order's delivery state
    order_request_id: str | None
    manager_status: str | None
    event: str | None  # Manager's event_type, for order.updated
    created_at: float
    expires_at: float  # given up when not delivered by then
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class IncomingWebhook:
    """A verified Manager event, to record in one committed write (section 11).

    Matched among the orders of ``org_partners`` (the partners of the org's shops) in
    ``org_id``: by ``order_request_id``; else by ``reference`` among orders that have no other
    Manager id (the most recently updated one when several partners used the same reference).
    A callback is queued (its order fields taken from the updated entry) when the matched
    order's partner is in ``callback_partners``.
    """

    delivery_id: str
    org_id: str
    org_partners: frozenset[str]
    order_request_id: str | None
    reference: str | None
    event: LedgerEvent
    manager_status: str | None
    now: float
    dedupe_until: float
    callback_partners: frozenset[str]
    callback_id: str
    callback_expires_at: float


class OutboxStore(StateStore, Protocol):
    """The outbox and its ledger. Every write is committed (durable) before the call returns.

    Raises:
        StateUnavailableError: the store cannot be read or written (disk full, corrupted file,
            Redis down, wrong key checked at open); nothing was changed.
    """

    async def put(self, order: NewOrder, remember: Remember) -> None:
        """Store ``order`` as queued (leased until ``order.lease_until``) with its idempotency
        record. A settled entry with the same reference is replaced (a new order)."""
        ...

    async def take_due(self, now: float, lease_s: float, limit: int) -> list[DueOrder]:
        """Queued orders whose time has come, each leased to the caller until ``now + lease_s``.

        An order whose lease lapses (its deliverer died) is due again.
        """
        ...

    async def settle(
        self,
        partner: str,
        reference: str,
        settlement: Settlement,
        remember: Remember | None = None,
    ) -> LedgerEntry | None:
        """Record an attempt's result; None if the order is unknown (dropped meanwhile)."""
        ...

    async def get(self, partner: str, reference: str) -> LedgerEntry | None:
        """The ledger entry of one order (None: never sent by this partner, or purged)."""
        ...

    async def list_entries(
        self, status: OrderStatus | None = None, limit: int = 100
    ) -> list[LedgerEntry]:
        """Ledger entries, most recently updated first."""
        ...

    async def requeue(self, partner: str, reference: str, now: float, expires_at: float) -> bool:
        """A ``failed`` order goes back to ``queued``, due now; False if it is not failed."""
        ...

    async def drop(self, partner: str, reference: str, now: float) -> bool:
        """Delete a queued or failed order's body; its status becomes ``dropped``."""
        ...

    async def stats(self) -> OutboxStats:
        """Counts by status and the oldest queued order's creation time."""
        ...

    async def purge(self, now: float, ledger_s: float) -> int:
        """Forget settled and failed orders last updated more than ``ledger_s`` ago (and
        webhook delivery ids past their ``dedupe_until``)."""
        ...

    # --- Manager's webhooks and partner callbacks (section 11) ---------------------------------

    async def record_webhook(self, webhook: IncomingWebhook) -> WebhookResult:
        """In one committed write: a delivery id seen before is DUPLICATE (nothing changes);
        else the id is remembered and the event matched: IGNORED, or ACCEPTED with the event
        added to the order, ``manager_status`` set, and its partner's callback queued."""
        ...

    async def put_callback(self, message: CallbackMessage) -> None:
        """Queue a callback, due now (an order the deliverer settled)."""
        ...

    async def take_due_callbacks(
        self, now: float, lease_s: float, limit: int
    ) -> list[CallbackMessage]:
        """Callbacks whose time has come, each leased to the caller until ``now + lease_s``.

        A callback whose lease lapses (its sender died) is due again.
        """
        ...

    async def settle_callback(
        self, message_id: str, now: float, next_attempt_at: float | None
    ) -> None:
        """Record an attempt: ``next_attempt_at`` None forgets the message (delivered or given
        up); otherwise it is due again then, with one more attempt counted."""
        ...
