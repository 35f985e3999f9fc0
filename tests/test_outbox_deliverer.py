"""The outbox's deliverer and inline attempt against each real store (SQLite, Redis) and a
scripted Manager.

Time is a fake clock moved by hand; Manager is a FakeManager on loopback answering scripted
statuses; ``run_once`` is called directly (no background loop).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import FakeTime, StartFakeManager
from pydantic import SecretStr

from gateway.callbacks import settled_message_id
from gateway.config import ManagerConfig, OutboxConfig
from gateway.errors import UpstreamRejectedError
from gateway.ledger import build_status, to_iso
from gateway.manager import ManagerClient, UpstreamTarget
from gateway.observability import Metrics
from gateway.outbox import LedgerEntry, NewOrder, OrderStatus, OutboxStore, Remember
from gateway.outbox.deliverer import (
    Outbox,
    build_queued_reply,
    build_status_path,
    parse_manager_reply,
)
from gateway.outbox.redis import RedisOutbox
from gateway.outbox.sealing import Sealer, new_key
from gateway.outbox.sqlite import SqliteOutbox
from gateway.retry import order_retry_delay, outbox_delay

KEY = SecretStr(new_key())
TARGET = UpstreamTarget(org_id="demo-org", api="v1", key="org-key")
BODY = b'{"external_reference":"R-1","payload":{"shop_id":"s"},"source":"acme"}'


@dataclass
class Rig:
    outbox: Outbox
    store: OutboxStore
    manager: ManagerClient
    metrics: Metrics
    settled: list[LedgerEntry]
    base_url: str


@pytest.fixture(params=["sqlite", "redis"])
async def rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fake_time: FakeTime,
    start_fake_manager: StartFakeManager,
) -> AsyncIterator[tuple[Rig, list[int]]]:
    statuses: list[int] = []
    fake, base_url = await start_fake_manager(statuses)
    metrics = Metrics()
    store: OutboxStore
    if request.param == "sqlite":
        store = SqliteOutbox(tmp_path / "outbox.db", Sealer([KEY]), clock=fake_time.clock)
        await store.open()
    else:
        store = RedisOutbox(request.getfixturevalue("redis_url"))
    config = OutboxConfig(enabled=True, retry_min_s=10, retry_max_s=40, max_age_hours=1)
    outbox = Outbox(
        store, Sealer([KEY]), config, metrics=metrics, clock=fake_time.clock, rand=lambda: 0.5
    )
    settled: list[LedgerEntry] = []

    async def remember(entry: LedgerEntry) -> None:
        settled.append(entry)

    outbox.on_settled = remember
    async with aiohttp.ClientSession() as session:
        manager = ManagerClient(
            session,
            ManagerConfig(base_url=base_url, api="v1", timeout_s=5, retries=0),
            metrics=metrics,
            clock=fake_time.clock,
            sleep=fake_time.sleep,
            rand=lambda: 0.5,
        )
        yield Rig(outbox, store, manager, metrics, settled, base_url), fake.statuses
    await store.close()


async def store_order(rig: Rig, now: float, reference: str = "R-1") -> None:
    await rig.store.put(
        NewOrder("acme", reference, "demo-org", rig.outbox.sealer.seal(BODY), now, now, now + 3600),
        Remember(f"k-{reference}", "fp", build_queued_reply(reference, "rid"), 3600),
    )


def count(metrics: Metrics, result: str) -> float:
    return metrics.outbox_deliveries.labels(result=result)._value.get()


async def test_a_due_order_is_delivered_with_managers_id_and_the_hook_is_told(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, _ = rig
    await store_order(r, fake_time.now)
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 1
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.DELIVERED
    assert (entry.order_request_id, entry.manager_status, entry.attempts) == (
        "fake-1",
        "pending",
        1,
    )
    assert [e.status for e in r.settled] == [OrderStatus.DELIVERED]
    assert count(r.metrics, "delivered") == 1
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 0  # nothing left


async def test_a_transient_failure_backs_off_then_delivers(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, statuses = rig
    statuses.extend([503, 503])
    await store_order(r, fake_time.now)
    await r.outbox.run_once({"acme": TARGET}, r.manager)
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.QUEUED
    assert (entry.attempts, entry.last_error) == (1, "upstream_unavailable")
    fake_time.now += 9.9  # the first retry comes after retry_min_s (10 s, jitter 0 at rand 0.5)
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 0
    fake_time.now += 0.2
    # 503 again: the order has waited 10.1 s, so it waits about as long again (the waits double)
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 1
    fake_time.now += 10.0
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 0
    fake_time.now += 0.2
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 1
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.DELIVERED and entry.attempts == 3
    assert count(r.metrics, "retried") == 2 and r.settled[-1].status is OrderStatus.DELIVERED
    assert len(r.settled) == 1  # retries are not news for the partner


async def test_a_rejected_order_is_never_sent_again(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, statuses = rig
    statuses.append(422)
    await store_order(r, fake_time.now)
    await r.outbox.run_once({"acme": TARGET}, r.manager)
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.REJECTED
    assert entry.last_error == "upstream_rejected"
    fake_time.now += 10_000
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 0
    assert (await r.store.stats()).by_status == {"rejected": 1}


async def test_an_order_past_its_max_age_fails_and_keeps_its_body(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, statuses = rig
    statuses.extend([503] * 10)
    await store_order(r, fake_time.now)
    await r.outbox.run_once({"acme": TARGET}, r.manager)
    fake_time.now += 3600  # max_age_hours = 1
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 1
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.FAILED
    assert entry.last_error == "upstream_unavailable" and entry.attempts == 1
    assert count(r.metrics, "failed") == 1 and r.settled[-1].status is OrderStatus.FAILED
    assert await r.store.requeue("acme", "R-1", fake_time.now, fake_time.now + 60)
    statuses.clear()
    assert await r.outbox.run_once({"acme": TARGET}, r.manager) == 1  # the body was kept
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.DELIVERED


async def test_an_order_whose_partner_is_gone_waits_instead_of_being_lost(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, _ = rig
    await store_order(r, fake_time.now)
    await r.outbox.run_once({}, r.manager)
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.QUEUED
    assert (entry.attempts, entry.last_error) == (0, "internal_error")
    fake_time.now += 11
    await r.outbox.run_once({"acme": TARGET}, r.manager)  # the partner is back after a reload
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.DELIVERED


async def test_inline_attempt_answers_202_when_manager_cannot_take_it(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, statuses = rig
    statuses.append(503)
    stored = await r.outbox.forward(
        partner="acme", reference="R-1", target=TARGET, body=BODY,
        send=r.manager.send_order_request, key="k", fingerprint="fp", ttl_s=60, lease_s=30,
        request_id="rid-1",
    )  # fmt: skip
    assert stored.queued and stored.reply.status == 202
    assert json.loads(stored.reply.body) == {
        "status": "queued",
        "external_reference": "R-1",
        "message": json.loads(stored.reply.body)["message"],
        "request_id": "rid-1",
    }
    claim = await r.store.claim("k", "fp", 30)
    assert claim.reply == stored.reply  # replayed as the 202 it was


async def test_inline_rejection_forgets_the_order_for_a_corrected_retry(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, statuses = rig
    statuses.append(400)
    with pytest.raises(UpstreamRejectedError):
        await r.outbox.forward(
            partner="acme", reference="R-1", target=TARGET, body=BODY,
            send=r.manager.send_order_request, key="k", fingerprint="fp", ttl_s=60, lease_s=30,
            request_id=None,
        )  # fmt: skip
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.status is OrderStatus.REJECTED
    assert (await r.store.claim("k", "other-body", 30)).reply is None  # free to be sent again


async def test_refreshed_metrics_show_depth_and_the_oldest_age(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, _ = rig
    await store_order(r, fake_time.now)
    fake_time.now += 42
    await r.outbox.refresh_metrics()
    assert r.metrics.outbox_depth.labels(status="queued")._value.get() == 1
    assert r.metrics.outbox_oldest._value.get() == 42


@pytest.mark.parametrize(
    ("waited", "rand", "expected"),
    [
        (0, 0.5, 5.0),
        (3, 0.5, 5.0),
        (10, 0.5, 10.0),
        (16, 0.0, 12.8),
        (20, 1.0, 24.0),
        (900, 1.0, 60.0),
    ],
)
def test_a_stored_order_waits_about_as_long_again_as_it_has_waited(
    waited: float, rand: float, expected: float
) -> None:
    assert order_retry_delay(waited, 5, 60, lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("attempts", "rand", "expected"),
    [(1, 0.5, 5.0), (2, 0.5, 10.0), (3, 0.0, 16.0), (3, 1.0, 24.0), (9, 1.0, 60.0), (0, 0.5, 5.0)],
)
def test_outbox_delay_doubles_from_min_to_max_with_jitter(
    attempts: int, rand: float, expected: float
) -> None:
    assert outbox_delay(attempts, 5, 60, lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": "m-1", "status": "pending"}', ("m-1", "pending")),
        (b'{"id": 7, "status": null}', (None, None)),
        (b"[1]", (None, None)),
        (b"not json", (None, None)),
    ],
)
def test_managers_id_and_status_are_taken_only_when_they_are_strings(
    body: bytes, expected: tuple[str | None, str | None]
) -> None:
    assert parse_manager_reply(body) == expected


def test_status_paths_keep_the_reference_as_one_segment() -> None:
    assert build_status_path("TM/1 ü") == "/api/v1/external-order/TM%2F1%20%C3%BC"


def test_status_document_has_the_contracts_fields_and_utc_times() -> None:
    entry = LedgerEntry("acme", "R-1", "org", OrderStatus.QUEUED, 2, 0.0, 61.5)
    document = build_status(entry)
    assert document == {
        "external_reference": "R-1",
        "status": "queued",
        "order_request_id": None,
        "manager_status": None,
        "attempts": 2,
        "last_error": None,
        "created_at": "1970-01-01T00:00:00Z",
        "updated_at": "1970-01-01T00:01:01Z",
        "events": [],
    }
    assert to_iso(1_764_669_600) == "2025-12-02T10:00:00Z"


async def test_the_partners_news_is_stored_before_the_order_is_settled(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    # A crash between the two writes then leaves the order queued (it is sent again), never a
    # settled order whose callback was lost.
    r, _ = rig
    seen: list[OrderStatus | None] = []

    async def look(entry: LedgerEntry) -> None:
        stored = await r.store.get(entry.partner, entry.reference)
        seen.append(stored.status if stored else None)
        r.settled.append(entry)

    r.outbox.on_settled = look
    await store_order(r, fake_time.now)
    await r.outbox.run_once({"acme": TARGET}, r.manager)
    assert seen == [OrderStatus.QUEUED]
    announced = r.settled[-1]
    assert (announced.status, announced.order_request_id, announced.attempts) == (
        OrderStatus.DELIVERED,
        "fake-1",
        1,
    )


def test_a_settled_orders_callback_id_is_the_same_each_time_it_is_made() -> None:
    entry = LedgerEntry("acme", "R-1", "org", OrderStatus.DELIVERED, 1, 100.0, 120.0)
    again = LedgerEntry("acme", "R-1", "org", OrderStatus.DELIVERED, 2, 100.0, 150.0)
    assert settled_message_id(entry) == settled_message_id(again)
    assert settled_message_id(entry).startswith("msg_")
    other_news = LedgerEntry("acme", "R-1", "org", OrderStatus.FAILED, 1, 100.0, 120.0)
    later_order = LedgerEntry("acme", "R-1", "org", OrderStatus.DELIVERED, 1, 200.0, 220.0)
    assert settled_message_id(other_news) != settled_message_id(entry)
    assert settled_message_id(later_order) != settled_message_id(entry)


async def test_attempts_count_every_request_to_order_requests_quick_retries_included(
    rig: tuple[Rig, list[int]], fake_time: FakeTime
) -> None:
    r, statuses = rig
    statuses.extend([503, 502, 503])
    manager = r.manager.with_config(
        ManagerConfig(base_url=r.base_url, api="v1", timeout_s=5, retries=2)
    )
    stored = await r.outbox.forward(
        partner="acme", reference="R-1", target=TARGET, body=BODY,
        send=manager.send_order_request, key="k", fingerprint="fp", ttl_s=60, lease_s=30,
        request_id=None,
    )  # fmt: skip
    assert stored.queued
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and entry.attempts == 3  # one attempt: three requests
    fake_time.now += 11
    await r.outbox.run_once({"acme": TARGET}, manager)
    entry = await r.store.get("acme", "R-1")
    assert entry is not None and (entry.status, entry.attempts) == (OrderStatus.DELIVERED, 4)
