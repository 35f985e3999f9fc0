"""End to end over real HTTP on loopback: the partner app in front of the Manager sandbox."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestServer
from conftest import (
    HOSTED_HOST,
    KEYS,
    ORDER_PATH,
    ORG_KEYS_HOST,
    SAMPLES,
    Client,
    MakeGateway,
    StartFakeManager,
    assert_error,
    base_url_of,
    flat_order,
    load_sample,
    load_test_config,
    post_order,
    read_reply,
)
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

import gateway.orders
from gateway.app import create_admin_app, create_gateway
from gateway.auth import hash_key
from gateway.sandbox import DEMO_ORG_ID, DEMO_ORG_KEY, DEMO_SHOP_ID, Fault, SandboxState

SPECIAL_SAMPLES = {"prescription-url.json", "nested-partner.json"}
PLAIN_SAMPLES = sorted(p.name for p in SAMPLES.glob("*.json") if p.name not in SPECIAL_SAMPLES)
ENVELOPE_KEYS = {"external_reference", "source", "payload"}


def sample_payload(sample: dict[str, Any]) -> dict[str, Any]:
    if "payload" in sample:
        payload: dict[str, Any] = sample["payload"]
        return payload
    return {k: v for k, v in sample.items() if k not in ENVELOPE_KEYS}


def as_number(value: object) -> object:
    return float(value) if isinstance(value, str) else value


def only_received(state: SandboxState) -> dict[str, Any]:
    assert len(state.received) == 1, state.received
    return cast(dict[str, Any], state.received[0]["envelope"])


# --- samples ------------------------------------------------------------------------------------


def test_the_sample_folder_is_walked() -> None:
    assert {"flat-payload.json", "envelope.json", "qty-style.json"} <= set(PLAIN_SAMPLES)
    assert SPECIAL_SAMPLES <= {p.name for p in SAMPLES.glob("*.json")}


@pytest.mark.parametrize("name", PLAIN_SAMPLES)
async def test_every_sample_reaches_manager_as_a_valid_order_request(
    name: str, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sample = load_sample(name)
    reply = await post_order(gateway_client, sample)

    assert reply.status == 200, reply.body
    envelope = only_received(sandbox_state)
    assert reply.body == {
        "id": sandbox_state.received[0]["id"],
        "external_reference": sample["external_reference"],
        "message": "Order request received.",
        "status": "pending",
    }
    assert envelope["external_reference"] == sample["external_reference"]
    assert envelope["source"] == sample.get("source", "acme")
    payload = envelope["payload"]
    assert payload["shop_id"] == DEMO_SHOP_ID
    assert "org_id" not in payload
    sent = sample_payload(sample)
    for key, value in sent.items():
        if key == "items":
            continue
        expected = as_number(value) if key == "total_amount" else value
        assert payload[key] == expected, key  # unknown fields (addresses) are kept as they were
    for sent_line, line in zip(sent.get("items", []), payload.get("items", []), strict=True):
        assert "qty" not in line
        assert line["quantity"] == as_number(sent_line.get("quantity", sent_line.get("qty")))
        assert not isinstance(line["quantity"], str)
        if "price" in sent_line:
            assert line["price"] == as_number(sent_line["price"])
            assert not isinstance(line["price"], str)


async def test_qty_style_lines_arrive_with_quantity_and_numbers(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, load_sample("qty-style.json"))

    assert reply.status == 200, reply.body
    payload = only_received(sandbox_state)["payload"]
    assert payload["items"] == [{"name": "Flos 18/1", "quantity": 3, "price": 8.59}]
    assert payload["total_amount"] == 25.77


async def test_flat_sample_keeps_address_fields(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, load_sample("flat-payload.json"))

    assert reply.status == 200, reply.body
    payload = only_received(sandbox_state)["payload"]
    assert payload["address_street"] == "Musterstr. 1"
    assert payload["address_city"] == "Berlin"
    assert payload["address_zip"] == "10115"


async def test_nested_partner_sample_is_mapped_by_its_profile(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, load_sample("nested-partner.json"), key=KEYS["drx"])

    assert reply.status == 200, reply.body
    envelope = only_received(sandbox_state)
    assert envelope["external_reference"] == "DRX-2026-000815"
    assert envelope["source"] == "drx"
    assert envelope["payload"] == {
        "shop_id": DEMO_SHOP_ID,
        "customer_name": "Max Mustermann",
        "customer_email": "max@example.com",
        "address_street": "Musterstr. 1",
        "address_zip": "10115",
        "address_city": "Berlin",
        "items": [
            {"name": "Flos 22/1", "quantity": 5, "p1_id": "12345", "price": 8.59},
            {"name": "Extrakt 25", "quantity": 1, "p1_id": "67890", "price": 49.0},
        ],
        "prescription_pdf_url": "https://drx.example/rx/815.pdf",
    }


async def test_prescription_url_sample_is_forwarded_as_prescription_pdf_url(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sample = load_sample("prescription-url.json")
    reply = await post_order(gateway_client, sample, key=KEYS["fwd"])

    assert reply.status == 200, reply.body
    payload = only_received(sandbox_state)["payload"]
    assert payload["prescription_pdf_url"] == sample["prescription_url"]
    assert "prescription_url" not in payload
    assert "prescription_pdf_base64" not in payload
    assert payload["cash_on_pickup"] is True


# --- the error table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"[1, 2]", b'"an order"', b"\xff\xfe"], ids=repr
)
async def test_body_that_is_not_a_json_object_is_invalid_json(
    raw: bytes, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, raw)

    assert_error(reply, 400, "invalid_json")
    assert sandbox_state.order_request_attempts == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"apikey": "not-a-partner-key"}, {"X-API-Key": "not-a-partner-key"}, {"apikey": ""}],
    ids=["missing", "unknown", "unknown-x-api-key", "empty"],
)
async def test_missing_or_unknown_key_is_unauthorized(
    headers: dict[str, str], gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, flat_order(), key=None, headers=headers)

    body = assert_error(reply, 401, "unauthorized")
    assert "not-a-partner-key" not in json.dumps(body)
    assert sandbox_state.token_requests == 0


async def test_key_in_query_string_is_accepted(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    path = f"{ORDER_PATH}?apikey={KEYS['acme']}"
    reply = await post_order(gateway_client, flat_order(), key=None, path=path)

    assert reply.status == 200, reply.body
    assert len(sandbox_state.received) == 1


async def test_key_in_x_api_key_header_is_accepted(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"X-API-Key": KEYS["acme"]}
    reply = await post_order(gateway_client, flat_order(), key=None, headers=headers)

    assert reply.status == 200, reply.body
    assert len(sandbox_state.received) == 1


@pytest.mark.parametrize("host", ["elsewhere.example.test", "127.0.0.1", ORG_KEYS_HOST])
async def test_key_on_a_host_its_shop_does_not_serve_is_wrong_host(
    host: str, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(
        gateway_client, flat_order(), key=KEYS["hosted"], headers={"Host": host}
    )

    assert_error(reply, 403, "wrong_host")
    assert sandbox_state.order_request_attempts == 0


@pytest.mark.parametrize("host", [HOSTED_HOST, "Shop.Example.Test:8443"])
async def test_key_on_its_shops_host_is_accepted(
    host: str, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(
        gateway_client, flat_order(), key=KEYS["hosted"], headers={"Host": host}
    )

    assert reply.status == 200, reply.body
    assert only_received(sandbox_state)["payload"]["shop_id"] == DEMO_SHOP_ID


async def test_shop_without_hosts_accepts_any_host(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"Host": "whatever.example.test"}
    reply = await post_order(gateway_client, flat_order(), headers=headers)

    assert reply.status == 200, reply.body


@pytest.mark.parametrize(
    "body",
    [
        flat_order(shop_id="other-shop"),
        flat_order(org_id="other-org"),
        {"external_reference": "R-1", "org_id": "other-org", "payload": flat_order()},
        {"external_reference": "R-1", "payload": flat_order(shop_id="other-shop")},
    ],
    ids=["flat-shop", "flat-org", "envelope-org", "payload-shop"],
)
async def test_body_naming_another_shop_or_org_is_shop_mismatch(
    body: dict[str, Any], gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, body)

    assert_error(reply, 403, "shop_mismatch")
    assert sandbox_state.order_request_attempts == 0


async def test_body_naming_its_own_shop_is_accepted(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    body = flat_order(shop_id=DEMO_SHOP_ID, org_id=DEMO_ORG_ID)
    reply = await post_order(gateway_client, body)

    assert reply.status == 200, reply.body
    payload = only_received(sandbox_state)["payload"]
    assert payload["shop_id"] == DEMO_SHOP_ID
    assert "org_id" not in payload


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("POST", "/api/v1/other"), ("GET", "/api/v2/external-order")],
)
async def test_any_other_path_is_not_found(method: str, path: str, gateway_client: Client) -> None:
    async with gateway_client.request(method, path) as response:
        reply = await read_reply(response)

    assert_error(reply, 404, "not_found")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_another_method_on_the_order_path_is_method_not_allowed(
    method: str, gateway_client: Client
) -> None:
    async with gateway_client.request(method, ORDER_PATH) as response:
        reply = await read_reply(response)

    assert_error(reply, 405, "method_not_allowed")


async def test_method_not_allowed_names_the_allowed_method(gateway_client: Client) -> None:
    async with gateway_client.get(ORDER_PATH) as response:
        reply = await read_reply(response)

    assert reply.status == 405
    assert reply.headers.get("Allow") == "POST"


@pytest.fixture
async def small_body_client(make_gateway: MakeGateway) -> Client:
    """A gateway whose server.max_body_mb is about 1 KB."""
    return (await make_gateway(server={"max_body_mb": 0.001})).client


async def test_body_over_max_body_mb_with_content_length_is_payload_too_large(
    small_body_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(small_body_client, flat_order(notes="x" * 2000))

    assert_error(reply, 413, "payload_too_large")
    assert sandbox_state.order_request_attempts == 0


async def test_chunked_body_over_max_body_mb_is_payload_too_large(
    small_body_client: Client, sandbox_state: SandboxState
) -> None:
    raw = json.dumps(flat_order(notes="x" * 4000)).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 500):
            yield raw[start : start + 500]

    headers = {"Content-Type": "application/json", "apikey": KEYS["acme"]}
    async with small_body_client.post(ORDER_PATH, data=chunks(), headers=headers) as response:
        assert "Content-Length" not in response.request_info.headers
        reply = await read_reply(response)

    assert_error(reply, 413, "payload_too_large")
    assert sandbox_state.order_request_attempts == 0


async def test_chunked_body_under_max_body_mb_is_accepted(
    small_body_client: Client, sandbox_state: SandboxState
) -> None:
    raw = json.dumps(flat_order()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield raw[:20]
        yield raw[20:]

    headers = {"Content-Type": "application/json", "apikey": KEYS["acme"]}
    async with small_body_client.post(ORDER_PATH, data=chunks(), headers=headers) as response:
        reply = await read_reply(response)

    assert reply.status == 200, reply.body
    assert len(sandbox_state.received) == 1


async def test_body_over_one_mib_but_under_max_body_mb_is_accepted(
    make_gateway: MakeGateway, start_fake_manager: StartFakeManager
) -> None:
    fake, base_url = await start_fake_manager([200])
    client = (await make_gateway(base_url=base_url, server={"max_body_mb": 4})).client

    reply = await post_order(client, flat_order(notes="x" * 1_500_000))

    assert reply.status == 200, reply.body
    assert len(fake.calls) == 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_body_that_is_neither_json_nor_multipart_is_unsupported_media_type(
    content_type: str, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"Content-Type": content_type}
    reply = await post_order(gateway_client, flat_order(), headers=headers)

    assert_error(reply, 415, "unsupported_media_type")
    assert sandbox_state.order_request_attempts == 0


async def test_json_with_charset_is_accepted(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    reply = await post_order(gateway_client, flat_order(), headers=headers)

    assert reply.status == 200, reply.body


async def test_invalid_order_is_validation_failed_with_field_paths(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    body = {
        "customer_email": "not-an-email",
        "items": [{"name": "Ibuprofen", "quantity": 0}, {"quantity": 1}],
        "total_amount": -1,
    }
    reply = await post_order(gateway_client, body)

    error = assert_error(reply, 422, "validation_failed")
    fields = {detail["field"] for detail in error["details"]}
    assert {
        "payload.customer_email",
        "payload.items[0].quantity",
        "payload.items[1]",
        "payload.total_amount",
    } <= fields
    assert all(isinstance(detail["message"], str) for detail in error["details"])
    assert "not-an-email" not in json.dumps(error)
    # Cheap checks first: nothing reached Manager, not even a token request.
    assert sandbox_state.token_requests == 0
    assert sandbox_state.order_request_attempts == 0


async def test_order_without_customer_or_items_is_validation_failed(
    gateway_client: Client,
) -> None:
    reply = await post_order(gateway_client, {"external_reference": "R-1"})

    error = assert_error(reply, 422, "validation_failed")
    fields = {detail["field"] for detail in error["details"]}
    assert {"payload.customer_name", "payload.items"} <= fields


async def test_partner_that_must_send_a_reference_gets_validation_failed_without_one(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, flat_order(), key=KEYS["strict"])

    error = assert_error(reply, 422, "validation_failed")
    assert [d["field"] for d in error["details"]] == ["external_reference"]
    assert sandbox_state.order_request_attempts == 0

    headers = {"Idempotency-Key": "strict-idem-1"}
    accepted = await post_order(gateway_client, flat_order(), key=KEYS["strict"], headers=headers)
    assert accepted.status == 200, accepted.body
    assert only_received(sandbox_state)["external_reference"] == "strict-idem-1"


@pytest.mark.parametrize(
    "value",
    [
        "this is not base64!",
        "JVBERi0xLjQK\nJSVFT0YK",
        base64.b64encode(b"GIF89a not a pdf at all").decode(),
        base64.b64encode(b"hello").decode().rstrip("="),
    ],
    ids=["not-base64", "line-break", "not-a-pdf", "unpadded"],
)
async def test_bad_inline_prescription_is_prescription_pdf_invalid(
    value: str, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    body = {"customer_email": "max@example.com", "prescription_pdf_base64": value}
    reply = await post_order(gateway_client, body)

    error = assert_error(reply, 422, "prescription_pdf_invalid")
    assert value not in json.dumps(error)
    assert sandbox_state.order_request_attempts == 0


@pytest.mark.parametrize("status", [400, 404, 409, 422])
async def test_manager_refusing_the_order_is_upstream_rejected_with_its_status_and_body(
    status: int, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    manager_body = {"error": "validation_error", "message": "shop_id does not belong to this org"}
    sandbox_state.faults.append(Fault(status, body=manager_body))

    reply = await post_order(gateway_client, flat_order())

    error = assert_error(reply, status, "upstream_rejected")
    assert error["details"] == [manager_body]
    assert sandbox_state.order_request_attempts == 1  # a refusal is not retried


async def test_two_401s_from_order_requests_are_upstream_auth_failed_after_one_new_token(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    refused = {"error": "Invalid or missing API key"}
    sandbox_state.faults += [Fault(401, body=refused), Fault(401, body=refused)]

    reply = await post_order(gateway_client, flat_order())

    error = assert_error(reply, 502, "upstream_auth_failed")
    assert "details" not in error
    assert sandbox_state.token_requests == 2  # the first token, and exactly one new one
    assert sandbox_state.order_request_attempts == 2


async def test_key_of_another_org_is_upstream_auth_failed(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, flat_order(), key=KEYS["mismatch"])

    assert_error(reply, 502, "upstream_auth_failed")
    assert sandbox_state.token_requests == 1  # Manager's 403 org_mismatch is final
    assert sandbox_state.order_request_attempts == 0


async def test_org_mismatch_on_order_requests_is_upstream_auth_failed(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    mismatch = {"error": "org_mismatch", "message": "Token org_id does not match URL orgId"}
    sandbox_state.faults.append(Fault(403, body=mismatch))

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 502, "upstream_auth_failed")
    assert sandbox_state.order_request_attempts == 1


async def test_token_without_the_write_scope_is_upstream_auth_failed(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    body = flat_order()
    reply = await post_order(gateway_client, body, key=KEYS["reader"])

    assert_error(reply, 502, "upstream_auth_failed")
    assert sandbox_state.token_requests == 1
    assert sandbox_state.order_request_attempts == 1
    assert sandbox_state.received == []


async def test_manager_500_is_upstream_unavailable_without_a_retry(
    gateway_client: Client, sandbox_state: SandboxState, fake_time: Any
) -> None:
    sandbox_state.faults.append(Fault(500))

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 502, "upstream_unavailable")
    assert sandbox_state.order_request_attempts == 1
    assert fake_time.delays == []


async def test_three_503s_then_success_is_delivered(
    gateway_client: Client, sandbox_state: SandboxState, fake_time: Any
) -> None:
    sandbox_state.faults += [Fault(503), Fault(503), Fault(503)]

    reply = await post_order(gateway_client, flat_order())

    assert reply.status == 200, reply.body
    assert sandbox_state.order_request_attempts == 4
    assert len(sandbox_state.received) == 1
    assert len(fake_time.delays) == 3


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_transient_status_beyond_the_retries_is_upstream_unavailable(
    status: int, gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults += [Fault(status) for _ in range(4)]

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 502, "upstream_unavailable")
    assert sandbox_state.order_request_attempts == 4  # retries = 3
    assert sandbox_state.received == []


async def test_dropped_connection_is_retried(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults.append(Fault(200, drop=True))

    reply = await post_order(gateway_client, flat_order())

    assert reply.status == 200, reply.body
    assert sandbox_state.order_request_attempts == 2
    assert len(sandbox_state.received) == 1


async def test_dropped_connections_beyond_the_retries_are_upstream_unavailable(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults += [Fault(200, drop=True) for _ in range(4)]

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 502, "upstream_unavailable")
    assert sandbox_state.order_request_attempts == 4


async def test_manager_429_beyond_the_retries_is_503_with_retry_after(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults += [Fault(429, retry_after="2") for _ in range(4)]

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 503, "upstream_unavailable")
    assert reply.headers["Retry-After"] == "2"
    assert sandbox_state.order_request_attempts == 4


async def test_manager_not_answering_within_the_deadline_is_upstream_timeout(
    make_gateway: MakeGateway, sandbox_state: SandboxState
) -> None:
    client = (await make_gateway(manager={"timeout_s": 0.3})).client
    sandbox_state.faults.append(Fault(200, delay_s=1.0))

    reply = await post_order(client, flat_order())

    assert_error(reply, 504, "upstream_timeout")
    assert sandbox_state.order_request_attempts == 1


async def test_a_bug_in_the_pipeline_is_internal_error_without_details(
    gateway_client: Client, sandbox_state: SandboxState, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: object) -> object:
        raise RuntimeError("boom: Max Mustermann max@example.com")

    monkeypatch.setattr(gateway.orders, "parse_envelope", broken)

    reply = await post_order(gateway_client, flat_order())

    error = assert_error(reply, 500, "internal_error")
    text = json.dumps(error)
    for leak in ("boom", "Mustermann", "RuntimeError", "Traceback", "orders.py"):
        assert leak not in text
    assert sandbox_state.order_request_attempts == 0


# --- callers that present the org's own key -----------------------------------------------------


async def test_org_key_on_an_accept_org_keys_host_is_used_upstream_as_is(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"Host": ORG_KEYS_HOST}
    reply = await post_order(gateway_client, flat_order(), key=DEMO_ORG_KEY, headers=headers)

    assert reply.status == 200, reply.body
    assert sandbox_state.token_requests == 1  # exchanged for a v2 token with the caller's key
    received = sandbox_state.received[0]
    assert received["org_id"] == DEMO_ORG_ID and received["api"] == "v2"
    envelope = only_received(sandbox_state)
    assert envelope["source"] == "orgkeys"
    assert envelope["payload"]["shop_id"] == DEMO_SHOP_ID


async def test_org_key_is_not_accepted_on_other_hosts(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, flat_order(), key=DEMO_ORG_KEY)

    assert_error(reply, 401, "unauthorized")
    assert sandbox_state.token_requests == 0


async def test_refused_org_key_is_unauthorized_and_remembered(
    gateway_client: Client, sandbox_state: SandboxState, log_stream: io.StringIO
) -> None:
    headers = {"Host": ORG_KEYS_HOST}
    wrong = "guessed-org-key-123456"

    first = await post_order(gateway_client, flat_order(), key=wrong, headers=headers)
    assert_error(first, 401, "unauthorized")
    assert sandbox_state.token_requests == 1

    second = await post_order(gateway_client, flat_order(), key=wrong, headers=headers)
    assert_error(second, 401, "unauthorized")
    assert sandbox_state.token_requests == 1  # the refusal was remembered: Manager not asked
    assert sandbox_state.order_request_attempts == 0
    assert wrong not in log_stream.getvalue()


# --- request ids, references, paths -------------------------------------------------------------


async def test_callers_request_id_is_echoed(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"X-Request-ID": "partner-req-42:a.b_c"}
    reply = await post_order(gateway_client, flat_order(), headers=headers)

    assert reply.status == 200
    assert reply.headers["X-Request-ID"] == "partner-req-42:a.b_c"


async def test_missing_request_id_is_generated(gateway_client: Client) -> None:
    first = await post_order(gateway_client, flat_order())
    second = await post_order(gateway_client, {}, key=None)

    assert first.headers["X-Request-ID"]
    assert second.body["request_id"] == second.headers["X-Request-ID"]
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


@pytest.mark.parametrize("unsafe", ["has spaces in it", "x" * 200, "a\tb", "<script>"])
async def test_unsafe_request_id_is_replaced(unsafe: str, gateway_client: Client) -> None:
    reply = await post_order(gateway_client, {}, key=None, headers={"X-Request-ID": unsafe})

    assert_error(reply, 401, "unauthorized")
    assert reply.headers["X-Request-ID"] != unsafe
    assert 0 < len(reply.headers["X-Request-ID"]) <= 128


async def test_idempotency_key_becomes_the_external_reference(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    headers = {"Idempotency-Key": "idem-7f3a"}
    reply = await post_order(gateway_client, flat_order(), headers=headers)

    assert reply.status == 200, reply.body
    assert reply.body["external_reference"] == "idem-7f3a"
    assert only_received(sandbox_state)["external_reference"] == "idem-7f3a"


async def test_reference_in_the_body_wins_over_idempotency_key(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    body = flat_order(external_reference="BODY-1")
    reply = await post_order(gateway_client, body, headers={"Idempotency-Key": "idem-2"})

    assert reply.status == 200, reply.body
    assert only_received(sandbox_state)["external_reference"] == "BODY-1"


async def test_reference_is_generated_from_the_partner_name(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, flat_order())

    assert reply.status == 200, reply.body
    reference = only_received(sandbox_state)["external_reference"]
    assert reference.startswith("acme-") and len(reference) > len("acme-") + 30


async def test_trailing_slash_on_the_order_path_works(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    reply = await post_order(gateway_client, flat_order(), path=ORDER_PATH + "/")

    assert reply.status == 200, reply.body
    assert len(sandbox_state.received) == 1


# --- logs ---------------------------------------------------------------------------------------


async def test_request_log_has_the_fields_and_none_of_the_secrets(
    gateway_client: Client, sandbox_state: SandboxState, log_stream: io.StringIO
) -> None:
    pdf_base64 = load_sample("prescription-inline.json")["prescription_pdf_base64"]
    body = {**load_sample("flat-payload.json"), "prescription_pdf_base64": pdf_base64}
    path = f"{ORDER_PATH}?apikey={KEYS['acme']}"
    headers = {"X-Request-ID": "log-req-1"}

    reply = await post_order(gateway_client, body, key=None, path=path, headers=headers)

    assert reply.status == 200, reply.body
    text = log_stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    request_lines = [line for line in lines if line["event"] == "request"]
    assert len(request_lines) == 1
    line = request_lines[0]
    assert line["request_id"] == "log-req-1"
    assert line["partner"] == "acme"
    assert line["status"] == 200
    assert line["external_reference"] == "TM-10001"
    assert line["upstream_status"] == 200
    assert {"time", "level", "duration_ms", "shop"} <= set(line)
    secrets = (
        KEYS["acme"],
        hash_key(KEYS["acme"]),
        DEMO_ORG_KEY,
        "Max Mustermann",
        "Mustermann",
        "max@example.com",
        "Musterstr",
        pdf_base64,
        pdf_base64[:16],
        "eyJ",  # any JWT
    )
    for secret in secrets:
        assert secret not in text, secret


# --- metrics and the admin endpoints ------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_requests_upstream_calls_and_tokens(
    make_gateway: MakeGateway, aiohttp_client: AiohttpClient, sandbox_state: SandboxState
) -> None:
    harness = await make_gateway(server={"admin_port": 0})
    for _ in range(2):
        assert (await post_order(harness.client, flat_order())).status == 200
    assert (await post_order(harness.client, flat_order(), key="nobody")).status == 401
    admin = await aiohttp_client(create_admin_app(harness.gateway))

    async with admin.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = metric_samples(text)

    families = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "gateway_requests",
        "gateway_request_duration_seconds",
        "gateway_upstream_requests",
        "gateway_upstream_duration_seconds",
        "gateway_token_fetches",
        "gateway_pdf_fetches",
    } <= families

    assert samples[("gateway_requests_total", (("code", "200"), ("partner", "acme")))] == 2
    assert samples[("gateway_requests_total", (("code", "401"), ("partner", "unknown")))] == 1
    assert samples[("gateway_upstream_requests_total", (("status", "200"),))] == 2
    assert samples[("gateway_token_fetches_total", (("result", "ok"),))] == 1
    assert samples[("gateway_request_duration_seconds_count", ())] == 3
    assert samples[("gateway_upstream_duration_seconds_count", ())] == 2
    assert ("gateway_request_duration_seconds_bucket", (("le", "+Inf"),)) in samples
    assert ("gateway_upstream_duration_seconds_bucket", (("le", "+Inf"),)) in samples

    # With admin_port = 0 the partner port serves the same registry.
    async with harness.client.get("/metrics") as response:
        assert response.status == 200
        same = metric_samples(await response.text())
    assert same[("gateway_token_fetches_total", (("result", "ok"),))] == 1


async def test_metrics_count_retries_by_upstream_status(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults.append(Fault(503))
    assert (await post_order(gateway_client, flat_order())).status == 200

    async with gateway_client.get("/metrics") as response:
        samples = metric_samples(await response.text())

    assert samples[("gateway_upstream_requests_total", (("status", "503"),))] == 1
    assert samples[("gateway_upstream_requests_total", (("status", "200"),))] == 1


async def test_admin_healthz_and_readyz(
    make_gateway: MakeGateway, aiohttp_client: AiohttpClient
) -> None:
    harness = await make_gateway()
    admin = await aiohttp_client(create_admin_app(harness.gateway))

    async with admin.get("/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    async with admin.get("/readyz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ready"

    harness.gateway.draining = True
    async with admin.get("/readyz") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "draining"
    async with admin.get("/healthz") as response:
        assert response.status == 200


async def test_readyz_is_503_before_the_services_start(
    sandbox: TestServer, aiohttp_client: AiohttpClient
) -> None:
    gateway_ = create_gateway(load_test_config(base_url_of(sandbox)))
    admin = await aiohttp_client(create_admin_app(gateway_))

    async with admin.get("/readyz") as response:
        assert response.status == 503


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_admin_endpoints_are_not_served_on_the_partner_port(
    path: str, make_gateway: MakeGateway
) -> None:
    harness = await make_gateway(server={"admin_port": 9091})

    async with harness.client.get(path) as response:
        reply = await read_reply(response)

    assert_error(reply, 404, "not_found")


async def test_admin_app_answers_unknown_paths_with_json(
    make_gateway: MakeGateway, aiohttp_client: AiohttpClient
) -> None:
    harness = await make_gateway()
    admin = await aiohttp_client(create_admin_app(harness.gateway))

    async with admin.get("/nothing-here") as response:
        reply = await read_reply(response)

    assert_error(reply, 404, "not_found")


async def test_openapi_document_is_served_without_a_key(gateway_client: Client) -> None:
    async with gateway_client.get("/api/v1/openapi.json") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        document = await response.json()

    assert document["openapi"].startswith("3.1")
    assert "/api/v1/external-order" in document["paths"]
