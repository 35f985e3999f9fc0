"""The sandbox's webhooks (contract section 8): signed like Manager's, sent without delaying its
answers, ``order_request_submitted`` on every accepted request and
``order_request_status_updated`` from ``POST /_sandbox/order-requests/{id}/status``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeTime
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.sandbox import (
    DEMO_ORG_ID,
    DEMO_ORG_KEY,
    DEMO_SHOP_ID,
    SANDBOX_KEY,
    SandboxState,
    WebhookSink,
    build_webhook_signature,
    create_sandbox_app,
)

SECRET = b"sandbox-subscription-secret"
ORDER = {
    "external_reference": "SB-1",
    "source": "test",
    "payload": {"shop_id": DEMO_SHOP_ID, "customer_name": "Erika Musterfrau",
                "items": [{"name": "Ibuprofen", "quantity": 1}]},
}  # fmt: skip

Client = TestClient[web.Request, web.Application]


class Subscriber:
    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status)


async def start(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, subscriber: Subscriber
) -> tuple[Client, SandboxState]:
    app = web.Application()
    app.router.add_post("/hook", subscriber.handle)
    hook = await aiohttp_server(app, host="127.0.0.1")
    sink = WebhookSink(f"http://127.0.0.1:{hook.port}/hook", SECRET)
    clock = FakeTime()
    client = await aiohttp_client(create_sandbox_app(clock=clock.clock, webhook=sink))
    return client, client.server.app[SANDBOX_KEY]


async def order_request(client: Client) -> str:
    async with client.post(
        f"/api/v1/public/orgs/{DEMO_ORG_ID}/order-requests",
        json=ORDER, headers={"apikey": DEMO_ORG_KEY},
    ) as response:  # fmt: skip
        assert response.status == 200
        order_request_id: str = (await response.json())["id"]
        return order_request_id


async def settle(state: SandboxState) -> None:
    while state.webhook_tasks:
        await asyncio.gather(*state.webhook_tasks)


def test_signature_is_sha256_hex_hmac_of_the_body() -> None:
    expected = hmac.new(SECRET, b"{}", hashlib.sha256).hexdigest()
    assert build_webhook_signature(SECRET, b"{}") == f"sha256={expected}"


async def test_accepted_request_sends_a_signed_order_request_submitted(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    subscriber = Subscriber()
    client, state = await start(aiohttp_server, aiohttp_client, subscriber)
    order_request_id = await order_request(client)
    await settle(state)
    [(headers, body)] = subscriber.received
    assert headers["X-PharmaOne-Signature"] == build_webhook_signature(SECRET, body)
    assert headers["X-PharmaOne-Event"] == "order_request_submitted"
    uuid.UUID(headers["X-PharmaOne-Delivery-Id"])
    event = json.loads(body)
    assert set(event) == {
        "id", "org_id", "event_type", "title", "description", "metadata", "created_at",
    }  # fmt: skip
    assert event["org_id"] == DEMO_ORG_ID
    assert event["metadata"] == {
        "order_request_id": order_request_id, "external_reference": "SB-1",
        "old_status": None, "new_status": "pending",
    }  # fmt: skip
    assert event["created_at"] == "2023-11-14T22:13:20Z"
    assert state.webhooks_sent[0]["status"] == 200


async def test_status_change_sends_order_request_status_updated(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    subscriber = Subscriber()
    client, state = await start(aiohttp_server, aiohttp_client, subscriber)
    order_request_id = await order_request(client)
    async with client.post(
        f"/_sandbox/order-requests/{order_request_id}/status", json={"status": "approved"}
    ) as response:
        assert (response.status, await response.json()) == (
            200, {"id": order_request_id, "status": "approved"},
        )  # fmt: skip
    await settle(state)
    headers, body = subscriber.received[-1]
    event = json.loads(body)
    assert event["event_type"] == "order_request_status_updated"
    assert event["metadata"]["old_status"] == "pending"
    assert event["metadata"]["new_status"] == "approved"
    assert state.received[0]["status"] == "approved"
    ids = {h["X-PharmaOne-Delivery-Id"] for h, _ in subscriber.received}
    assert len(ids) == 2


@pytest.mark.parametrize("body", [{}, {"status": ""}, {"status": 3}, "approved"])
async def test_status_change_needs_a_status(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, body: Any
) -> None:
    client, state = await start(aiohttp_server, aiohttp_client, Subscriber())
    order_request_id = await order_request(client)
    async with client.post(
        f"/_sandbox/order-requests/{order_request_id}/status", json=body
    ) as response:
        assert response.status == 400
    assert state.received[0]["status"] == "pending"


async def test_status_change_of_an_unknown_request_is_404(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    client, _ = await start(aiohttp_server, aiohttp_client, Subscriber())
    async with client.post(
        "/_sandbox/order-requests/nope/status", json={"status": "approved"}
    ) as response:
        assert response.status == 404


async def test_a_slow_or_failing_subscriber_does_not_delay_the_answer(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    subscriber = Subscriber(status=500, delay_s=0.5)
    client, state = await start(aiohttp_server, aiohttp_client, subscriber)
    await asyncio.wait_for(order_request(client), timeout=0.4)  # answered before the webhook
    assert state.webhook_tasks
    await settle(state)
    assert state.webhooks_sent[0]["status"] == 500
    assert "answered HTTP 500" in capsys.readouterr().err


async def test_an_unreachable_subscriber_is_logged_to_stderr(
    aiohttp_client: AiohttpClient, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = WebhookSink("http://127.0.0.1:9/hook", SECRET)  # the discard port: nothing listens
    client = await aiohttp_client(create_sandbox_app(webhook=sink))
    state = client.server.app[SANDBOX_KEY]
    await order_request(client)
    await settle(state)
    assert state.webhooks_sent[0]["status"] is None
    assert "not delivered" in capsys.readouterr().err


async def test_without_a_webhook_url_nothing_is_sent(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_sandbox_app())
    await order_request(client)
    assert client.server.app[SANDBOX_KEY].webhooks_sent == []
