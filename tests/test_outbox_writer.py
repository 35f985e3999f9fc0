"""The SQLite writer thread: grouped commits, one failing operation rolled back alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.outbox.writer import SqliteWriter


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[tuple[SqliteWriter, list[str]]]:
    statements: list[str] = []

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
        connection.execute("CREATE TABLE t (v INTEGER UNIQUE)")
        connection.set_trace_callback(statements.append)
        return connection

    thread = SqliteWriter(connect)
    thread.start()
    await asyncio.to_thread(thread.opened.wait)
    yield thread, statements
    thread.stop()
    await asyncio.to_thread(thread.join)


def insert(value: int) -> object:
    return lambda c: c.execute("INSERT INTO t VALUES (?)", (value,)).rowcount


async def test_operations_waiting_together_share_one_commit(
    writer: tuple[SqliteWriter, list[str]],
) -> None:
    thread, statements = writer
    results = await asyncio.gather(*(thread.submit(insert(i)) for i in range(50)))  # type: ignore[arg-type]
    assert results == [1] * 50
    commits = statements.count("COMMIT")
    assert 1 <= commits < 50  # grouped: far fewer commits (fsyncs) than operations
    rows = await thread.submit(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0])
    assert rows == 50


async def test_a_failing_operation_is_rolled_back_alone(
    writer: tuple[SqliteWriter, list[str]],
) -> None:
    thread, _ = writer
    futures = [thread.submit(insert(1)), thread.submit(insert(1)), thread.submit(insert(2))]  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] == 1 and outcomes[2] == 1
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    values = await thread.submit(lambda c: [r[0] for r in c.execute("SELECT v FROM t ORDER BY v")])
    assert values == [1, 2]


async def test_a_failed_commit_fails_every_operation_of_its_batch(
    writer: tuple[SqliteWriter, list[str]],
) -> None:
    thread, _ = writer
    await thread.submit(lambda c: c.execute("CREATE TABLE big (b BLOB)"))
    pages = await thread.submit(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await thread.submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 1}"))
    blob = b"x" * 100_000
    outcome = await asyncio.gather(
        thread.submit(lambda c: c.execute("INSERT INTO big VALUES (?)", (blob,))),
        return_exceptions=True,
    )
    assert isinstance(outcome[0], sqlite3.OperationalError)
    assert "full" in str(outcome[0])
    assert await thread.submit(lambda c: c.execute("SELECT count(*) FROM big").fetchone()[0]) == 0


async def test_a_connection_that_cannot_be_opened_is_reported(tmp_path: Path) -> None:
    def connect() -> sqlite3.Connection:
        raise sqlite3.DatabaseError("file is not a database")

    thread = SqliteWriter(connect)
    thread.start()
    await asyncio.to_thread(thread.opened.wait)
    thread.join()
    assert isinstance(thread.open_error, sqlite3.DatabaseError)
