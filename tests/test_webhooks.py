"""Manager's webhooks in (contract section 11): signature, dedupe, matching, recording.

Pure functions first; then end to end through real HTTP: the gateway app (outbox and webhooks on)
in front of the Manager sandbox, with a partner's callback receiver on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeTime, assert_error, flat_order, read_reply
from pytest_aiohttp import AiohttpClient, AiohttpServer
from webhook_kit import (
    ALPHA_WHSEC,
    KEYS,
    MAIN_SECRET,
    ORDER_PATH,
    OTHER_ORG,
    OTHER_SECRET,
    WEBHOOK_PATH,
    Receiver,
    manager_event,
    sign,
    verify,
    webhooks_config,
)

from gateway.app import Seams, create_app
from gateway.errors import InvalidJsonError, InvalidSignatureError
from gateway.gateway import GATEWAY_KEY, Gateway
from gateway.observability import Metrics
from gateway.sandbox import DEMO_ORG_ID, SANDBOX_KEY, SandboxState, create_sandbox_app
from gateway.webhooks import (
    build_delivery_key,
    find_signing_orgs,
    parse_event,
    parse_signature,
    parse_timestamp,
)

Client = TestClient[web.Request, web.Application]
SECRETS = ((DEMO_ORG_ID, MAIN_SECRET.encode()), (OTHER_ORG, OTHER_SECRET.encode()))
BODY = b'{"org_id": "demo-org"}'
HEX = hmac.new(MAIN_SECRET.encode(), BODY, hashlib.sha256).hexdigest()


# --- pure: the signature ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "orgs"),
    [
        (f"sha256={HEX}", {DEMO_ORG_ID}),
        (f"sha256={HEX.upper()}", {DEMO_ORG_ID}),  # hex case carries no information
        (f"SHA256={HEX}", {DEMO_ORG_ID}),
        (f"  sha256={HEX} ", {DEMO_ORG_ID}),
        (None, set()),
        ("", set()),
        (HEX, set()),  # no scheme
        (f"sha1={HEX}", set()),
        (f"sha256={HEX[:-2]}", set()),  # truncated
        (f"sha256={HEX}00", set()),  # too long
        (f"sha256={HEX[:-1]}g", set()),  # not hex
        (f"sha256={'0' * 64}", set()),  # wrong
        (f"sha256={HEX},sha256={HEX}", set()),
    ],
)
def test_signature_verifies_only_the_exact_hmac(header: str | None, orgs: set[str]) -> None:
    assert find_signing_orgs(BODY, header, SECRETS) == orgs


def test_signature_over_other_bytes_does_not_verify() -> None:
    assert find_signing_orgs(BODY + b" ", f"sha256={HEX}", SECRETS) == frozenset()


def test_every_org_whose_secret_signed_is_found() -> None:
    shared = ((DEMO_ORG_ID, b"same"), (OTHER_ORG, b"same"), ("third", b"different"))
    header = "sha256=" + hmac.new(b"same", BODY, hashlib.sha256).hexdigest()
    assert find_signing_orgs(BODY, header, shared) == {DEMO_ORG_ID, OTHER_ORG}


def test_parse_signature_returns_the_digest_bytes() -> None:
    assert parse_signature(f"sha256={HEX}") == bytes.fromhex(HEX)
    assert parse_signature("sha256=") is None


# --- pure: the event ----------------------------------------------------------------------------


def test_event_of_another_org_than_the_signer_is_an_invalid_signature() -> None:
    body = json.dumps(manager_event(org_id=OTHER_ORG)).encode()
    with pytest.raises(InvalidSignatureError):
        parse_event(body, frozenset({DEMO_ORG_ID}))


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b""])
def test_signed_body_that_is_not_a_json_object_is_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidJsonError):
        parse_event(body, frozenset({DEMO_ORG_ID}))


@pytest.mark.parametrize("org_id", [None, 7, ["demo-org"]])
def test_event_without_a_string_org_is_an_invalid_signature(org_id: object) -> None:
    body = json.dumps(manager_event(org_id=org_id)).encode()  # type: ignore[arg-type]
    with pytest.raises(InvalidSignatureError):
        parse_event(body, frozenset({DEMO_ORG_ID}))


def test_event_fields_are_taken_only_when_they_are_strings() -> None:
    metadata = {"order_request_id": 12, "external_reference": ["x"], "new_status": True}
    event = parse_event(
        json.dumps(manager_event(metadata=metadata)).encode(), frozenset({DEMO_ORG_ID})
    )
    assert (event.order_request_id, event.reference, event.new_status) == (None, None, None)
    assert event.event_type == "order_request_status_updated"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-02T10:00:01Z", 1796205601.0),
        ("2026-12-02T11:00:01+01:00", 1796205601.0),
        ("2026-12-02T10:00:01", 1796205601.0),  # naive: UTC
        ("2026-12-02T10:00:01.500Z", 1796205601.5),
        ("yesterday", None),
        (1796205601, None),
        (None, None),
    ],
)
def test_created_at_is_parsed_or_none(value: object, expected: float | None) -> None:
    assert parse_timestamp(value) == expected


def test_delivery_key_is_the_header_else_the_event_id_else_the_body_hash() -> None:
    event = parse_event(json.dumps(manager_event()).encode(), frozenset({DEMO_ORG_ID}))
    assert build_delivery_key("d-1", event, b"x") == f"{DEMO_ORG_ID}:d-1"
    assert build_delivery_key(None, event, b"x") == f"{DEMO_ORG_ID}:evt-1"
    assert build_delivery_key("bad id with spaces", event, b"x") == f"{DEMO_ORG_ID}:evt-1"
    no_id = parse_event(json.dumps(manager_event(id=None)).encode(), frozenset({DEMO_ORG_ID}))
    digest = hashlib.sha256(b"x").hexdigest()
    assert build_delivery_key(None, no_id, b"x") == f"{DEMO_ORG_ID}:sha256:{digest}"


# --- end to end ---------------------------------------------------------------------------------


@dataclass
class Loop:
    """The gateway, the sandbox behind it, and alpha's callback receiver."""

    client: Client
    gateway: Gateway
    sandbox: SandboxState
    receiver: Receiver
    time: FakeTime

    async def order(self, reference: str, partner: str = "alpha") -> dict[str, Any]:
        headers = {"apikey": KEYS[partner]}
        async with self.client.post(
            ORDER_PATH, json=flat_order(external_reference=reference), headers=headers
        ) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def webhook(
        self,
        event: dict[str, Any] | bytes,
        *,
        secret: str = MAIN_SECRET,
        delivery_id: str | None = "d-1",
        signature: str | None = None,
    ) -> Any:
        raw = event if isinstance(event, bytes) else json.dumps(event).encode()
        headers = {"Content-Type": "application/json", "X-PharmaOne-Event": "x"}
        headers["X-PharmaOne-Signature"] = signature if signature is not None else sign(raw, secret)
        if delivery_id is not None:
            headers["X-PharmaOne-Delivery-Id"] = delivery_id
        data = io.BytesIO(raw) if len(raw) > 65536 else raw  # aiohttp warns about large bytes
        async with self.client.post(WEBHOOK_PATH, data=data, headers=headers) as response:
            return await read_reply(response)

    async def status(self, reference: str, partner: str = "alpha") -> dict[str, Any]:
        async with self.client.get(
            f"{ORDER_PATH}/{reference}", headers={"apikey": KEYS[partner]}
        ) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body

    async def send_callbacks(self) -> int:
        callbacks = self.gateway.callbacks
        assert callbacks is not None
        return await callbacks.run_once(self.gateway.runtime.callbacks)

    def metric(self, name: str, result: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(f"{name}_total", {"result": result})
        return value or 0.0


@pytest.fixture
async def loop_of(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Any:
    async def make(
        receiver: Receiver | None = None,
        *,
        callback_host: str = "127.0.0.1",
        backend: str = "sqlite",
        **sections: Any,
    ) -> Loop:
        clock = FakeTime(now=time.time())  # callbacks are verified against real time
        sandbox = await aiohttp_server(create_sandbox_app(clock=clock.clock), host="127.0.0.1")
        receiver = receiver or Receiver()
        served = await aiohttp_server(receiver.app(), host="127.0.0.1")
        config = webhooks_config(
            f"http://127.0.0.1:{sandbox.port}",
            tmp_path / "outbox.db",
            f"http://{callback_host}:{served.port}/callbacks",
            request.getfixturevalue("redis_url") if backend == "redis" else None,
            **sections,
        )
        seams = Seams(
            clock=clock.clock, sleep=clock.sleep, rand=lambda: 0.5, deliverer_poll_s=None,
            metrics=Metrics(),
        )  # fmt: skip
        client = await aiohttp_client(create_app(config, seams))
        gateway = client.server.app[GATEWAY_KEY]
        return Loop(client, gateway, sandbox.app[SANDBOX_KEY], receiver, clock)

    return make


def approved(order_request_id: str | None, reference: str | None = None, **meta: Any) -> Any:
    metadata: dict[str, Any] = {"old_status": "pending", "new_status": "approved", **meta}
    if order_request_id is not None:
        metadata["order_request_id"] = order_request_id
    if reference is not None:
        metadata["external_reference"] = reference
    return manager_event(metadata=metadata)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_matched_event_is_recorded_and_relayed_as_a_signed_order_updated(
    loop_of: Any, backend: str
) -> None:
    loop: Loop = await loop_of(backend=backend)
    accepted = await loop.order("TM-1")
    reply = await loop.webhook(approved(accepted["id"]))
    assert (reply.status, reply.body) == (200, {"status": "accepted"})

    status = await loop.status("TM-1")
    assert status["manager_status"] == "approved"
    assert status["status"] == "delivered"
    assert status["events"] == [
        {"type": "order_request_status_updated", "status": "approved", "at": "2026-12-02T10:00:01Z"}
    ]

    assert await loop.send_callbacks() == 1
    [(headers, body)] = loop.receiver.received
    assert headers["Content-Type"] == "application/json"
    assert headers["webhook-id"].startswith("msg_")
    assert verify(ALPHA_WHSEC, headers, body) == {
        "type": "order.updated",
        "timestamp": body and json.loads(body)["timestamp"],
        "data": {
            "external_reference": "TM-1",
            "order_request_id": accepted["id"],
            "status": "delivered",
            "manager_status": "approved",
            "event": "order_request_status_updated",
        },
    }
    assert b"Erika" not in body and b"approved for" not in body  # no customer data, no texts
    assert await loop.send_callbacks() == 0  # delivered once, then gone
    assert loop.metric("gateway_webhooks_received", "accepted") == 1
    assert loop.metric("gateway_callbacks", "delivered") == 1


async def test_order_answered_inline_gets_no_delivered_callback(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    await loop.order("TM-2")
    assert await loop.send_callbacks() == 0
    assert loop.receiver.received == []


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_replayed_delivery_id_is_a_duplicate_and_changes_nothing(
    loop_of: Any, backend: str
) -> None:
    loop: Loop = await loop_of(backend=backend)
    accepted = await loop.order("TM-3")
    first = await loop.webhook(approved(accepted["id"]), delivery_id="same")
    again = await loop.webhook(
        manager_event(metadata={"order_request_id": accepted["id"], "new_status": "rejected"}),
        delivery_id="same",
    )
    assert first.body == {"status": "accepted"}
    assert (again.status, again.body) == (200, {"status": "duplicate"})
    status = await loop.status("TM-3")
    assert status["manager_status"] == "approved"
    assert len(status["events"]) == 1
    assert await loop.send_callbacks() == 1  # one callback, not two
    assert loop.metric("gateway_webhooks_received", "duplicate") == 1


async def test_delivery_id_is_forgotten_after_dedupe_hours(loop_of: Any) -> None:
    loop: Loop = await loop_of(webhooks={"dedupe_hours": 1})
    accepted = await loop.order("TM-4")
    await loop.webhook(approved(accepted["id"]), delivery_id="late")
    loop.time.now += 3601
    again = await loop.webhook(approved(accepted["id"]), delivery_id="late")
    assert again.body == {"status": "accepted"}


@pytest.mark.parametrize(
    "signature",
    [
        None,  # no header
        "",
        "sha256=",
        "sha256=" + "0" * 64,
        "md5=abc",
        "truncated",
    ],
)
async def test_bad_signature_is_401_and_nothing_happens(
    loop_of: Any, signature: str | None
) -> None:
    loop: Loop = await loop_of()
    accepted = await loop.order("TM-5")
    raw = json.dumps(approved(accepted["id"])).encode()
    headers = {"Content-Type": "application/json", "X-PharmaOne-Delivery-Id": "d-5"}
    if signature is not None:
        headers["X-PharmaOne-Signature"] = signature
    async with loop.client.post(WEBHOOK_PATH, data=raw, headers=headers) as response:
        assert_error(await read_reply(response), 401, "invalid_signature")
    assert (await loop.status("TM-5"))["events"] == []
    # The delivery id was not remembered: the real delivery is still accepted.
    assert (await loop.webhook(approved(accepted["id"]), delivery_id="d-5")).body == {
        "status": "accepted"
    }
    assert loop.metric("gateway_webhooks_received", "invalid_signature") == 1


async def test_signature_truncated_by_one_character_is_refused(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    raw = json.dumps(approved("x")).encode()
    reply = await loop.webhook(raw, signature=sign(raw)[:-1])
    assert_error(reply, 401, "invalid_signature")


async def test_differently_cased_hex_signature_is_the_same_signature(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    accepted = await loop.order("TM-6")
    raw = json.dumps(approved(accepted["id"])).encode()
    reply = await loop.webhook(raw, signature=sign(raw).upper())
    assert reply.body == {"status": "accepted"}


async def test_valid_signature_of_another_orgs_secret_is_401(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    accepted = await loop.order("TM-7")
    # Signed with the other org's subscription secret, naming the demo org.
    reply = await loop.webhook(approved(accepted["id"]), secret=OTHER_SECRET)
    assert_error(reply, 401, "invalid_signature")
    assert (await loop.status("TM-7"))["events"] == []


async def test_event_of_another_org_does_not_reach_this_orgs_order(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    accepted = await loop.order("TM-8")
    event = approved(accepted["id"], "TM-8")
    event["org_id"] = OTHER_ORG
    reply = await loop.webhook(event, secret=OTHER_SECRET)
    assert reply.body == {"status": "ignored"}
    assert (await loop.status("TM-8"))["events"] == []
    assert loop.metric("gateway_webhooks_received", "ignored") == 1


async def test_body_over_1_mb_is_413(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    raw = json.dumps(manager_event(padding="x" * (1024 * 1024))).encode()
    assert_error(await loop.webhook(raw), 413, "payload_too_large")


async def test_chunked_body_over_1_mb_is_413(loop_of: Any) -> None:
    loop: Loop = await loop_of()

    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 65536

    headers = {"X-PharmaOne-Signature": "sha256=" + "0" * 64}
    async with loop.client.post(WEBHOOK_PATH, data=chunks(), headers=headers) as response:
        assert_error(await read_reply(response), 413, "payload_too_large")


@pytest.mark.parametrize(
    "event",
    [
        approved("unknown-id"),  # an order this gateway never sent
        approved(None, "never-sent"),
        manager_event(),  # no metadata
        manager_event(metadata="not an object"),
        manager_event(metadata={"order_request_id": 42, "external_reference": 7}),
        manager_event(metadata={"order_request_id": None}),
        manager_event(event_type=None, metadata={"external_reference": "TM-9"}),
    ],
)
async def test_events_that_match_no_order_are_ignored(loop_of: Any, event: Any) -> None:
    loop: Loop = await loop_of()
    await loop.order("TM-9")
    reply = await loop.webhook(event)
    assert (reply.status, reply.body) == (200, {"status": "ignored"})
    assert (await loop.status("TM-9"))["events"] == []
    assert await loop.send_callbacks() == 0


async def test_signed_body_that_is_not_json_is_400(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    assert_error(await loop.webhook(b"{not json"), 400, "invalid_json")


async def test_event_matched_by_reference_when_manager_id_is_absent(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    await loop.order("TM-10")
    reply = await loop.webhook(approved(None, "TM-10"), delivery_id=None)
    assert reply.body == {"status": "accepted"}
    assert (await loop.status("TM-10"))["manager_status"] == "approved"


async def test_shared_reference_goes_to_the_most_recently_updated_order(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    await loop.order("SHARED", partner="beta")
    loop.time.now += 5
    await loop.order("SHARED", partner="alpha")
    await loop.webhook(approved(None, "SHARED"))
    assert (await loop.status("SHARED", "alpha"))["manager_status"] == "approved"
    assert (await loop.status("SHARED", "beta"))["manager_status"] == "pending"


async def test_unparseable_created_at_is_recorded_as_now(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    accepted = await loop.order("TM-11")
    event = approved(accepted["id"])
    event["created_at"] = "last tuesday"
    await loop.webhook(event)
    [recorded] = (await loop.status("TM-11"))["events"]
    assert recorded["at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loop.time.now))


async def test_partner_without_callback_url_gets_the_event_but_no_callback(loop_of: Any) -> None:
    loop: Loop = await loop_of()
    accepted = await loop.order("TM-12", partner="beta")
    assert (await loop.webhook(approved(accepted["id"]))).body == {"status": "accepted"}
    assert (await loop.status("TM-12", "beta"))["manager_status"] == "approved"
    assert await loop.send_callbacks() == 0


async def test_webhooks_disabled_is_404(
    aiohttp_client: AiohttpClient, tmp_path: Path, loop_of: Any
) -> None:
    loop: Loop = await loop_of(webhooks={"enabled": False})
    raw = json.dumps(approved("x")).encode()
    assert_error(await loop.webhook(raw), 404, "not_found")


async def test_the_sandbox_closes_the_loop(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """Sandbox → signed webhooks → gateway → signed order.updated → partner, as in the demo."""
    from gateway.sandbox import WebhookSink

    clock = FakeTime(now=time.time())
    receiver = Receiver()
    served = await aiohttp_server(receiver.app(), host="127.0.0.1")
    # The gateway's URL is known only once it listens: the sink is filled in then.
    sink = WebhookSink("", MAIN_SECRET.encode())
    sandbox = await aiohttp_server(
        create_sandbox_app(clock=clock.clock, webhook=sink), host="127.0.0.1"
    )
    config = webhooks_config(
        f"http://127.0.0.1:{sandbox.port}",
        tmp_path / "outbox.db",
        f"http://127.0.0.1:{served.port}/callbacks",
    )
    seams = Seams(clock=clock.clock, sleep=clock.sleep, deliverer_poll_s=None)
    client = await aiohttp_client(create_app(config, seams))
    sink.url = str(client.make_url(WEBHOOK_PATH))
    state = sandbox.app[SANDBOX_KEY]
    gateway = client.server.app[GATEWAY_KEY]
    assert gateway.callbacks is not None

    async with client.post(
        ORDER_PATH, json=flat_order(external_reference="LOOP-1"), headers={"apikey": KEYS["alpha"]}
    ) as response:
        order_request_id = (await response.json())["id"]
    await _settle(state)
    async with sandbox_client(sandbox) as session:
        async with session.post(
            f"/_sandbox/order-requests/{order_request_id}/status", json={"status": "approved"}
        ) as response:
            assert response.status == 200
    await _settle(state)
    assert [sent["status"] for sent in state.webhooks_sent] == [200, 200]

    assert await gateway.callbacks.run_once(gateway.runtime.callbacks) == 2
    bodies = [verify(ALPHA_WHSEC, headers, body) for headers, body in receiver.received]
    assert {body["data"]["event"] for body in bodies} == {
        "order_request_submitted",
        "order_request_status_updated",
    }
    final = next(b for b in bodies if b["data"]["event"] == "order_request_status_updated")
    assert final["data"]["manager_status"] == "approved"
    assert final["data"]["order_request_id"] == order_request_id


async def _settle(state: SandboxState) -> None:
    while state.webhook_tasks:
        await asyncio.gather(*state.webhook_tasks)


def sandbox_client(server: Any) -> Any:
    return aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}")
