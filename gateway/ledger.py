"""The order status document a partner reads (contract section 10), from a ledger entry (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from gateway.outbox import LedgerEntry


def to_iso(timestamp: float) -> str:
    """Unix time as ISO 8601 in UTC with a ``Z``, to the second."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_status(entry: LedgerEntry) -> dict[str, object]:
    """Section 10's document: delivery state, Manager's id and status, attempts, events."""
    return {
        "external_reference": entry.reference,
        "status": entry.status.value,
        "order_request_id": entry.order_request_id,
        "manager_status": entry.manager_status,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
        "created_at": to_iso(entry.created_at),
        "updated_at": to_iso(entry.updated_at),
        "events": [
            {"type": event.type, "status": event.status, "at": to_iso(event.at)}
            for event in entry.events
        ],
    }


def to_status_document(entry: LedgerEntry) -> bytes:
    return orjson.dumps(build_status(entry))
