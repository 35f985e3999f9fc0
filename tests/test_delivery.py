"""Idempotent delivery and rate limits, end to end: gateway app → real HTTP → Manager sandbox.

Contract section 6: ``(partner, external_reference)`` names an order; a repeat with the same
canonical body replays the first success without a second upstream call, a different body is
``409 idempotency_conflict``, a repeat while the first is in flight is ``409 request_in_progress``,
and failed attempts are not remembered.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import SlowManager
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import Seams, create_app
from gateway.auth import hash_key
from gateway.config import Config, parse_config
from gateway.sandbox import DEMO_ORG_KEY, SANDBOX_KEY, Fault, SandboxState, create_sandbox_app

Client = TestClient[web.Request, web.Application]

ORDER_PATH = "/api/v1/external-order"
KEY_A = "alpha-partner-key-0123456789abcdef"
KEY_B = "beta-partner-key-fedcba9876543210"
TTL_HOURS = 24
START = 5000.0


def config_toml(base_url: str) -> str:
    return f"""
[server]
admin_port = 0

[manager]
base_url = "{base_url}"
api = "v2"
timeout_s = 5
retries = 1

[shops.demo]
org_id = "demo-org"
shop_id = "demo-shop"
manager_key_env = "ORG_KEY"

[partners.alpha]
shop = "demo"
key_sha256 = "{hash_key(KEY_A)}"

[partners.beta]
shop = "demo"
key_sha256 = "{hash_key(KEY_B)}"
rate_per_min = 2

