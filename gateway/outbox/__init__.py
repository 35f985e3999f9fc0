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
    attempted: bool = True  # one more call to Manager was made
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
        """Forget settled and failed orders last updated more than ``ledger_s`` ago."""
        ...
