"""SqliteOutbox: settle answers the ledger entry as stored (no read-back); claims read what was
committed (the read goes through the writer thread, with no savepoint)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.outbox import LedgerEvent, NewOrder, OrderStatus, Remember, Settlement
from gateway.outbox.deliverer import build_queued_reply
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox
from gateway.state import Claim, ClaimStatus, StoredReply

KEY = SecretStr(new_key())


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteOutbox]:
    outbox = SqliteOutbox(tmp_path / "outbox.db", Sealer([KEY]), clock=lambda: 1000.0)
    await outbox.open()
    yield outbox
    await outbox.close()


SETTLEMENTS = [
    Settlement(OrderStatus.QUEUED, 1010, next_attempt_at=1020, last_error="upstream_unavailable"),
    Settlement(
        OrderStatus.QUEUED, 1020.5, next_attempt_at=1040, event=LedgerEvent("retry", None, 1020)
    ),
    Settlement(OrderStatus.FAILED, 1050, calls=0, last_error="upstream_timeout"),
    Settlement(
        OrderStatus.DELIVERED,
        1060,
        order_request_id="or_1",
        manager_status="received",
        event=LedgerEvent("delivered", "received", 1060.25),
    ),  # fmt: skip
    Settlement(OrderStatus.REJECTED, 1070, last_error="upstream_rejected"),
    Settlement(OrderStatus.DELIVERED, 1080, manager_status="accepted"),
]


async def test_every_settlement_answers_what_a_read_then_finds(store: SqliteOutbox) -> None:
    reply = build_queued_reply("R-1", "rid")
    await store.put(
        NewOrder("acme", "R-1", "org1", b"sealed", 1000, 1005, 5000),
        Remember("k", "fp", reply, 3600),
    )
    for settlement in SETTLEMENTS:
        answered = await store.settle("acme", "R-1", settlement)

        assert answered == await store.get("acme", "R-1")
    assert answered is not None and answered.status is OrderStatus.DELIVERED
    assert answered.attempts == 5 and answered.last_error is None


async def test_settling_an_unknown_order_answers_none(store: SqliteOutbox) -> None:
    assert await store.settle("acme", "nope", SETTLEMENTS[0]) is None


async def test_claims_read_what_was_committed(store: SqliteOutbox) -> None:
    reply = StoredReply(201, b'{"id":"or_1"}', "application/json")
    await store.complete("k-1", "fp", reply, 3600)

    assert await store.claim("k-1", "fp", 30) == Claim(ClaimStatus.REPLAY, reply)
    assert await store.claim("k-1", "other", 30) == Claim(ClaimStatus.CONFLICT)
    assert await store.claim("k-2", "fp", 30) == Claim(ClaimStatus.NEW)
    assert await store.claim("k-2", "fp", 30) == Claim(ClaimStatus.IN_PROGRESS)
