"""The outbox's stores, SQLite and Redis, held to the same behaviour (``OutboxStore``).

Every test runs against both: a file of its own for SQLite, the tests' own ``redis-server``
(emptied per test) for Redis. Times are passed in (the protocol takes them as arguments), so
leases and schedules are moved by hand. A few tests at the end are Redis's own: two stores
(two processes, as Redis sees them) taking at once, the keys it writes, Redis down.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import free_port
from pydantic import SecretStr
from test_state_redis import all_keys

import gateway.outbox.redis as redis_outbox
from gateway.errors import StateUnavailableError
from gateway.idempotency import build_key
from gateway.outbox import (
    LedgerEvent,
    NewOrder,
    OrderStatus,
    OutboxStore,
    Remember,
    Settlement,
)
from gateway.outbox.redis import RedisOutbox, build_member
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox
from gateway.state import Claim, ClaimStatus, StoredReply
from gateway.state.redis import NAMESPACE

T0 = 1_700_000_000.25  # a fraction, so that a store rounding times would show
LEASE_S = 30.0
MAX_AGE_S = 3600.0
TTL_S = 86_400.0
FP = "fingerprint-1"
QUEUED_REPLY = StoredReply(202, b'{"status": "queued"}', "application/json")
# Not UTF-8 and with a NUL byte: a reply must come back byte for byte.
MANAGER_REPLY = StoredReply(201, b'{"id": "mgr-1"}\x00\xff', "application/json; charset=utf-8")


@dataclass
class Backend:
    """A store under test and a look at what it keeps of an order's body (None: deleted)."""

    store: OutboxStore
    body: Callable[[str, str], Awaitable[bytes | None]]


