"""The outbox stores' part of section 11, SQLite and Redis held to the same behaviour: a Manager
webhook recorded in one write (dedupe, match, event, callback), and the queue of partner
callbacks taken under a lease."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from conftest import FakeTime
from pydantic import SecretStr
from test_outbox_store import backend  # noqa: F401 - the fixture: one store of each kind
from test_outbox_store import store as store_of_backend
from test_state_redis import all_keys

from gateway.outbox import (
    CallbackMessage,
    IncomingWebhook,
    LedgerEvent,
    NewOrder,
    OrderStatus,
    OutboxStore,
    Remember,
    Settlement,
    WebhookResult,
)
from gateway.outbox.redis import RedisOutbox
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox

KEY = SecretStr(new_key())
NOW = 1_000_000.0


# Every test runs against both stores (SQLite and Redis), as in test_outbox_store.py.
store = store_of_backend


async def delivered(
    store: OutboxStore,
    partner: str,
    reference: str,
    *,
    org_id: str = "org-a",
    manager_id: str | None = None,
    at: float = NOW,
) -> None:
    """An order stored and settled: delivered with ``manager_id``, or still queued (None)."""
    order = NewOrder(partner, reference, org_id, b"sealed", at, at + 30, at + 3600)
    await store.put(order, Remember(f"{partner}:{reference}", "fp", None, 60))
    if manager_id is None:
        settlement = Settlement(OrderStatus.QUEUED, at, next_attempt_at=at + 60, last_error="x")
    else:
        settlement = Settlement(
            OrderStatus.DELIVERED, at, order_request_id=manager_id, manager_status="pending"
        )
    await store.settle(partner, reference, settlement)


def webhook(
    delivery_id: str = "d-1",
    *,
    org_id: str = "org-a",
    manager_id: str | None = "m-1",
    reference: str | None = None,
    status: str | None = "approved",
    now: float = NOW + 10,
    partners: frozenset[str] = frozenset({"alpha"}),
) -> IncomingWebhook:
    return IncomingWebhook(
        delivery_id=delivery_id, org_id=org_id, org_partners=frozenset({"alpha", "beta"}),
        order_request_id=manager_id, reference=reference,
        event=LedgerEvent("order_request_status_updated", status, now - 1), manager_status=status,
        now=now, dedupe_until=now + 3600, callback_partners=partners,
        callback_id=f"msg_{delivery_id}", callback_expires_at=now + 7200,
    )  # fmt: skip


async def test_matched_event_updates_the_order_and_queues_its_callback(store: OutboxStore) -> None:
    await delivered(store, "alpha", "R-1", manager_id="m-1")
    assert await store.record_webhook(webhook()) is WebhookResult.ACCEPTED
    entry = await store.get("alpha", "R-1")
    assert entry is not None
    assert entry.manager_status == "approved"
    assert entry.events == (LedgerEvent("order_request_status_updated", "approved", NOW + 9),)
    assert entry.updated_at == NOW + 10
    [message] = await store.take_due_callbacks(NOW + 10, 30, 10)
    assert message == CallbackMessage(
        id="msg_d-1", partner="alpha", type="order.updated", reference="R-1", status="delivered",
        order_request_id="m-1", manager_status="approved", event="order_request_status_updated",
        created_at=NOW + 10, expires_at=NOW + 7210, attempts=0,
    )  # fmt: skip


async def test_same_delivery_id_is_a_duplicate_until_it_expires(store: OutboxStore) -> None:
    await delivered(store, "alpha", "R-1", manager_id="m-1")
    assert await store.record_webhook(webhook()) is WebhookResult.ACCEPTED
    again = replace(webhook(status="rejected"), now=NOW + 20)
    assert await store.record_webhook(again) is WebhookResult.DUPLICATE
    entry = await store.get("alpha", "R-1")
    assert entry is not None and entry.manager_status == "approved" and len(entry.events) == 1
    assert len(await store.take_due_callbacks(NOW + 30, 30, 10)) == 1
    late = replace(webhook(), now=NOW + 10 + 3601)
    assert await store.record_webhook(late) is WebhookResult.ACCEPTED


async def test_ignored_delivery_is_remembered_too(store: OutboxStore) -> None:
    assert await store.record_webhook(webhook(manager_id="nobody")) is WebhookResult.IGNORED
    assert await store.record_webhook(webhook(manager_id="nobody")) is WebhookResult.DUPLICATE


async def test_events_match_only_within_their_org(store: OutboxStore) -> None:
    await delivered(store, "alpha", "R-1", manager_id="m-1", org_id="org-b")
    await delivered(store, "alpha", "R-2", org_id="org-b")
    assert await store.record_webhook(webhook("d-1")) is WebhookResult.IGNORED
    by_reference = webhook("d-2", manager_id=None, reference="R-2")
    assert await store.record_webhook(by_reference) is WebhookResult.IGNORED


async def test_reference_matches_an_order_without_a_manager_id_and_learns_it(
    store: OutboxStore,
) -> None:
    await delivered(store, "alpha", "R-1")  # queued: Manager's id unknown
    event = webhook(manager_id="m-9", reference="R-1")
    assert await store.record_webhook(event) is WebhookResult.ACCEPTED
    entry = await store.get("alpha", "R-1")
    assert entry is not None
    assert (entry.order_request_id, entry.status) == ("m-9", OrderStatus.QUEUED)


async def test_reference_does_not_match_an_order_with_another_manager_id(
    store: OutboxStore,
) -> None:
    await delivered(store, "alpha", "R-1", manager_id="m-1")
    event = webhook(manager_id="m-2", reference="R-1")
    assert await store.record_webhook(event) is WebhookResult.IGNORED


async def test_reference_alone_matches_the_most_recently_updated_order(store: OutboxStore) -> None:
    await delivered(store, "beta", "R-1", manager_id="m-b", at=NOW + 1)
    await delivered(store, "alpha", "R-1", manager_id="m-a", at=NOW)
    event = webhook(manager_id=None, reference="R-1", partners=frozenset({"alpha", "beta"}))
    assert await store.record_webhook(event) is WebhookResult.ACCEPTED
    [message] = await store.take_due_callbacks(NOW + 20, 30, 10)
    assert message.partner == "beta"


async def test_partner_without_callbacks_gets_no_message(store: OutboxStore) -> None:
    await delivered(store, "alpha", "R-1", manager_id="m-1")
    assert await store.record_webhook(webhook(partners=frozenset())) is WebhookResult.ACCEPTED
    assert await store.take_due_callbacks(NOW + 20, 30, 10) == []


async def test_event_without_new_status_keeps_manager_status(store: OutboxStore) -> None:
    await delivered(store, "alpha", "R-1", manager_id="m-1")
    await store.record_webhook(webhook(status=None))
    entry = await store.get("alpha", "R-1")
    assert entry is not None and entry.manager_status == "pending"
    assert entry.events[0].status is None


def message(message_id: str = "msg_1", created_at: float = NOW) -> CallbackMessage:
    return CallbackMessage(
        id=message_id, partner="alpha", type="order.delivered", reference="R-1",
        status="delivered", order_request_id="m-1", manager_status="pending", event=None,
        created_at=created_at, expires_at=created_at + 3600,
    )  # fmt: skip


async def test_callbacks_are_leased_retried_and_forgotten(store: OutboxStore) -> None:
    await store.put_callback(message())
    await store.put_callback(message("msg_2", NOW + 5))
    [first] = await store.take_due_callbacks(NOW, 30, 10)
    assert first.id == "msg_1"
    assert await store.take_due_callbacks(NOW + 29, 30, 10) == [message("msg_2", NOW + 5)]
    await store.settle_callback("msg_2", NOW + 29, None)  # delivered
    # msg_1's lease lapses: due again; its sender died.
    [again] = await store.take_due_callbacks(NOW + 31, 30, 10)
    assert again.id == "msg_1"
    await store.settle_callback("msg_1", NOW + 31, NOW + 100)
    assert await store.take_due_callbacks(NOW + 99, 1, 10) == []
    [retried] = await store.take_due_callbacks(NOW + 100, 30, 10)
    assert (retried.id, retried.attempts) == ("msg_1", 1)
    await store.settle_callback("msg_1", NOW + 100, None)
    assert await store.take_due_callbacks(NOW + 10_000, 30, 10) == []


async def test_same_message_queued_twice_is_kept_once(store: OutboxStore) -> None:
    await store.put_callback(message())
    await store.put_callback(message())
    assert len(await store.take_due_callbacks(NOW, 30, 10)) == 1


async def test_take_due_callbacks_honours_the_limit(store: OutboxStore) -> None:
    for i in range(5):
        await store.put_callback(message(f"msg_{i}", NOW + i))
    taken = await store.take_due_callbacks(NOW + 10, 30, 3)
    assert [m.id for m in taken] == ["msg_0", "msg_1", "msg_2"]


async def test_purge_keeps_delivery_ids_within_their_time(store: OutboxStore) -> None:
    await store.record_webhook(webhook(manager_id="x"))
    await store.purge(NOW + 20, 0)
    again = replace(webhook(manager_id="x"), now=NOW + 30)
    assert await store.record_webhook(again) is WebhookResult.DUPLICATE


async def test_sqlite_purge_deletes_expired_delivery_ids(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    # Redis lets the key expire by itself; the SQLite file is cleaned by the deliverer's purge.
    outbox = SqliteOutbox(tmp_path / "outbox.db", Sealer([KEY]), clock=fake_time.clock)
    await outbox.open()
    try:
        await outbox.record_webhook(webhook(manager_id="x"))
        await outbox.purge(NOW + 10 + 3601, 86400)
    finally:
        await outbox.close()
    with sqlite3.connect(tmp_path / "outbox.db") as connection:
        assert connection.execute("SELECT count(*) FROM webhook_deliveries").fetchone() == (0,)


async def test_callbacks_leased_at_a_crash_are_due_again_at_start(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    fake_time.now = NOW
    path = tmp_path / "outbox.db"
    first = SqliteOutbox(path, Sealer([KEY]), clock=fake_time.clock)
    await first.open()
    await first.put_callback(message())
    assert len(await first.take_due_callbacks(NOW, 600, 10)) == 1
    await first.close()  # as if killed: the lease was never settled
    fake_time.now = NOW + 5
    second = SqliteOutbox(path, Sealer([KEY]), clock=fake_time.clock)
    await second.open()
    try:
        [again] = await second.take_due_callbacks(NOW + 5, 600, 10)
        assert again.id == "msg_1"
    finally:
        await second.close()


async def test_orders_of_partners_outside_the_org_are_not_matched(store: OutboxStore) -> None:
    # "gamma" is no partner of org-a's shops (any more): its order is not this event's.
    await delivered(store, "gamma", "R-1", manager_id="m-1")
    assert await store.record_webhook(webhook("d-1")) is WebhookResult.IGNORED
    by_reference = webhook("d-2", manager_id=None, reference="R-1")
    assert await store.record_webhook(by_reference) is WebhookResult.IGNORED


async def test_redis_forgets_the_manager_id_with_its_order(redis_url: str) -> None:
    store = RedisOutbox(redis_url)
    try:
        await delivered(store, "alpha", "R-1", manager_id="m-1")
        assert any(":outbox:manager-id:" in key for key in await all_keys(redis_url))
        await store.purge(NOW + 10, 1)
        assert not any(":outbox:manager-id:" in key for key in await all_keys(redis_url))
        assert await store.record_webhook(webhook()) is WebhookResult.IGNORED
    finally:
        await store.close()


async def test_redis_delivery_ids_and_callbacks_leave_no_customer_data(redis_url: str) -> None:
    store = RedisOutbox(redis_url)
    try:
        await delivered(store, "alpha", "Erika Musterfrau", manager_id="m-1")
        await store.record_webhook(webhook(reference="Erika Musterfrau"))
        keys = await all_keys(redis_url)
        assert all("Erika" not in key for key in keys)  # references are hashed in key names
        assert any(":outbox:callback:" in key for key in keys)
    finally:
        await store.close()
