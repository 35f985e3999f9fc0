"""One thread that owns an SQLite connection and runs operations in grouped transactions.

Callers on the event loop submit an operation (a function of the connection) and await its
result. The thread takes every operation waiting in its queue into one ``BEGIN IMMEDIATE …
COMMIT``, each inside a savepoint (one that fails is rolled back alone), so that under load one
fsync commits many orders, and wakes the event loop once per batch with every result. A read
(``writes=False``) needs no savepoint, and a batch of reads alone no write lock.

Savepoints cost two statements per operation, and operations rarely fail: a batch first runs
without them, and only when one of its operations fails is it rolled back and run again with a
savepoint each. An operation may therefore run twice; it must do nothing but use the connection.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Final

Operation = Callable[[sqlite3.Connection], Any]
MAX_BATCH: Final = 256
_Item = tuple[Operation, bool, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
_Settled = tuple["asyncio.Future[Any]", bool, Any]
_Result = tuple[bool, Any]


class SqliteWriter(threading.Thread):
    """Owns the connection; runs queued operations in grouped transactions."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(name="outbox-sqlite", daemon=True)
        self._connect = connect
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.opened: threading.Event = threading.Event()
        self.open_error: BaseException | None = None

    def submit(self, operation: Operation, *, writes: bool = True) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((operation, writes, loop, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)

    def run(self) -> None:
        try:
            connection = self._connect()
        except BaseException as exc:  # reported to the opener, which decides
            self.open_error = exc
            self.opened.set()
            return
        self.opened.set()
        try:
            while self._run_batch(connection):
                pass
        finally:
            connection.close()

    def _run_batch(self, connection: sqlite3.Connection) -> bool:
        first = self._queue.get()
        if first is None:
            return False
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        # Reads alone take a snapshot without the write lock (and there is nothing to sync).
        begin = "BEGIN IMMEDIATE" if any(item[1] for item in batch) else "BEGIN"
        try:
            connection.execute(begin)
            results = _run_together(connection, batch)
            if results is None:  # one failed: again, each in a savepoint, so it fails alone
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                connection.execute(begin)
                results = [_run_one(connection, op, writes) for op, writes, _, _ in batch]
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit failed, or SQLite itself rolled the transaction back (a full disk, an
            # I/O error): nothing of this batch is durable, so every operation in it failed.
            try:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the next batch's BEGIN fails too and says why; no caller is left waiting
            error = exc.__cause__ if isinstance(exc, _TransactionLost) else exc
            results = [(False, error)] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
        for (_, _, loop, future), (ok, value) in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, settled in by_loop.items():  # one wake-up per loop, not one per operation
            loop.call_soon_threadsafe(_resolve_all, settled)
        return True


class _TransactionLost(sqlite3.Error):
    """SQLite ended the whole transaction while one operation ran (its cause says why)."""


def _run_together(connection: sqlite3.Connection, batch: list[_Item]) -> list[_Result] | None:
    """Every operation of the batch without savepoints; None as soon as one fails."""
    results: list[_Result] = []
    for operation, _, _, _ in batch:
        try:
            results.append((True, operation(connection)))
        except Exception:
            return None
    return results


def _run_one(
    connection: sqlite3.Connection, operation: Operation, writes: bool = True
) -> tuple[bool, Any]:
    if not writes:  # a failed read changed nothing: no savepoint to roll back to
        try:
            return True, operation(connection)
        except Exception as exc:
            if not connection.in_transaction:
                raise _TransactionLost() from exc
            return False, exc
    connection.execute("SAVEPOINT op")
    try:
        value = operation(connection)
    except Exception as exc:
        if not connection.in_transaction:
            raise _TransactionLost() from exc
        # This operation only: the others in the batch go on.
        connection.execute("ROLLBACK TO op")
        connection.execute("RELEASE op")
        return False, exc
    connection.execute("RELEASE op")
    return True, value


def _resolve_all(settled: list[_Settled]) -> None:
    for future, ok, value in settled:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
