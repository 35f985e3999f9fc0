"""Partner callbacks (contract section 11): Standard Webhooks messages, verified with the
``standardwebhooks`` library as a partner would, retried with the outbox's backoff.

End to end through real HTTP: the gateway app in front of the sandbox, a partner's receiver on
loopback, the sender driven by explicit ``run_once`` calls and a hand-moved clock.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from test_webhooks import Loop, approved, loop_of  # noqa: F401 - loop_of is a fixture
from webhook_kit import ALPHA_WHSEC, ENVIRON, GAMMA_WHSEC, KEYS, ORDER_PATH, Receiver, webhooks_toml

from gateway.callbacks import build_body, build_headers, build_settled_message, build_signature
from gateway.config import parse_whsec
from gateway.outbox import CallbackMessage, LedgerEntry, OrderStatus
from gateway.sandbox import Fault
from gateway.server import reload_config

KEY = parse_whsec(ALPHA_WHSEC) or b""
MESSAGE = CallbackMessage(
    id="msg_1", partner="alpha", type="order.updated", reference="TM-1", status="delivered",
    order_request_id="7b8e", manager_status="approved", event="order_request_status_updated",
    created_at=1796205601.0, expires_at=1796209201.0,
)  # fmt: skip


# --- pure: messages and signatures --------------------------------------------------------------


def test_body_has_exactly_the_contracts_fields() -> None:
    assert json.loads(build_body(MESSAGE)) == {
        "type": "order.updated",
        "timestamp": "2026-12-02T10:00:01Z",
        "data": {
            "external_reference": "TM-1",
            "order_request_id": "7b8e",
            "status": "delivered",
            "manager_status": "approved",
            "event": "order_request_status_updated",
        },
    }


def test_signature_verifies_with_the_standardwebhooks_library() -> None:
    body = build_body(MESSAGE)
    now = int(time.time())
    headers = build_headers(KEY, MESSAGE.id, now, body)
    assert headers["webhook-timestamp"] == str(now)
    assert Webhook(ALPHA_WHSEC).verify(body, headers)["data"]["external_reference"] == "TM-1"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),
        lambda h, b: ({**h, "webhook-id": "msg_2"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
    ],
)
def test_signature_covers_id_timestamp_and_body(tamper: Any) -> None:
    body = build_body(MESSAGE)
    headers, body = tamper(build_headers(KEY, MESSAGE.id, int(time.time()), body), body)
    with pytest.raises(WebhookVerificationError):
        Webhook(ALPHA_WHSEC).verify(body, headers)


def test_signature_of_another_partners_secret_does_not_verify() -> None:
    body = build_body(MESSAGE)
    headers = build_headers(KEY, MESSAGE.id, int(time.time()), body)
    with pytest.raises(WebhookVerificationError):
        Webhook(GAMMA_WHSEC).verify(body, headers)


def test_signature_is_v1_and_base64_of_32_bytes() -> None:
    version, digest = build_signature(KEY, "msg_1", 1, b"{}").split(",")
    assert version == "v1" and len(base64.b64decode(digest)) == 32


def entry(status: OrderStatus) -> LedgerEntry:
    return LedgerEntry(
        partner="alpha", reference="TM-1", org_id="demo-org", status=status, attempts=2,
        created_at=1.0, updated_at=2.0, order_request_id="7b8e", manager_status="pending",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (OrderStatus.DELIVERED, "order.delivered"),
        (OrderStatus.REJECTED, "order.rejected"),
        (OrderStatus.FAILED, "order.failed"),
        (OrderStatus.QUEUED, None),
        (OrderStatus.DROPPED, None),
    ],
)
def test_settled_orders_are_announced_by_their_state(status: OrderStatus, kind: str | None) -> None:
    message = build_settled_message(entry(status), "msg_x", 10.0, 20.0)
    assert (message.type if message else None) == kind
    if message is not None:
        data = json.loads(build_body(message))["data"]
        assert data["event"] is None and data["status"] == status.value


@pytest.mark.parametrize(
    ("secret", "valid"),
    [
        (ALPHA_WHSEC, True),
        ("whsec_" + base64.b64encode(b"k" * 24).decode().rstrip("="), True),  # unpadded
        ("whsec_" + base64.b64encode(b"short").decode(), False),
        ("whsec_not base64!", False),
        (base64.b64encode(b"k" * 32).decode(), False),  # no prefix
        ("whsec_", False),
    ],
)
def test_whsec_secrets_are_recognised(secret: str, valid: bool) -> None:
    assert (parse_whsec(secret) is not None) is valid


# --- end to end: sending ------------------------------------------------------------------------


async def updated(loop: Loop, reference: str) -> None:
    """An order delivered at once, then approved in Manager: one order.updated queued."""
    accepted = await loop.order(reference)
    reply = await loop.webhook(approved(accepted["id"]), delivery_id=f"d-{reference}")
    assert reply.body == {"status": "accepted"}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_receiver_answering_500_is_retried_with_the_same_webhook_id(
    loop_of: Any,  # noqa: F811
    backend: str,
) -> None:
    loop: Loop = await loop_of(Receiver(statuses=[500, 503]), backend=backend)
    await updated(loop, "R-1")
    assert await loop.send_callbacks() == 1
    assert await loop.send_callbacks() == 0  # not due yet: backoff from retry_min_s
    loop.time.now += 1.0  # retry_min_s
    assert await loop.send_callbacks() == 1
    loop.time.now += 2.0  # doubled
    assert await loop.send_callbacks() == 1
    assert await loop.send_callbacks() == 0  # delivered: gone
    ids = {headers["webhook-id"] for headers, _ in loop.receiver.received}
    assert len(loop.receiver.received) == 3 and len(ids) == 1
    bodies = {body for _, body in loop.receiver.received}
    assert len(bodies) == 1  # the same bytes every time
    headers, body = loop.receiver.received[-1]
    Webhook(ALPHA_WHSEC).verify(body, headers)
    assert loop.metric("gateway_callbacks", "retried") == 2
    assert loop.metric("gateway_callbacks", "delivered") == 1


async def test_receiver_that_times_out_is_retried(loop_of: Any) -> None:  # noqa: F811
    receiver = Receiver(delay_s=1.0)
    loop: Loop = await loop_of(receiver, webhooks={"callback_timeout_s": 0.2})
    await updated(loop, "R-2")
    assert await loop.send_callbacks() == 1
    assert loop.metric("gateway_callbacks", "retried") == 1
    receiver.delay_s = 0
    loop.time.now += 1.0
    assert await loop.send_callbacks() == 1
    assert loop.metric("gateway_callbacks", "delivered") == 1


async def test_redirect_is_not_followed_and_counts_as_a_failure(loop_of: Any) -> None:  # noqa: F811
    receiver = Receiver(redirect_to="/elsewhere")
    loop: Loop = await loop_of(receiver)
    await updated(loop, "R-3")
    assert await loop.send_callbacks() == 1
    assert len(receiver.received) == 1  # /elsewhere was never asked
    assert loop.metric("gateway_callbacks", "retried") == 1
    assert loop.metric("gateway_callbacks", "delivered") == 0


async def test_callback_given_up_after_max_age(loop_of: Any) -> None:  # noqa: F811
    loop: Loop = await loop_of(Receiver(statuses=[500] * 100))
    await updated(loop, "R-4")
    assert await loop.send_callbacks() == 1
    loop.time.now += 3600  # max_age_hours = 1
    assert await loop.send_callbacks() == 1
    assert loop.metric("gateway_callbacks", "failed") == 1
    loop.time.now += 3600
    assert await loop.send_callbacks() == 0  # forgotten


async def test_callback_to_a_host_resolving_to_a_refused_address_is_not_sent(
    loop_of: Any,  # noqa: F811
    log_stream: Any,
) -> None:
    # "localhost" passes the URL check (a name); the resolver then finds 127.0.0.1, which this
    # configuration does not allow: the connection is never opened.
    loop: Loop = await loop_of(callback_host="localhost", webhooks={"callback_allow_networks": []})
    await updated(loop, "R-5")
    assert await loop.send_callbacks() == 1
    assert loop.receiver.received == []
    assert loop.metric("gateway_callbacks", "retried") == 1
    assert "resolves to a loopback address" in log_stream.getvalue()


async def test_partner_removed_from_callbacks_gets_its_message_dropped(loop_of: Any) -> None:  # noqa: F811
    loop: Loop = await loop_of()
    await updated(loop, "R-6")
    loop.gateway.runtime = replace(loop.gateway.runtime, callbacks={})
    assert await loop.send_callbacks() == 1
    assert loop.metric("gateway_callbacks", "failed") == 1
    assert loop.receiver.received == []


# --- end to end: orders settled by the deliverer ------------------------------------------------


async def queued(loop: Loop, reference: str, partner: str = "alpha") -> None:
    loop.sandbox.outage = Fault(503)
    async with loop.client.post(
        ORDER_PATH, json={"customer_name": "Erika Musterfrau", "external_reference": reference,
                          "items": [{"name": "Ibuprofen", "quantity": 1}]},
        headers={"apikey": KEYS[partner]},
    ) as response:  # fmt: skip
        assert response.status == 202
    loop.sandbox.outage = None


async def deliver(loop: Loop) -> int:
    outbox = loop.gateway.outbox
    assert outbox is not None
    return await outbox.run_once(loop.gateway.runtime.targets, loop.gateway.manager)


async def test_queued_order_delivered_later_is_announced(loop_of: Any) -> None:  # noqa: F811
    loop: Loop = await loop_of()
    await queued(loop, "Q-1")
    assert await loop.send_callbacks() == 0  # a 202 is no news
    loop.time.now += 2
    assert await deliver(loop) == 1
    assert await loop.send_callbacks() == 1
    [(headers, body)] = loop.receiver.received
    message = Webhook(ALPHA_WHSEC).verify(body, headers)
    assert message["type"] == "order.delivered"
    assert message["data"]["status"] == "delivered"
    assert message["data"]["order_request_id"] == loop.sandbox.received[-1]["id"]
    assert message["data"]["event"] is None
    assert b"Erika" not in body


async def test_queued_order_refused_later_is_announced_as_rejected(loop_of: Any) -> None:  # noqa: F811
    loop: Loop = await loop_of()
    await queued(loop, "Q-2")
    loop.sandbox.faults.append(Fault(422, {"error": "validation_error"}))
    loop.time.now += 2
    await deliver(loop)
    await loop.send_callbacks()
    [(headers, body)] = loop.receiver.received
    assert Webhook(ALPHA_WHSEC).verify(body, headers)["type"] == "order.rejected"


async def test_order_given_up_is_announced_as_failed(loop_of: Any) -> None:  # noqa: F811
    loop: Loop = await loop_of()
    await queued(loop, "Q-3")
    loop.time.now += 3601
    await deliver(loop)
    await loop.send_callbacks()
    [(headers, body)] = loop.receiver.received
    # An hour ahead of real time: the library's own signing, without its 5-minute window.
    sent_at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    expected = Webhook(ALPHA_WHSEC).sign(headers["webhook-id"], sent_at, body.decode())
    assert headers["webhook-signature"] == expected
    message = json.loads(body)
    assert (message["type"], message["data"]["status"]) == ("order.failed", "failed")


async def test_partner_without_callback_url_hears_nothing_of_its_queued_order(
    loop_of: Any,  # noqa: F811
) -> None:
    loop: Loop = await loop_of()
    await queued(loop, "Q-4", partner="beta")
    loop.time.now += 2
    assert await deliver(loop) == 1
    assert await loop.send_callbacks() == 0


def test_openapi_documents_the_callback_as_it_is_sent() -> None:
    from test_docs import OPENAPI

    schema = OPENAPI["components"]["schemas"]["StatusCallback"]
    body = json.loads(build_body(MESSAGE))
    assert set(schema["required"]) == set(body)
    assert set(schema["properties"]["data"]["required"]) == set(body["data"])
    assert set(schema["properties"]["type"]["enum"]) >= {"order.updated", "order.delivered"}
    callback = OPENAPI["webhooks"]["orderStatus"]["post"]
    headers = {p["name"] for p in callback["parameters"]}
    assert headers == set(build_headers(KEY, "msg_1", 1, b"{}")) - {"Content-Type"}
    assert "/webhooks/pharmaone" in OPENAPI["paths"]


async def test_reload_applies_the_callback_policy_to_queued_messages(
    loop_of: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop: Loop = await loop_of(Receiver(statuses=[500]))
    await updated(loop, "R-7")
    assert await loop.send_callbacks() == 1  # 500: retried later
    # The operator narrows the policy: loopback is no longer allowed. The URL, a loopback
    # literal, is then refused at load: the reload is refused and the old policy stays...
    config = loop.gateway.runtime.config
    path = tmp_path / "reloaded.toml"
    receiver_url = loop.gateway.runtime.callbacks["alpha"].url
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    path.write_text(
        webhooks_toml(config.manager.base_url, Path(config.outbox.path), receiver_url,
                      webhooks={"callback_allow_networks": []}, server={"admin_port": 0}),
        encoding="utf-8",
    )  # fmt: skip
    assert not reload_config(loop.gateway, path)
    # ...while a change the policy allows applies to the message already queued.
    path.write_text(
        webhooks_toml(config.manager.base_url, Path(config.outbox.path), receiver_url,
                      webhooks={"callback_timeout_s": 5}, server={"admin_port": 0}),
        encoding="utf-8",
    )  # fmt: skip
    assert reload_config(loop.gateway, path)
    assert loop.gateway.callbacks is not None
    assert loop.gateway.callbacks.webhooks.callback_timeout_s == 5
    loop.time.now += 1
    assert await loop.send_callbacks() == 1
    assert loop.metric("gateway_callbacks", "delivered") == 1


async def test_store_down_answers_503_and_manager_retries(loop_of: Any) -> None:  # noqa: F811
    loop: Loop = await loop_of()
    accepted = await loop.order("R-8")
    outbox = loop.gateway.outbox
    assert outbox is not None
    await outbox.store.close()
    reply = await loop.webhook(approved(accepted["id"]))
    assert reply.status == 503 and reply.body["error"] == "state_unavailable"
