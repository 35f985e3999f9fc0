"""Section 11 in the SQLite outbox: Manager's delivery ids, event matching, partner callbacks.

Functions of a connection, run by the store's writer thread inside its transactions.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from gateway.outbox import CallbackMessage, IncomingWebhook, WebhookResult
from gateway.outbox.sqlite_rows import dump_events, select_entry

# Section 11's tables, added to any outbox file the serving process opens (idempotent).
WEBHOOK_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS webhook_deliveries (id TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS callbacks (
        id TEXT PRIMARY KEY, partner TEXT NOT NULL, type TEXT NOT NULL, reference TEXT NOT NULL,
        status TEXT NOT NULL, order_request_id TEXT, manager_status TEXT, event TEXT,
        created_at REAL NOT NULL, expires_at REAL NOT NULL, attempts INTEGER NOT NULL,
        next_at REAL NOT NULL, leased INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS callbacks_due ON callbacks (next_at)",
    "CREATE INDEX IF NOT EXISTS orders_reference ON orders (org_id, reference)",
)
CALLBACK_COLUMNS: Final = (
    "id, partner, type, reference, status, order_request_id, manager_status, event, "
    "created_at, expires_at, attempts"
)


def record_webhook(connection: sqlite3.Connection, webhook: IncomingWebhook) -> WebhookResult:
    seen = connection.execute(
        "SELECT 1 FROM webhook_deliveries WHERE id = ? AND expires_at > ?",
        (webhook.delivery_id, webhook.now),
    ).fetchone()
    if seen is not None:
        return WebhookResult.DUPLICATE
    connection.execute(
        "INSERT OR REPLACE INTO webhook_deliveries VALUES (?, ?)",
        (webhook.delivery_id, webhook.dedupe_until),
    )
    found = match_order(connection, webhook)
    if found is None:
        return WebhookResult.IGNORED
    partner, reference = found
    entry = select_entry(connection, partner, reference)
    assert entry is not None  # matched in this transaction
    events = (*entry.events, webhook.event)
    connection.execute(
        "UPDATE orders SET events = ?, manager_status = coalesce(?, manager_status), "
        "order_request_id = coalesce(order_request_id, ?), updated_at = ? "
        "WHERE partner = ? AND reference = ?",
        (
            dump_events(events), webhook.manager_status, webhook.order_request_id, webhook.now,
            partner, reference,
        ),
    )  # fmt: skip
    if partner in webhook.callback_partners:
        updated = select_entry(connection, partner, reference)
        assert updated is not None
        message = CallbackMessage(
            id=webhook.callback_id, partner=partner, type="order.updated", reference=reference,
            status=updated.status.value, order_request_id=updated.order_request_id,
            manager_status=updated.manager_status, event=webhook.event.type,
            created_at=webhook.now, expires_at=webhook.callback_expires_at,
        )  # fmt: skip
        insert_callback(connection, message, webhook.now)
    return WebhookResult.ACCEPTED


def match_order(connection: sqlite3.Connection, webhook: IncomingWebhook) -> tuple[str, str] | None:
    """The order an event is about: by Manager's id, else by reference among orders without
    another Manager id (the most recently updated, when partners share a reference)."""
    partners = sorted(webhook.org_partners)
    among = f"partner IN ({', '.join('?' * len(partners))})"
    row = None
    if webhook.order_request_id is not None:
        row = connection.execute(
            f"SELECT partner, reference FROM orders WHERE org_id = ? AND {among} "
            "AND order_request_id = ? ORDER BY updated_at DESC LIMIT 1",
            (webhook.org_id, *partners, webhook.order_request_id),
        ).fetchone()
    if row is None and webhook.reference is not None:
        row = connection.execute(
            f"SELECT partner, reference FROM orders WHERE org_id = ? AND {among} "
            "AND reference = ? AND (order_request_id IS NULL OR ? IS NULL) "
            "ORDER BY updated_at DESC LIMIT 1",
            (webhook.org_id, *partners, webhook.reference, webhook.order_request_id),
        ).fetchone()
    return None if row is None else (row[0], row[1])


def insert_callback(
    connection: sqlite3.Connection, message: CallbackMessage, next_at: float
) -> None:
    connection.execute(
        f"INSERT OR IGNORE INTO callbacks ({CALLBACK_COLUMNS}, next_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message.id, message.partner, message.type, message.reference, message.status,
            message.order_request_id, message.manager_status, message.event, message.created_at,
            message.expires_at, message.attempts, next_at,
        ),
    )  # fmt: skip


def take_due_callbacks(
    connection: sqlite3.Connection, now: float, lease_s: float, limit: int
) -> list[CallbackMessage]:
    """Due callbacks, each leased until ``now + lease_s``."""
    rows = connection.execute(
        f"SELECT {CALLBACK_COLUMNS} FROM callbacks WHERE next_at <= ? ORDER BY next_at LIMIT ?",
        (now, limit),
    ).fetchall()
    connection.executemany(
        "UPDATE callbacks SET next_at = ?, leased = 1 WHERE id = ?",
        [(now + lease_s, row[0]) for row in rows],
    )
    return [CallbackMessage(*row) for row in rows]


def settle_callback(
    connection: sqlite3.Connection, message_id: str, next_attempt_at: float | None
) -> None:
    """Delivered or given up (None: forget it), or due again at ``next_attempt_at``."""
    if next_attempt_at is None:
        connection.execute("DELETE FROM callbacks WHERE id = ?", (message_id,))
        return
    connection.execute(
        "UPDATE callbacks SET next_at = ?, leased = 0, attempts = attempts + 1 WHERE id = ?",
        (next_attempt_at, message_id),
    )
