"""The embedded outbox: one SQLite file (WAL) written by one thread that commits in groups.

For one gateway process (``state.backend = "memory"``). Every write is committed with
``synchronous = FULL`` before its caller continues, so an order answered 2xx survives ``kill -9``
and a power cut. Under load, the writer thread takes every operation waiting in its queue into one
transaction: one fsync for many orders, not one each.

Claims in progress are kept in memory: only this process writes the file, and a claim must not
outlive a crash (the order itself is in the file by then, or was never answered 2xx).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Final, TypeVar

from gateway.errors import StateUnavailableError
from gateway.observability import log_event
from gateway.outbox import (
    SETTLED,
    CallbackMessage,
    DueOrder,
    IncomingWebhook,
    LedgerEntry,
    NewOrder,
    OrderStatus,
    OutboxStats,
    Remember,
    Settlement,
    WebhookResult,
)
from gateway.outbox.sealing import Sealer, SealError
from gateway.outbox.sqlite_rows import LEDGER_COLUMNS, dump_events, select_entry, to_entry
from gateway.outbox.sqlite_webhooks import (
    WEBHOOK_SCHEMA,
    insert_callback,
    record_webhook,
    settle_callback,
    take_due_callbacks,
)
from gateway.outbox.writer import SqliteWriter
from gateway.state import Claim, ClaimStatus, StoredReply
from gateway.state.memory import MemoryStore

T = TypeVar("T")

# PRAGMA application_id: marks the file as this gateway's outbox ("TGOB").
APPLICATION_ID: Final = 0x54474F42
SCHEMA_VERSION: Final = 1
CANARY: Final = b"telemed-gateway outbox"

_SCHEMA: Final = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    """CREATE TABLE orders (
        partner TEXT NOT NULL, reference TEXT NOT NULL, org_id TEXT NOT NULL,
        status TEXT NOT NULL, body BLOB, attempts INTEGER NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, expires_at REAL NOT NULL,
        next_at REAL, leased INTEGER NOT NULL DEFAULT 0,
        order_request_id TEXT, manager_status TEXT, last_error TEXT,
        events TEXT NOT NULL DEFAULT '[]',
        UNIQUE (partner, reference))""",
    "CREATE INDEX orders_due ON orders (status, next_at)",
    "CREATE INDEX orders_updated ON orders (updated_at)",
    "CREATE INDEX orders_manager_id ON orders (org_id, order_request_id)",
    """CREATE TABLE idempotency (
        key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, status INTEGER NOT NULL,
        content_type TEXT NOT NULL, body BLOB NOT NULL, expires_at REAL NOT NULL)""",
)


class OutboxFileError(Exception):
    """The outbox file cannot be used as it is (corrupted, foreign, or sealed with other keys)."""


class SqliteOutbox:
    """:class:`gateway.outbox.OutboxStore` (and the gateway's state store) in one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        sealer: Sealer,
        *,
        clock: Callable[[], float] = time.time,
        max_pages: int | None = None,  # tests: a full disk, as SQLite reports it
        max_rate_buckets: int = 10_000,
        owner: bool = True,
    ) -> None:
        """``owner``: the serving process, which creates the file and resends what a crash of
        its own left in flight. The CLI opens a running gateway's file with ``owner=False``."""
        self.path = Path(path)
        self._owner = owner
        self._sealer = sealer
        self._clock = clock
        self._max_pages = max_pages
        self._pending: dict[str, tuple[str, float]] = {}
        self._buckets = MemoryStore(max_entries=max_rate_buckets)
        self._writer: SqliteWriter | None = None
        self.problem: str | None = "not opened"

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the file and check it is this gateway's and opens with its keys.

        A file that cannot be used leaves the store unavailable (every call answers
        :class:`StateUnavailableError`, ``ping`` is False) and untouched: nothing stored is lost.
        """
        writer = SqliteWriter(self._connect)
        writer.start()
        await asyncio.get_running_loop().run_in_executor(None, writer.opened.wait)
        if writer.open_error is not None:
            writer.join()
            self.problem = _describe(writer.open_error)
            log_event(50, "outbox_unavailable", reason=self.problem)
            return
        self._writer = writer
        self.problem = None

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            if not self._owner:
                raise OutboxFileError(f"there is no outbox at {self.path}")
            # Created private: only the gateway's user reads it (its bodies are sealed anyway).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        elif self.path.stat().st_size:
            # Checked read-only first: a file that is not ours, or not sealed with our keys, is
            # left as it was (closing a read-write connection would checkpoint into it the WAL
            # that a crash left behind).
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            with closing(sqlite3.connect(uri, uri=True)) as reader:
                self._inspect(reader)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            if self._inspect(connection):
                self._create(connection)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            if self._owner:
                self._add_webhook_tables(connection)
                self._follow_rotation(connection)
                self._recover(connection)
            if self._max_pages is not None:
                connection.execute(f"PRAGMA max_page_count = {int(self._max_pages)}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _inspect(self, connection: sqlite3.Connection) -> bool:
        """Whether the file is new (empty); reads only.

        Raises:
            OutboxFileError: not this gateway's outbox, or sealed with none of its keys.
        """
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id == 0 and tables == 0:
            return True
        if application_id != APPLICATION_ID:
            raise OutboxFileError("the file is not a telemed-gateway outbox")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise OutboxFileError(f"the outbox file has schema {version}, not {SCHEMA_VERSION}")
        try:
            if self._sealer.open(_read_canary(connection)) != CANARY:
                raise SealError("no canary")
        except SealError:
            raise OutboxFileError(
                "the outbox was sealed with another key: put the old key back in outbox keys"
            ) from None
        return False

    def _create(self, connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.execute("INSERT INTO meta VALUES ('canary', ?)", (self._sealer.seal(CANARY),))
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")

    def _follow_rotation(self, connection: sqlite3.Connection) -> None:
        if not self._sealer.is_current(_read_canary(connection)):
            # The keys were rotated: the canary follows the key that seals now, or the old key
            # could never be removed, even once no order sealed with it is left.
            connection.execute(
                "UPDATE meta SET value = ? WHERE name = 'canary'", (self._sealer.seal(CANARY),)
            )

    def _add_webhook_tables(self, connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        for statement in WEBHOOK_SCHEMA:
            connection.execute(statement)
        connection.execute("COMMIT")

    def _recover(self, connection: sqlite3.Connection) -> None:
        # Orders and callbacks left leased by a crash of this (the only serving) process are
        # due again now.
        now = self._clock()
        connection.execute(
            "UPDATE orders SET next_at = ?, leased = 0 WHERE status = 'queued' AND leased = 1",
            (now,),
        )
        connection.execute("UPDATE callbacks SET next_at = ?, leased = 0 WHERE leased = 1", (now,))

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
        self.problem = self.problem or "closed"

    async def ping(self) -> bool:
        return self._writer is not None

    async def _run(self, operation: Callable[[sqlite3.Connection], T], *, writes: bool = True) -> T:
        if self._writer is None:
            raise StateUnavailableError("The order store is unavailable; nothing was forwarded.")
        try:
            result: T = await self._writer.submit(operation, writes=writes)
        except sqlite3.Error as exc:
            log_event(40, "outbox_write_failed", reason=_describe(exc))
            raise StateUnavailableError(
                "The order store could not be written; nothing was forwarded."
            ) from exc
        return result

    # --- idempotency (StateStore) ------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> Claim:
        now = self._clock()
        pending = self._pending.get(key)
        if pending is not None and pending[1] > now:
            same = pending[0] == fingerprint
            return Claim(ClaimStatus.IN_PROGRESS if same else ClaimStatus.CONFLICT)
        self._pending[key] = (fingerprint, now + lease_s)  # before the read: no second claimer
        try:
            row = await self._run(lambda c: _read_record(c, key, now), writes=False)
        except BaseException:
            self._pending.pop(key, None)
            raise
        if row is None:
            return Claim(ClaimStatus.NEW)
        del self._pending[key]
        stored_fingerprint, reply = row
        if stored_fingerprint != fingerprint:
            return Claim(ClaimStatus.CONFLICT)
        return Claim(ClaimStatus.REPLAY, reply)

    async def complete(self, key: str, fingerprint: str, reply: StoredReply, ttl_s: float) -> None:
        remember = Remember(key, fingerprint, reply, ttl_s)
        now = self._clock()
        try:
            await self._run(lambda c: _remember(c, remember, now))
        finally:
            self._pending.pop(key, None)

    async def release(self, key: str, fingerprint: str) -> None:
        pending = self._pending.get(key)
        if pending is not None and pending[0] == fingerprint:
            del self._pending[key]

    async def take(self, bucket: str, rate_per_min: int) -> float:
        return await self._buckets.take(bucket, rate_per_min)

    # --- the outbox --------------------------------------------------------------------------

    async def put(self, order: NewOrder, remember: Remember) -> None:
        def write(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO orders (partner, reference, org_id, status, body, "
                "attempts, created_at, updated_at, expires_at, next_at, leased) "
                "VALUES (?, ?, ?, 'queued', ?, 0, ?, ?, ?, ?, 1)",
                (
                    order.partner, order.reference, order.org_id, order.sealed,
                    order.now, order.now, order.expires_at, order.lease_until,
                ),
            )  # fmt: skip
            _remember(connection, remember, order.now)

        try:
            await self._run(write)
        finally:
            self._pending.pop(remember.key, None)

    async def take_due(self, now: float, lease_s: float, limit: int) -> list[DueOrder]:
        def take(connection: sqlite3.Connection) -> list[DueOrder]:
            rows = connection.execute(
                "SELECT rowid, partner, reference, org_id, body, attempts, created_at, "
                "expires_at FROM orders WHERE status = 'queued' AND next_at <= ? "
                "ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            connection.executemany(
                "UPDATE orders SET next_at = ?, leased = 1 WHERE rowid = ?",
                [(now + lease_s, row[0]) for row in rows],
            )
            return [DueOrder(*row[1:]) for row in rows]

        return await self._run(take)

    async def settle(
        self,
        partner: str,
        reference: str,
        settlement: Settlement,
        remember: Remember | None = None,
    ) -> LedgerEntry | None:
        def write(connection: sqlite3.Connection) -> LedgerEntry | None:
            if remember is not None:
                _remember(connection, remember, settlement.now)
            entry = select_entry(connection, partner, reference)
            if entry is None:
                return None
            if not _applies(entry.status, settlement.status):
                return entry  # dropped meanwhile, and this attempt changed nothing
            events = entry.events + ((settlement.event,) if settlement.event else ())
            status = settlement.status
            next_at = (
                (settlement.next_attempt_at or settlement.now)
                if status is OrderStatus.QUEUED
                else None
            )
            connection.execute(
                "UPDATE orders SET status = ?, attempts = attempts + ?, updated_at = ?, "
                "next_at = ?, leased = 0, "
                "last_error = coalesce(?, CASE WHEN ? THEN NULL ELSE last_error END), "
                "order_request_id = coalesce(?, order_request_id), "
                "manager_status = coalesce(?, manager_status), events = ?, "
                "body = CASE WHEN ? THEN NULL ELSE body END "
                "WHERE partner = ? AND reference = ?",
                (
                    status.value, settlement.calls, settlement.now, next_at,
                    settlement.last_error, status is OrderStatus.DELIVERED,
                    settlement.order_request_id,
                    settlement.manager_status, dump_events(events), status in SETTLED,
                    partner, reference,
                ),
            )  # fmt: skip
            # The row as the UPDATE left it, without reading it back.
            return replace(
                entry,
                status=status,
                attempts=entry.attempts + settlement.calls,
                updated_at=float(settlement.now),  # a REAL column
                last_error=_coalesce(
                    settlement.last_error,
                    None if status is OrderStatus.DELIVERED else entry.last_error,
                ),
                order_request_id=_coalesce(settlement.order_request_id, entry.order_request_id),
                manager_status=_coalesce(settlement.manager_status, entry.manager_status),
                events=events,
            )

        try:
            return await self._run(write)
        finally:
            if remember is not None:
                self._pending.pop(remember.key, None)

    async def get(self, partner: str, reference: str) -> LedgerEntry | None:
        return await self._run(lambda c: select_entry(c, partner, reference), writes=False)

    async def list_entries(
        self, status: OrderStatus | None = None, limit: int = 100
    ) -> list[LedgerEntry]:
        def read(connection: sqlite3.Connection) -> list[LedgerEntry]:
            where, args = ("WHERE status = ?", [status.value]) if status else ("", [])
            rows = connection.execute(
                f"SELECT {LEDGER_COLUMNS} FROM orders {where} ORDER BY updated_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [to_entry(row) for row in rows]

        return await self._run(read)

    async def requeue(self, partner: str, reference: str, now: float, expires_at: float) -> bool:
        def write(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE orders SET status = 'queued', next_at = ?, leased = 0, expires_at = ?, "
                "updated_at = ? WHERE partner = ? AND reference = ? AND status = 'failed'",
                (now, expires_at, now, partner, reference),
            )
            return cursor.rowcount == 1

        return await self._run(write)

    async def drop(self, partner: str, reference: str, now: float) -> bool:
        def write(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE orders SET status = 'dropped', body = NULL, next_at = NULL, leased = 0, "
                "updated_at = ? WHERE partner = ? AND reference = ? "
                "AND status IN ('queued', 'failed')",
                (now, partner, reference),
            )
            return cursor.rowcount == 1

        return await self._run(write)

    async def stats(self) -> OutboxStats:
        def read(connection: sqlite3.Connection) -> OutboxStats:
            counts = dict(connection.execute("SELECT status, count(*) FROM orders GROUP BY status"))
            oldest = connection.execute(
                "SELECT min(created_at) FROM orders WHERE status = 'queued'"
            ).fetchone()[0]
            return OutboxStats(
                queued=counts.get("queued", 0),
                failed=counts.get("failed", 0),
                oldest_queued_at=oldest,
                by_status=counts,
            )

        return await self._run(read)

    async def purge(self, now: float, ledger_s: float) -> int:
        def write(connection: sqlite3.Connection) -> int:
            orders = connection.execute(
                "DELETE FROM orders WHERE status != 'queued' AND updated_at < ?",
                (now - ledger_s,),
            ).rowcount
            connection.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
            connection.execute("DELETE FROM webhook_deliveries WHERE expires_at <= ?", (now,))
            return orders

        return await self._run(write)

    # --- Manager's webhooks and partner callbacks ----------------------------------------------

    async def record_webhook(self, webhook: IncomingWebhook) -> WebhookResult:
        return await self._run(lambda c: record_webhook(c, webhook))

    async def put_callback(self, message: CallbackMessage) -> None:
        await self._run(lambda c: insert_callback(c, message, message.created_at))

    async def take_due_callbacks(
        self, now: float, lease_s: float, limit: int
    ) -> list[CallbackMessage]:
        return await self._run(lambda c: take_due_callbacks(c, now, lease_s, limit))

    async def settle_callback(
        self, message_id: str, now: float, next_attempt_at: float | None
    ) -> None:
        await self._run(lambda c: settle_callback(c, message_id, next_attempt_at))


def _read_canary(connection: sqlite3.Connection) -> bytes:
    row = connection.execute("SELECT value FROM meta WHERE name = 'canary'").fetchone()
    return b"" if row is None else bytes(row[0])


def _coalesce(new: str | None, old: str | None) -> str | None:
    return old if new is None else new


def _applies(current: OrderStatus, new: OrderStatus) -> bool:
    """A queued order takes any result; a settled one only Manager's final word on it."""
    return current is OrderStatus.QUEUED or new in (OrderStatus.DELIVERED, OrderStatus.REJECTED)


def _read_record(
    connection: sqlite3.Connection, key: str, now: float
) -> tuple[str, StoredReply] | None:
    row = connection.execute(
        "SELECT fingerprint, status, content_type, body FROM idempotency "
        "WHERE key = ? AND expires_at > ?",
        (key, now),
    ).fetchone()
    if row is None:
        return None
    return row[0], StoredReply(row[1], bytes(row[3]), row[2])


def _remember(connection: sqlite3.Connection, remember: Remember, now: float) -> None:
    if remember.reply is None:
        connection.execute("DELETE FROM idempotency WHERE key = ?", (remember.key,))
        return
    reply = remember.reply
    connection.execute(
        "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
        (
            remember.key, remember.fingerprint, reply.status, reply.content_type, reply.body,
            now + remember.ttl_s,
        ),
    )  # fmt: skip


def _describe(exc: BaseException) -> str:
    """An operator's one-line reason (SQLite's messages carry no order data)."""
    if isinstance(exc, OutboxFileError):
        return str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return "the outbox file is corrupted or not an SQLite database"
    if isinstance(exc, OSError):
        return f"the outbox file cannot be opened: {exc.strerror}"
    return f"{exc.__class__.__name__}: {exc}"
