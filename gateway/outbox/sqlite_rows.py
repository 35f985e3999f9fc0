"""Rows of the SQLite outbox's ``orders`` table as ledger entries, and their events as JSON."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Final

from gateway.outbox import LedgerEntry, LedgerEvent, OrderStatus

LEDGER_COLUMNS: Final = (
    "partner, reference, org_id, status, attempts, created_at, updated_at, "
    "order_request_id, manager_status, last_error, events"
)


def select_entry(
    connection: sqlite3.Connection, partner: str, reference: str
) -> LedgerEntry | None:
    row = connection.execute(
        f"SELECT {LEDGER_COLUMNS} FROM orders WHERE partner = ? AND reference = ?",
        (partner, reference),
    ).fetchone()
    return None if row is None else to_entry(row)


def to_entry(row: tuple[Any, ...]) -> LedgerEntry:
    (partner, reference, org_id, status, attempts, created, updated, manager_id, manager_status,
     last_error, events) = row  # fmt: skip
    return LedgerEntry(
        partner=partner,
        reference=reference,
        org_id=org_id,
        status=OrderStatus(status),
        attempts=attempts,
        created_at=created,
        updated_at=updated,
        order_request_id=manager_id,
        manager_status=manager_status,
        last_error=last_error,
        events=tuple(LedgerEvent(e["type"], e.get("status"), e["at"]) for e in json.loads(events)),
    )


def _dump_event(event: LedgerEvent) -> str:
    return json.dumps({"type": event.type, "status": event.status, "at": event.at})


def dump_events(events: tuple[LedgerEvent, ...]) -> str:
    return "[" + ",".join(_dump_event(event) for event in events) + "]"