[idempotency]
ttl_hours = {TTL_HOURS}
"""


def make_config(base_url: str) -> Config:
    return parse_config(config_toml(base_url), environ={"ORG_KEY": DEMO_ORG_KEY})


async def _no_sleep(_seconds: float) -> None:
    return None


def order(reference: str | None = "POS-123", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": "test",
        "customer_name": "Max Mustermann",
        "customer_email": "max@example.com",
        "items": [{"name": "Ibuprofen 400", "quantity": 2, "price": 4.5}],
    }
    if reference is not None:
        body["external_reference"] = reference
    body.update(changes)
    return body


class Answer:
    def __init__(self, status: int, raw: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.raw = raw
        self.headers = headers

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"


async def post(
    client: Client,
    body: dict[str, Any] | str,
    *,
    key: str = KEY_A,
    headers: dict[str, str] | None = None,
) -> Answer:
    text = body if isinstance(body, str) else json.dumps(body)
    all_headers = {"apikey": key, "Content-Type": "application/json", **(headers or {})}
    async with client.post(ORDER_PATH, data=text.encode(), headers=all_headers) as response:
        return Answer(response.status, await response.read(), dict(response.headers))


class MonotonicClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def monotonic() -> MonotonicClock:
    return MonotonicClock()


@pytest.fixture
async def sandbox(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(create_sandbox_app())


@pytest.fixture
def manager(sandbox: TestServer) -> SandboxState:
    return sandbox.app[SANDBOX_KEY]


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, sandbox: TestServer, monotonic: MonotonicClock
) -> Client:
    config = make_config(f"http://127.0.0.1:{sandbox.port}")
    seams = Seams(monotonic=monotonic, sleep=_no_sleep, rand=lambda: 0.0)
    return await aiohttp_client(create_app(config, seams))


# replay


async def test_same_body_twice_is_replayed(client: Client, manager: SandboxState) -> None:
    first = await post(client, order())
    second = await post(client, order())
    assert first.status == second.status == 200
    assert first.json["status"] == "pending"
    assert first.json["external_reference"] == "POS-123"
    assert second.raw == first.raw
    assert not first.replayed
    assert second.replayed
    assert len(manager.received) == 1
    assert manager.order_request_attempts == 1


async def test_replay_answers_every_repeat(client: Client, manager: SandboxState) -> None:
    first = await post(client, order())
    repeats = [await post(client, order()) for _ in range(3)]
    assert all(r.status == 200 and r.replayed and r.raw == first.raw for r in repeats)
    assert len(manager.received) == 1


async def test_replay_keeps_content_type_and_request_id(client: Client) -> None:
    await post(client, order())
    second = await post(client, order(), headers={"X-Request-ID": "replay-1"})
    assert second.headers["Content-Type"].startswith("application/json")
    assert second.headers["X-Request-ID"] == "replay-1"


async def test_key_order_and_whitespace_do_not_matter(
    client: Client, manager: SandboxState
) -> None:
    first = await post(client, json.dumps(order()))
    reordered = dict(reversed(list(order().items())))
    reordered["items"] = [{"price": 4.5, "quantity": 2, "name": "Ibuprofen 400"}]
    second = await post(client, json.dumps(reordered, indent=4, separators=(" ,  ", " :  ")))
    assert second.status == 200
    assert second.replayed
    assert second.raw == first.raw
    assert len(manager.received) == 1


async def test_normalized_equivalents_replay(client: Client, manager: SandboxState) -> None:
    # The fingerprint is of the canonical envelope: "2" and 2, qty and quantity are the same order.
    first = await post(client, order())
    second = await post(
        client, order(items=[{"name": "Ibuprofen 400", "qty": "2", "price": "4.5"}])
    )
    assert second.status == 200
    assert second.replayed
    assert second.raw == first.raw
    assert len(manager.received) == 1


async def test_envelope_and_flat_shape_of_one_order_replay(
    client: Client, manager: SandboxState
) -> None:
    flat = order()
    payload = {k: v for k, v in flat.items() if k not in ("external_reference", "source")}
    envelope = {"external_reference": "POS-123", "source": "test", "payload": payload}
    first = await post(client, flat)
    second = await post(client, envelope)
    assert (second.status, second.replayed, second.raw) == (200, True, first.raw)
    assert len(manager.received) == 1


# conflict


async def test_same_reference_other_body_is_conflict(client: Client, manager: SandboxState) -> None:
    first = await post(client, order())
    conflict = await post(client, order(customer_name="Erika Mustermann"))
    assert conflict.status == 409
    assert conflict.json["error"] == "idempotency_conflict"
    assert conflict.json["request_id"] == conflict.headers["X-Request-ID"]
    assert conflict.headers["Content-Type"].startswith("application/json")
    assert not conflict.replayed
    assert len(manager.received) == 1
    # the original body still replays after a conflict
    again = await post(client, order())
    assert (again.status, again.replayed, again.raw) == (200, True, first.raw)
    assert len(manager.received) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"items": [{"name": "Ibuprofen 400", "quantity": 3, "price": 4.5}]},
        {"source": "other-source"},
        {"note": "ring twice"},
        {"prescription_pdf_url": "https://docs.example/rx.pdf"},
    ],
    ids=["quantity", "source", "added-field", "added-url"],
)
async def test_any_body_change_is_a_conflict(
    client: Client, manager: SandboxState, changes: dict[str, Any]
) -> None:
    assert (await post(client, order())).status == 200
    conflict = await post(client, order(**changes))
    assert (conflict.status, conflict.json["error"]) == (409, "idempotency_conflict")
    assert len(manager.received) == 1


# in progress, under concurrency, against a scripted slow Manager


async def wait_for_answers(tasks: list[asyncio.Task[Answer]], count: int) -> None:
    """Wait (at most 5 s) until ``count`` of ``tasks`` have their answer."""
    async with asyncio.timeout(5):
        pending = set(tasks)
        while len(tasks) - len(pending) < count:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)


async def test_concurrent_repeats_are_in_progress_then_replayed(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    fake = SlowManager()
    upstream = await aiohttp_server(fake.app())
    client = await aiohttp_client(
        create_app(make_config(f"http://127.0.0.1:{upstream.port}"), Seams(sleep=_no_sleep))
    )
    tasks = [asyncio.create_task(post(client, order())) for _ in range(10)]
    try:
        await wait_for_answers(tasks, 9)
        await asyncio.wait_for(fake.called.wait(), 5)  # the owner may still be fetching a token
        assert fake.calls == 1
        done = [t.result() for t in tasks if t.done()]
        assert all(a.status == 409 for a in done), [a.status for a in done]
        assert {a.json["error"] for a in done} == {"request_in_progress"}
        assert not any(a.replayed for a in done)
        fake.release.set()
        (owner,) = [await t for t in tasks if not t.done()]
    finally:
        fake.release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert owner.status == 200
    assert owner.json["id"] == "fake-1"
    assert not owner.replayed
    repeat = await post(client, order())
    assert (repeat.status, repeat.replayed, repeat.raw) == (200, True, owner.raw)
    assert fake.calls == 1
    assert fake.token_calls == 1


async def test_in_progress_with_other_body_is_conflict(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    fake = SlowManager()
    upstream = await aiohttp_server(fake.app())
    client = await aiohttp_client(
        create_app(make_config(f"http://127.0.0.1:{upstream.port}"), Seams(sleep=_no_sleep))
    )
    first = asyncio.create_task(post(client, order()))
    try:
        await asyncio.wait_for(fake.called.wait(), 5)
        other = await post(client, order(customer_name="Erika Mustermann"))
        assert (other.status, other.json["error"]) == (409, "idempotency_conflict")
    finally:
        fake.release.set()
    assert (await first).status == 200
    assert fake.calls == 1


# failures are not remembered


async def test_upstream_failure_is_not_remembered(client: Client, manager: SandboxState) -> None:
    manager.faults.append(Fault(500))
    failed = await post(client, order())
    assert failed.status == 502
    assert failed.json["error"] == "upstream_unavailable"
    assert manager.received == []
    retried = await post(client, order())
    assert retried.status == 200
    assert not retried.replayed
    assert len(manager.received) == 1
    assert manager.order_request_attempts == 2


async def test_after_a_failure_another_body_may_take_the_reference(
    client: Client, manager: SandboxState
) -> None:
    manager.faults.append(Fault(500))
    assert (await post(client, order())).status == 502
    changed = await post(client, order(customer_name="Erika Mustermann"))
    assert changed.status == 200
    assert manager.received[0]["envelope"]["payload"]["customer_name"] == "Erika Mustermann"


async def test_upstream_rejection_is_not_remembered(client: Client, manager: SandboxState) -> None:
    manager.faults.append(Fault(422, body={"error": "validation_error", "message": "no"}))
    rejected = await post(client, order())
    assert (rejected.status, rejected.json["error"]) == (422, "upstream_rejected")
    retried = await post(client, order())
    assert (retried.status, retried.replayed) == (200, False)
    assert len(manager.received) == 1


async def test_exhausted_retries_are_not_remembered(client: Client, manager: SandboxState) -> None:
    manager.faults.extend([Fault(503), Fault(503)])  # retries = 1: two attempts, both 503
    failed = await post(client, order())
    assert (failed.status, failed.json["error"]) == (502, "upstream_unavailable")
    assert manager.order_request_attempts == 2
    retried = await post(client, order())
    assert (retried.status, retried.replayed) == (200, False)
    assert len(manager.received) == 1


async def test_validation_failure_is_not_remembered(client: Client, manager: SandboxState) -> None:
    invalid = await post(client, order(items=[{"name": "Ibuprofen 400", "quantity": 0}]))
    assert (invalid.status, invalid.json["error"]) == (422, "validation_failed")
    valid = await post(client, order())
    assert (valid.status, valid.replayed) == (200, False)
    assert len(manager.received) == 1
    assert manager.order_request_attempts == 1


# scope: per partner


async def test_references_are_scoped_per_partner(client: Client, manager: SandboxState) -> None:
    a = await post(client, order(), key=KEY_A)
    b = await post(client, order(customer_name="Erika Mustermann"), key=KEY_B)
    assert (a.status, b.status) == (200, 200)
    assert not a.replayed and not b.replayed
    assert a.json["id"] != b.json["id"]
    assert len(manager.received) == 2
    names = [r["envelope"]["payload"]["customer_name"] for r in manager.received]
    assert names == ["Max Mustermann", "Erika Mustermann"]


async def test_same_body_from_two_partners_is_two_orders(
    client: Client, manager: SandboxState
) -> None:
    a = await post(client, order(), key=KEY_A)
    b = await post(client, order(), key=KEY_B)
    assert not b.replayed
    assert a.json["id"] != b.json["id"]
    assert len(manager.received) == 2


# Idempotency-Key header


async def test_idempotency_key_header_is_the_reference(
    client: Client, manager: SandboxState
) -> None:
    first = await post(client, order(None), headers={"Idempotency-Key": "idem-key-42"})
    assert first.status == 200
    assert first.json["external_reference"] == "idem-key-42"
    assert manager.received[0]["envelope"]["external_reference"] == "idem-key-42"
    second = await post(client, order(None), headers={"Idempotency-Key": "idem-key-42"})
    assert (second.status, second.replayed, second.raw) == (200, True, first.raw)
    assert len(manager.received) == 1


async def test_idempotency_key_header_conflict(client: Client, manager: SandboxState) -> None:
    await post(client, order(None), headers={"Idempotency-Key": "idem-key-42"})
    other = await post(
        client, order(None, customer_name="Erika"), headers={"Idempotency-Key": "idem-key-42"}
    )
    assert (other.status, other.json["error"]) == (409, "idempotency_conflict")
    assert len(manager.received) == 1


async def test_idempotency_key_and_body_reference_are_one_order(
    client: Client, manager: SandboxState
) -> None:
    first = await post(client, order(None), headers={"Idempotency-Key": "POS-123"})
    second = await post(client, order("POS-123"))
    assert (second.status, second.replayed, second.raw) == (200, True, first.raw)
    assert len(manager.received) == 1


async def test_without_reference_every_request_is_a_new_order(
    client: Client, manager: SandboxState
) -> None:
    first = await post(client, order(None))
    second = await post(client, order(None))
    assert (first.status, second.status) == (200, 200)
    assert not second.replayed
    refs = [r["envelope"]["external_reference"] for r in manager.received]
    assert len(set(refs)) == 2
    assert all(str(ref).startswith("alpha-") for ref in refs)


# expiry


async def test_reference_is_forgotten_after_ttl(
    client: Client, manager: SandboxState, monotonic: MonotonicClock
) -> None:
    await post(client, order())
    monotonic.now += TTL_HOURS * 3600 - 5
    assert (await post(client, order())).replayed
    monotonic.now += 10
    later = await post(client, order(customer_name="Erika Mustermann"))
    assert (later.status, later.replayed) == (200, False)
    assert len(manager.received) == 2


# rate limit


async def test_rate_limit(client: Client, manager: SandboxState, monotonic: MonotonicClock) -> None:
    assert (await post(client, order("B-1"), key=KEY_B)).status == 200
    assert (await post(client, order("B-2"), key=KEY_B)).status == 200
    limited = await post(client, order("B-3"), key=KEY_B)
    assert limited.status == 429
    assert limited.json["error"] == "rate_limited"
    retry_after = limited.headers["Retry-After"]
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 31
    assert len(manager.received) == 2
    # the other partner is not affected
    for i in range(5):
        assert (await post(client, order(f"A-{i}"), key=KEY_A)).status == 200
    assert len(manager.received) == 7
    # still limited a moment later; one more after the bucket refilled one request
    monotonic.now += 1
    assert (await post(client, order("B-3"), key=KEY_B)).status == 429
    monotonic.now += 30
    assert (await post(client, order("B-3"), key=KEY_B)).status == 200
    assert (await post(client, order("B-4"), key=KEY_B)).status == 429
    # rate-limited requests never reached Manager
    assert manager.order_request_attempts == len(manager.received) == 8
    refs = [r["envelope"]["external_reference"] for r in manager.received]
    assert refs.count("B-3") == 1
    assert "B-4" not in refs


async def test_rate_limit_counts_replays_too(client: Client, manager: SandboxState) -> None:
    # The limit is checked before the body is read: a replay costs a request like any other.
    await post(client, order(), key=KEY_B)
    assert (await post(client, order(), key=KEY_B)).replayed
    assert (await post(client, order(), key=KEY_B)).status == 429
    assert len(manager.received) == 1


async def test_rate_limited_answer_shape(client: Client) -> None:
    for i in range(2):
        await post(client, order(f"B-{i}"), key=KEY_B)
    limited = await post(client, order("B-9"), key=KEY_B, headers={"X-Request-ID": "rl-1"})
    assert limited.headers["Content-Type"].startswith("application/json")
    assert limited.json == {
        "error": "rate_limited",
        "message": limited.json["message"],
        "request_id": "rl-1",
    }
    assert KEY_B not in limited.raw.decode()