async def _open_sqlite(path: Path) -> AsyncIterator[Backend]:
    store = SqliteOutbox(path, Sealer([SecretStr(new_key())]), clock=lambda: T0)
    await store.open()
    assert store.problem is None

    async def body(partner: str, reference: str) -> bytes | None:
        with sqlite3.connect(path) as connection:
            row = connection.execute(
                "SELECT body FROM orders WHERE partner = ? AND reference = ?", (partner, reference)
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    try:
        yield Backend(store, body)
    finally:
        await store.close()


async def _open_redis(url: str) -> AsyncIterator[Backend]:
    store = RedisOutbox(url)
    client = aioredis.Redis.from_url(url)

    async def body(partner: str, reference: str) -> bytes | None:
        key = f"{NAMESPACE}:outbox:order:{build_member(partner, reference)}"
        value: bytes | None = await client.hget(key, "body")
        return value

    try:
        yield Backend(store, body)
    finally:
        await client.aclose()
        await store.close()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        opened = _open_sqlite(tmp_path / "outbox.db")
    else:
        opened = _open_redis(request.getfixturevalue("redis_url"))
    async for value in opened:
        yield value


@pytest.fixture
def store(backend: Backend) -> OutboxStore:
    return backend.store


def new_order(reference: str = "TM-1", *, now: float = T0, partner: str = "acme") -> NewOrder:
    return NewOrder(
        partner=partner,
        reference=reference,
        org_id="org-1",
        sealed=b"sealed:" + reference.encode(),
        now=now,
        lease_until=now + LEASE_S,
        expires_at=now + MAX_AGE_S,
    )


def remember(reference: str = "TM-1", reply: StoredReply | None = QUEUED_REPLY) -> Remember:
    return Remember(build_key("acme", reference), FP, reply, TTL_S)


async def put(store: OutboxStore, reference: str = "TM-1", *, now: float = T0) -> None:
    await store.put(new_order(reference, now=now), remember(reference))


def delivered(now: float, **fields: str | None) -> Settlement:
    event = LedgerEvent("order_request_submitted", "pending", now)
    values = {"order_request_id": "mgr-1", "manager_status": "pending", **fields}
    return Settlement(OrderStatus.DELIVERED, now, event=event, **values)


def retry_at(now: float, next_at: float, code: str = "upstream_unavailable") -> Settlement:
    return Settlement(OrderStatus.QUEUED, now, next_attempt_at=next_at, last_error=code)


def references(due: list[object]) -> list[str]:
    return [order.reference for order in due]  # type: ignore[attr-defined]


# --- put and take_due ---------------------------------------------------------------------------


async def test_a_new_order_is_not_due_before_its_inline_lease_ends(store: OutboxStore) -> None:
    await put(store)

    assert await store.take_due(T0 + LEASE_S - 0.001, 60, 10) == []
    [due] = await store.take_due(T0 + LEASE_S, 60, 10)

    assert due.partner == "acme"
    assert due.reference == "TM-1"
    assert due.org_id == "org-1"
    assert due.sealed == b"sealed:TM-1"
    assert due.attempts == 0
    assert due.created_at == T0
    assert due.expires_at == T0 + MAX_AGE_S


async def test_a_taken_order_is_not_taken_again_until_its_lease_lapses(store: OutboxStore) -> None:
    await put(store)
    now = T0 + LEASE_S
    assert references(await store.take_due(now, 60, 10)) == ["TM-1"]

    assert await store.take_due(now, 60, 10) == []
    assert await store.take_due(now + 59.9, 60, 10) == []
    # Its deliverer died: the lease lapses and another takes it.
    assert references(await store.take_due(now + 60, 60, 10)) == ["TM-1"]


async def test_take_due_takes_the_earliest_first_up_to_the_limit(store: OutboxStore) -> None:
    for reference, offset in (("C", 2), ("A", 0), ("B", 1)):
        await put(store, reference, now=T0 + offset)
    now = T0 + 100

    assert references(await store.take_due(now, 60, 2)) == ["A", "B"]
    assert references(await store.take_due(now, 60, 2)) == ["C"]


async def test_a_reference_with_any_characters_round_trips(store: OutboxStore) -> None:
    reference = "TM/ä ß:1*?\u2603 \x01"
    await put(store, reference)

    [due] = await store.take_due(T0 + LEASE_S, 60, 10)
    entry = await store.get("acme", reference)

    assert due.reference == reference
    assert entry is not None and entry.reference == reference


# --- settle -------------------------------------------------------------------------------------


async def test_delivered_deletes_the_body_and_records_managers_answer(backend: Backend) -> None:
    store = backend.store
    await put(store)
    assert await backend.body("acme", "TM-1") == b"sealed:TM-1"

    entry = await store.settle("acme", "TM-1", delivered(T0 + 1))

    assert entry is not None
    assert entry.status is OrderStatus.DELIVERED
    assert (entry.order_request_id, entry.manager_status) == ("mgr-1", "pending")
    assert entry.attempts == 1
    assert entry.last_error is None
    assert (entry.created_at, entry.updated_at) == (T0, T0 + 1)
    assert entry.events == (LedgerEvent("order_request_submitted", "pending", T0 + 1),)
    assert await backend.body("acme", "TM-1") is None
    assert await store.get("acme", "TM-1") == entry
    assert await store.take_due(T0 + 10_000, 60, 10) == []


async def test_rejected_deletes_the_body_and_keeps_the_error(backend: Backend) -> None:
    store = backend.store
    await put(store)

    settlement = Settlement(OrderStatus.REJECTED, T0 + 1, last_error="upstream_rejected")
    entry = await store.settle("acme", "TM-1", settlement)

    assert entry is not None
    assert (entry.status, entry.last_error, entry.attempts) == (
        OrderStatus.REJECTED,
        "upstream_rejected",
        1,
    )
    assert await backend.body("acme", "TM-1") is None
    assert await store.take_due(T0 + 10_000, 60, 10) == []


async def test_queued_reschedules_the_order_and_counts_the_attempt(backend: Backend) -> None:
    store = backend.store
    await put(store)

    entry = await store.settle("acme", "TM-1", retry_at(T0 + 1, T0 + 100))

    assert entry is not None
    assert (entry.status, entry.attempts, entry.last_error) == (
        OrderStatus.QUEUED,
        1,
        "upstream_unavailable",
    )
    assert await backend.body("acme", "TM-1") == b"sealed:TM-1"
    assert await store.take_due(T0 + 99.9, 60, 10) == []
    [due] = await store.take_due(T0 + 100, 60, 10)
    assert due.attempts == 1


async def test_a_queued_result_without_a_time_is_due_at_once(store: OutboxStore) -> None:
    await put(store)

    await store.settle("acme", "TM-1", Settlement(OrderStatus.QUEUED, T0 + 1))

    assert await store.take_due(T0 + 0.9, 60, 10) == []
    assert references(await store.take_due(T0 + 1, 60, 10)) == ["TM-1"]


async def test_attempts_add_up_and_an_unattempted_result_does_not_count(
    store: OutboxStore,
) -> None:
    await put(store)
    await store.settle("acme", "TM-1", retry_at(T0 + 1, T0 + 2))
    await store.settle("acme", "TM-1", retry_at(T0 + 2, T0 + 3))
    undeliverable = Settlement(OrderStatus.QUEUED, T0 + 3, calls=0, next_attempt_at=T0 + 4)

    entry = await store.settle("acme", "TM-1", undeliverable)

    assert entry is not None and entry.attempts == 2


async def test_the_last_error_stays_until_another_one_or_a_delivery(store: OutboxStore) -> None:
    await put(store)
    await store.settle("acme", "TM-1", retry_at(T0 + 1, T0 + 2, "upstream_timeout"))
    await store.settle("acme", "TM-1", retry_at(T0 + 2, T0 + 3, "upstream_unavailable"))

    failed = await store.settle("acme", "TM-1", Settlement(OrderStatus.FAILED, T0 + 3, calls=0))
    assert failed is not None and failed.last_error == "upstream_unavailable"  # still says why

    await store.requeue("acme", "TM-1", T0 + 4, T0 + 5000)
    done = await store.settle("acme", "TM-1", delivered(T0 + 5))
    assert done is not None and done.last_error is None


async def test_failed_keeps_the_body_and_is_not_due(backend: Backend) -> None:
    store = backend.store
    await put(store)
    await store.settle("acme", "TM-1", retry_at(T0 + 1, T0 + 2))

    entry = await store.settle(
        "acme",
        "TM-1",
        Settlement(OrderStatus.FAILED, T0 + 3, calls=0, last_error="upstream_unavailable"),
    )

    assert entry is not None
    assert (entry.status, entry.attempts) == (OrderStatus.FAILED, 1)
    assert await backend.body("acme", "TM-1") == b"sealed:TM-1"
    assert await store.take_due(T0 + 10_000, 60, 10) == []


async def test_manager_id_and_status_are_kept_when_a_result_brings_none(
    store: OutboxStore,
) -> None:
    await put(store)
    await store.settle("acme", "TM-1", delivered(T0 + 1))

    later = Settlement(
        OrderStatus.DELIVERED,
        T0 + 2,
        calls=0,
        manager_status="accepted",
        event=LedgerEvent("order_request_status_changed", "accepted", T0 + 2),
    )
    entry = await store.settle("acme", "TM-1", later)

    assert entry is not None
    assert (entry.order_request_id, entry.manager_status) == ("mgr-1", "accepted")
    assert [event.type for event in entry.events] == [
        "order_request_submitted",
        "order_request_status_changed",
    ]
    assert entry.attempts == 1


async def test_settling_an_unknown_order_answers_none(store: OutboxStore) -> None:
    assert await store.settle("acme", "NEVER", delivered(T0)) is None
    assert await store.get("acme", "NEVER") is None


async def test_a_late_result_after_a_drop_changes_nothing_but_managers_final_word(
    backend: Backend,
) -> None:
    store = backend.store
    await put(store)
    assert await store.drop("acme", "TM-1", T0 + 1)

    for late in (
        retry_at(T0 + 2, T0 + 3),
        Settlement(OrderStatus.FAILED, T0 + 2, calls=0),
    ):
        entry = await store.settle("acme", "TM-1", late)
        assert entry is not None
        assert (entry.status, entry.attempts, entry.updated_at) == (OrderStatus.DROPPED, 0, T0 + 1)
    assert await store.take_due(T0 + 10_000, 60, 10) == []

    # Manager did take it (the attempt was in flight when the operator dropped it): the truth.
    entry = await store.settle("acme", "TM-1", delivered(T0 + 4))

    assert entry is not None
    assert (entry.status, entry.order_request_id) == (OrderStatus.DELIVERED, "mgr-1")
    assert await backend.body("acme", "TM-1") is None


async def test_put_replaces_a_settled_entry_with_a_new_order(backend: Backend) -> None:
    store = backend.store
    await put(store)
    await store.settle("acme", "TM-1", delivered(T0 + 1))

    await store.put(replace(new_order(now=T0 + 10), sealed=b"second"), remember())

    entry = await store.get("acme", "TM-1")
    assert entry is not None
    assert (entry.status, entry.attempts, entry.events) == (OrderStatus.QUEUED, 0, ())
    assert (entry.order_request_id, entry.manager_status) == (None, None)
    assert (entry.created_at, entry.updated_at) == (T0 + 10, T0 + 10)
    assert await backend.body("acme", "TM-1") == b"second"
    [due] = await store.take_due(T0 + 10 + LEASE_S, 60, 10)
    assert (due.sealed, due.attempts) == (b"second", 0)
    stats = await store.stats()
    assert stats.by_status == {"queued": 1}


# --- idempotency records written with the order -------------------------------------------------


async def test_a_claim_after_put_replays_the_stored_202(store: OutboxStore) -> None:
    key = build_key("acme", "TM-1")
    assert await store.claim(key, FP, 60) == Claim(ClaimStatus.NEW)

    await put(store)

    assert await store.claim(key, FP, 60) == Claim(ClaimStatus.REPLAY, QUEUED_REPLY)
    assert await store.claim(key, "another-body", 60) == Claim(ClaimStatus.CONFLICT)


async def test_settle_with_a_reply_replaces_the_record(store: OutboxStore) -> None:
    await put(store)

    await store.settle("acme", "TM-1", delivered(T0 + 1), remember(reply=MANAGER_REPLY))

    claim = await store.claim(build_key("acme", "TM-1"), FP, 60)
    assert claim == Claim(ClaimStatus.REPLAY, MANAGER_REPLY)


async def test_settle_with_no_reply_forgets_the_record(store: OutboxStore) -> None:
    await put(store)
    rejected = Settlement(OrderStatus.REJECTED, T0 + 1, last_error="upstream_rejected")

    await store.settle("acme", "TM-1", rejected, remember(reply=None))

    # The partner may send it again, even with another body.
    assert await store.claim(build_key("acme", "TM-1"), "another-body", 60) == Claim(
        ClaimStatus.NEW
    )


async def test_a_settle_without_remember_keeps_the_record(store: OutboxStore) -> None:
    await put(store)

    await store.settle("acme", "TM-1", retry_at(T0 + 1, T0 + 2))

    claim = await store.claim(build_key("acme", "TM-1"), FP, 60)
    assert claim == Claim(ClaimStatus.REPLAY, QUEUED_REPLY)


async def test_the_record_is_written_even_when_the_order_is_gone(store: OutboxStore) -> None:
    assert (
        await store.settle("acme", "GONE", delivered(T0), remember("GONE", MANAGER_REPLY)) is None
    )

    claim = await store.claim(build_key("acme", "GONE"), FP, 60)
    assert claim == Claim(ClaimStatus.REPLAY, MANAGER_REPLY)


# --- the operator's actions ---------------------------------------------------------------------


async def fail(store: OutboxStore, reference: str = "TM-1", *, now: float = T0 + 5) -> None:
    await store.settle("acme", reference, Settlement(OrderStatus.FAILED, now, calls=0))


async def test_requeue_takes_only_a_failed_order_back_due_now(store: OutboxStore) -> None:
    await put(store)
    assert not await store.requeue("acme", "TM-1", T0 + 1, T0 + 9999)  # queued
    assert not await store.requeue("acme", "NEVER", T0 + 1, T0 + 9999)
    await fail(store)

    assert await store.requeue("acme", "TM-1", T0 + 10, T0 + 5000)

    entry = await store.get("acme", "TM-1")
    assert entry is not None and (entry.status, entry.updated_at) == (OrderStatus.QUEUED, T0 + 10)
    assert await store.take_due(T0 + 9.9, 60, 10) == []
    [due] = await store.take_due(T0 + 10, 60, 10)
    assert due.expires_at == T0 + 5000
    assert (await store.stats()).oldest_queued_at == T0
    assert not await store.requeue("acme", "TM-1", T0 + 11, T0 + 5000)  # queued again


async def test_requeue_does_not_revive_a_delivered_order(store: OutboxStore) -> None:
    await put(store)
    await store.settle("acme", "TM-1", delivered(T0 + 1))

    assert not await store.requeue("acme", "TM-1", T0 + 2, T0 + 9999)


@pytest.mark.parametrize("before", ["queued", "failed"])
async def test_drop_deletes_a_queued_or_failed_orders_body(backend: Backend, before: str) -> None:
    store = backend.store
    await put(store)
    if before == "failed":
        await fail(store)

    assert await store.drop("acme", "TM-1", T0 + 20)

    entry = await store.get("acme", "TM-1")
    assert entry is not None and (entry.status, entry.updated_at) == (OrderStatus.DROPPED, T0 + 20)
    assert await backend.body("acme", "TM-1") is None
    assert await store.take_due(T0 + 10_000, 60, 10) == []
    assert not await store.drop("acme", "TM-1", T0 + 21)
    assert not await store.requeue("acme", "TM-1", T0 + 21, T0 + 9999)


async def test_drop_leaves_settled_and_unknown_orders_alone(store: OutboxStore) -> None:
    await put(store)
    await store.settle("acme", "TM-1", delivered(T0 + 1))

    assert not await store.drop("acme", "TM-1", T0 + 2)
    assert not await store.drop("acme", "NEVER", T0 + 2)
    entry = await store.get("acme", "TM-1")
    assert entry is not None and entry.status is OrderStatus.DELIVERED


# --- the ledger ---------------------------------------------------------------------------------


async def test_an_order_is_the_partners_own(store: OutboxStore) -> None:
    await put(store)

    assert await store.get("other", "TM-1") is None
    assert not await store.drop("other", "TM-1", T0 + 1)
    assert await store.settle("other", "TM-1", delivered(T0 + 1)) is None
    entry = await store.get("acme", "TM-1")
    assert entry is not None and entry.status is OrderStatus.QUEUED


async def test_stats_count_by_status_and_name_the_oldest_queued(store: OutboxStore) -> None:
    empty = await store.stats()
    assert (empty.queued, empty.failed, empty.oldest_queued_at, empty.by_status) == (0, 0, None, {})
    for i in range(5):
        await put(store, f"TM-{i}", now=T0 + i)
    await store.settle("acme", "TM-0", delivered(T0 + 10))
    await fail(store, "TM-1")
    await store.settle("acme", "TM-2", retry_at(T0 + 11, T0 + 20))  # still queued

    stats = await store.stats()

    assert (stats.queued, stats.failed) == (3, 1)
    assert stats.oldest_queued_at == T0 + 2
    assert stats.by_status == {"queued": 3, "failed": 1, "delivered": 1}


async def test_entries_are_listed_most_recently_updated_first(store: OutboxStore) -> None:
    for i in range(4):
        await put(store, f"TM-{i}", now=T0 + i)
    await store.settle("acme", "TM-0", delivered(T0 + 10))
    await fail(store, "TM-2", now=T0 + 11)

    everything = await store.list_entries()
    queued = await store.list_entries(OrderStatus.QUEUED)

    assert [e.reference for e in everything] == ["TM-2", "TM-0", "TM-3", "TM-1"]
    assert [e.status for e in everything][:2] == [OrderStatus.FAILED, OrderStatus.DELIVERED]
    assert [e.reference for e in await store.list_entries(limit=2)] == ["TM-2", "TM-0"]
    assert [e.reference for e in queued] == ["TM-3", "TM-1"]
    assert [e.reference for e in await store.list_entries(OrderStatus.QUEUED, 1)] == ["TM-3"]
    assert await store.list_entries(OrderStatus.REJECTED) == []


async def test_purge_forgets_old_settled_and_failed_orders_but_no_queued_one(
    store: OutboxStore,
) -> None:
    ledger_s = 1000.0
    for reference in ("OLD-DELIVERED", "OLD-FAILED", "OLD-DROPPED", "OLD-QUEUED", "NEW"):
        await put(store, reference)
    await store.settle("acme", "OLD-DELIVERED", delivered(T0 + 1))
    await fail(store, "OLD-FAILED", now=T0 + 1)
    await store.drop("acme", "OLD-DROPPED", T0 + 1)
    await store.settle("acme", "NEW", delivered(T0 + 600))

    assert await store.purge(T0 + 1001, ledger_s) == 0  # updated exactly ledger_s ago: kept
    assert await store.purge(T0 + 1002, ledger_s) == 3

    left = {entry.reference: entry.status for entry in await store.list_entries()}
    assert left == {"NEW": OrderStatus.DELIVERED, "OLD-QUEUED": OrderStatus.QUEUED}
    assert await store.get("acme", "OLD-FAILED") is None
    assert (await store.stats()).by_status == {"queued": 1, "delivered": 1}
    assert references(await store.take_due(T0 + 2000, 60, 10)) == ["OLD-QUEUED"]


# --- SQLite only ---------------------------------------------------------------------------------


async def test_the_old_key_can_be_removed_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    old, new = SecretStr(new_key()), SecretStr(new_key())
    problems = []
    for keys in ([old], [new, old], [new]):  # the README's rotation: new first, then old removed
        store = SqliteOutbox(path, Sealer(keys))
        await store.open()
        problems.append(store.problem)
        await store.close()

    assert problems == [None, None, None]
    wrong = SqliteOutbox(path, Sealer([SecretStr(new_key())]))
    await wrong.open()
    assert wrong.problem is not None and "another key" in wrong.problem


# --- Redis only ---------------------------------------------------------------------------------


@pytest.fixture
async def two_stores(redis_url: str) -> AsyncIterator[tuple[RedisOutbox, RedisOutbox]]:
    """Two stores with their own connection pools: two processes, as far as Redis knows."""
    first, second = RedisOutbox(redis_url), RedisOutbox(redis_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_two_stores_taking_at_once_never_get_the_same_order(
    two_stores: tuple[RedisOutbox, RedisOutbox],
) -> None:
    first, second = two_stores
    count = 60
    for i in range(count):
        await put(first, f"TM-{i}", now=T0 + i / 100)
    now = T0 + LEASE_S + 1

    takes = await asyncio.gather(
        *(store.take_due(now, 60, 7) for _ in range(8) for store in (first, second))
    )

    taken = [reference for take in takes for reference in references(take)]
    assert sorted(taken) == sorted(f"TM-{i}" for i in range(count))  # each once, none lost
    assert {len(take) for take in takes} <= {0, 4, 7}  # 60 = 8 × 7 + 4


async def test_a_lapsed_lease_lets_the_other_process_take_the_order(
    two_stores: tuple[RedisOutbox, RedisOutbox],
) -> None:
    first, second = two_stores
    await put(first)
    now = T0 + LEASE_S
    assert references(await first.take_due(now, 60, 10)) == ["TM-1"]  # then "killed"

    assert await second.take_due(now + 59, 60, 10) == []
    assert references(await second.take_due(now + 60, 60, 10)) == ["TM-1"]


async def test_keys_are_namespaced_and_carry_no_reference(redis_url: str) -> None:
    store = RedisOutbox(redis_url)
    try:
        await store.put(new_order("TM-SECRET-REF"), remember("TM-SECRET-REF"))
        await store.settle("acme", "TM-SECRET-REF", delivered(T0 + 1))
    finally:
        await store.close()

    keys = await all_keys(redis_url)

    assert keys and all(key.startswith(f"{NAMESPACE}:") for key in keys)
    assert not [key for key in keys if "SECRET" in key]
    assert f"{NAMESPACE}:{build_key('acme', 'TM-SECRET-REF')}" in keys


async def test_purge_goes_on_in_batches_until_nothing_old_is_left(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_outbox, "PURGE_BATCH", 2)
    store = RedisOutbox(redis_url)
    try:
        for i in range(5):
            await put(store, f"TM-{i}")
            await store.settle("acme", f"TM-{i}", delivered(T0 + 1))

        assert await store.purge(T0 + 100, 10) == 5
        assert await store.list_entries() == []
    finally:
        await store.close()


async def open_redis(url: str, keys: list[SecretStr], *, owner: bool = True) -> RedisOutbox:
    store = RedisOutbox(url, keys=keys, owner=owner)
    await store.open()
    return store


async def test_replicas_with_the_keys_or_after_a_rotation_open_the_redis_outbox(
    redis_url: str,
) -> None:
    old, new = SecretStr(new_key()), SecretStr(new_key())
    problems = []
    for keys in ([old], [old], [new, old], [new]):  # the README's rotation, replica by replica
        store = await open_redis(redis_url, keys)
        problems.append(store.problem)
        await store.close()

    assert problems == [None, None, None, None]
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.scard(f"{NAMESPACE}:outbox:canaries") == 2  # one per first key
    finally:
        await client.aclose()


async def test_a_replica_with_a_wrong_key_refuses_every_call(redis_url: str) -> None:
    first = await open_redis(redis_url, [SecretStr(new_key())])
    wrong = await open_redis(redis_url, [SecretStr(new_key())])
    try:
        assert first.problem is None and await first.ping()
        assert wrong.problem is not None and "other keys" in wrong.problem
        assert not await wrong.ping()
        with pytest.raises(StateUnavailableError):
            await wrong.put(new_order(), remember())
        with pytest.raises(StateUnavailableError):
            await wrong.claim(build_key("acme", "TM-1"), FP, 60)
        await first.put(new_order(), remember())  # the others go on
    finally:
        await first.close()
        await wrong.close()


async def test_the_cli_leaves_no_canary_and_a_down_redis_skips_the_check(redis_url: str) -> None:
    reader = await open_redis(redis_url, [SecretStr(new_key())], owner=False)
    unreachable = await open_redis(f"redis://127.0.0.1:{free_port()}/0", [SecretStr(new_key())])
    try:
        assert await all_keys(redis_url) == []
        assert reader.problem is None
        assert unreachable.problem is None  # Redis down is answered per call, not for good
    finally:
        await reader.close()
        await unreachable.close()


async def test_every_call_says_state_unavailable_while_redis_is_unreachable() -> None:
    store = RedisOutbox(f"redis://127.0.0.1:{free_port()}/0")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.put(new_order(), remember()),
        lambda: store.take_due(T0, 60, 10),
        lambda: store.settle("acme", "TM-1", delivered(T0)),
        lambda: store.get("acme", "TM-1"),
        lambda: store.list_entries(),
        lambda: store.stats(),
        lambda: store.purge(T0, 10),
    ]
    try:
        for call in calls:
            with pytest.raises(StateUnavailableError):
                await call()
        assert not await store.ping()
    finally:
        await store.close()
