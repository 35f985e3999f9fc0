"""Tests of the PharmaOne Manager sandbox, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.sandbox import (
    ALL_SCOPES,
    DEMO_ORG_ID,
    DEMO_ORG_KEY,
    DEMO_SHOP_ID,
    SANDBOX_KEY,
    Fault,
    SandboxOrg,
    SandboxState,
    create_sandbox_app,
    find_envelope_problem,
)

Client = TestClient[web.Request, web.Application]

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = b"sandbox-test-secret-of-32-bytes-or-more"
TTL = 600
START = 1_700_000_000.0
ORG_A = SandboxOrg("org-a", frozenset({"shop-a1", "shop-a2"}), frozenset({"key-a", "key-a2"}))
ORG_B = SandboxOrg("org-b", frozenset({"shop-b"}), frozenset({"key-b"}))
READER = SandboxOrg("org-r", frozenset({"shop-r"}), frozenset({"key-r"}), scopes=("orders.read",))

TOKEN_A = "/api/v2/public/orgs/org-a/auth/token"
V1_A = "/api/v1/public/orgs/org-a/order-requests"
V2_A = "/api/v2/public/orgs/org-a/order-requests"
LISTING = "/_sandbox/order-requests"

NO_KEY = {"message": "No API key found in request"}
BAD_KEY = {"message": "Unauthorized"}
ORG_MISMATCH = {"error": "org_mismatch", "message": "Token org_id does not match URL orgId"}
BAD_TOKEN = {"error": "Invalid or missing API key"}


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def envelope(**payload: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "shop_id": "shop-a1",
        "customer_name": "Max Mustermann",
        "items": [{"name": "Ibuprofen 400", "quantity": 2, "price": 4.5}],
    }
    base.update(payload)
    return {"external_reference": "REF-1", "source": "test", "payload": base}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, clock: FakeClock) -> Client:
    app = create_sandbox_app(
        orgs=[ORG_A, ORG_B, READER], token_ttl_s=TTL, secret=SECRET, clock=clock
    )
    return await aiohttp_client(app)


def state_of(client: Client) -> SandboxState:
    assert client.app is not None
    return client.app[SANDBOX_KEY]


async def fetch_token(client: Client, org_id: str = "org-a", key: str = "key-a") -> str:
    resp = await client.post(f"/api/v2/public/orgs/{org_id}/auth/token", headers={"apikey": key})
    assert resp.status == 200
    token: str = (await resp.json())["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_kong(body: Mapping[str, object], expected: Mapping[str, str]) -> None:
    assert set(body) == {"message", "request_id"}
    assert body["message"] == expected["message"]
    uuid.UUID(str(body["request_id"]))


# --- token exchange ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"apikey": "key-a"}, {}),
        ({"X-API-Key": "key-a2"}, {}),
        ({}, {"apikey": "key-a"}),
    ],
    ids=["apikey-header", "x-api-key-header", "query"],
)
async def test_token_is_issued_for_a_key_in_any_accepted_place(
    client: Client, headers: dict[str, str], params: dict[str, str]
) -> None:
    resp = await client.post(TOKEN_A, headers=headers, params=params)

    assert resp.status == 200
    body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == TTL
    # The fake clock is years in the past, so real-time expiry checking is off here.
    claims = jwt.decode(
        body["access_token"], SECRET, algorithms=["HS256"], options={"verify_exp": False}
    )
    assert claims == {
        "org_id": "org-a",
        "scopes": list(ALL_SCOPES),
        "iss": "pharmaone-integration",
        "sub": "integration",
        "iat": int(START),
        "exp": int(START) + TTL,
    }
    assert state_of(client).token_requests == 1


async def test_token_scopes_are_the_orgs_scopes(client: Client) -> None:
    token = await fetch_token(client, "org-r", "key-r")

    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["scopes"] == ["orders.read"]


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        ({}, 401, NO_KEY),
        ({"apikey": ""}, 401, NO_KEY),
        ({"apikey": "no-such-key"}, 401, BAD_KEY),
    ],
    ids=["missing", "empty", "unknown"],
)
async def test_token_exchange_refuses_missing_or_unknown_keys_kong_style(
    client: Client, headers: dict[str, str], status: int, expected: dict[str, str]
) -> None:
    resp = await client.post(TOKEN_A, headers=headers)

    assert resp.status == status
    assert_kong(await resp.json(), expected)
    assert state_of(client).token_requests == 1


async def test_token_exchange_refuses_a_key_of_another_org(client: Client) -> None:
    resp = await client.post(TOKEN_A, headers={"apikey": "key-b"})

    assert resp.status == 403
    assert await resp.json() == ORG_MISMATCH


def test_all_scopes_are_the_ten_documented_ones() -> None:
    assert len(ALL_SCOPES) == len(set(ALL_SCOPES)) == 10
    assert "order_requests.write" in ALL_SCOPES


# --- v2 order requests ------------------------------------------------------------------------


async def test_v2_order_request_is_accepted_and_listed(client: Client, clock: FakeClock) -> None:
    token = await fetch_token(client)
    sent = envelope()

    resp = await client.post(V2_A, json=sent, headers=bearer(token))

    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "id": body["id"],
        "external_reference": "REF-1",
        "message": "Order request received.",
        "status": "pending",
    }
    assert uuid.UUID(body["id"]).version == 4
    listing = await (await client.get(LISTING)).json()
    assert listing["token_requests"] == 1
    assert listing["order_request_attempts"] == 1
    [received] = listing["order_requests"]
    assert received["id"] == body["id"]
    assert received["org_id"] == "org-a"
    assert received["api"] == "v2"
    assert received["envelope"] == sent
    assert datetime.fromisoformat(received["received_at"]) == datetime.fromtimestamp(START, UTC)


async def test_repeated_external_reference_is_not_deduplicated(client: Client) -> None:
    token = await fetch_token(client)

    first = await (await client.post(V2_A, json=envelope(), headers=bearer(token))).json()
    second = await (await client.post(V2_A, json=envelope(), headers=bearer(token))).json()

    assert first["id"] != second["id"]
    assert len(state_of(client).received) == 2


async def test_missing_external_reference_is_answered_as_null(client: Client) -> None:
    sent = envelope()
    del sent["external_reference"]

    resp = await client.post(V1_A, json=sent, headers={"apikey": "key-a"})

    assert resp.status == 200
    assert (await resp.json())["external_reference"] is None


def foreign_token(**overrides: Any) -> str:
    claims: dict[str, Any] = {
        "org_id": "org-a",
        "scopes": list(ALL_SCOPES),
        "iss": "pharmaone-integration",
        "sub": "integration",
        "iat": int(START),
        "exp": int(START) + TTL,
    }
    secret = overrides.pop("secret", SECRET)
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, "HS256")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Basic {foreign_token()}"},
        bearer(foreign_token(secret=b"another-secret-also-32-bytes-long!!")),
        bearer(foreign_token(iss="someone-else")),
        bearer(foreign_token(exp=None)),
        bearer(foreign_token(exp="tomorrow")),
        bearer(foreign_token(exp=int(START) - 1)),
    ],
    ids=[
        "none",
        "empty",
        "no-token",
        "garbage",
        "not-bearer",
        "wrong-secret",
        "wrong-issuer",
        "no-exp",
        "exp-not-a-number",
        "expired",
    ],
)
async def test_v2_refuses_missing_or_invalid_bearer_tokens(
    client: Client, headers: dict[str, str]
) -> None:
    resp = await client.post(V2_A, json=envelope(), headers=headers)

    assert resp.status == 401
    assert await resp.json() == BAD_TOKEN
    assert state_of(client).received == []
    assert state_of(client).order_request_attempts == 1


async def test_v2_refuses_a_well_signed_token_of_an_org_it_does_not_have(client: Client) -> None:
    token = foreign_token(org_id="org-gone")

    resp = await client.post(
        "/api/v2/public/orgs/org-gone/order-requests", json=envelope(), headers=bearer(token)
    )

    assert resp.status == 401
    assert await resp.json() == BAD_TOKEN


async def test_token_expires_by_the_injected_clock(client: Client, clock: FakeClock) -> None:
    token = await fetch_token(client)

    clock.now = START + TTL - 1
    still_valid = await client.post(V2_A, json=envelope(), headers=bearer(token))
    clock.now = START + TTL
    expired = await client.post(V2_A, json=envelope(), headers=bearer(token))

    assert still_valid.status == 200
    assert expired.status == 401
    assert await expired.json() == BAD_TOKEN


async def test_token_issued_in_the_real_future_is_valid_by_the_injected_clock(
    client: Client, clock: FakeClock
) -> None:
    # PyJWT would refuse an iat after real time; the sandbox judges time by its own clock only.
    clock.now = 4_000_000_000.0
    token = await fetch_token(client)

    resp = await client.post(V2_A, json=envelope(), headers=bearer(token))

    assert resp.status == 200


async def test_v2_refuses_a_token_of_another_org(client: Client) -> None:
    token = await fetch_token(client, "org-b", "key-b")

    resp = await client.post(V2_A, json=envelope(), headers=bearer(token))

    assert resp.status == 403
    assert await resp.json() == ORG_MISMATCH


async def test_v2_refuses_a_token_without_the_write_scope(client: Client) -> None:
    token = await fetch_token(client, "org-r", "key-r")

    resp = await client.post(
        "/api/v2/public/orgs/org-r/order-requests",
        json=envelope(shop_id="shop-r"),
        headers=bearer(token),
    )

    assert resp.status == 403
    assert await resp.json() == {
        "error": "insufficient_scope",
        "message": "Missing scope: order_requests.write",
    }
    assert state_of(client).received == []


# --- v1 order requests ------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["apikey", "X-API-Key"])
async def test_v1_order_request_is_accepted_with_the_org_key(client: Client, header: str) -> None:
    resp = await client.post(V1_A, json=envelope(shop_id="shop-a2"), headers={header: "key-a"})

    assert resp.status == 200
    assert (await resp.json())["status"] == "pending"
    [received] = state_of(client).received
    assert (received["api"], received["org_id"]) == ("v1", "org-a")


@pytest.mark.parametrize(
    ("headers", "params", "status", "expected"),
    [
        ({}, {}, 401, NO_KEY),
        # Manager's v1 wants the key in a header on every call; the query is for token exchange.
        ({}, {"apikey": "key-a"}, 401, NO_KEY),
        ({"apikey": "no-such-key"}, {}, 401, BAD_KEY),
        ({"X-API-Key": "no-such-key"}, {}, 401, BAD_KEY),
        ({"apikey": "key-b"}, {}, 403, ORG_MISMATCH),
    ],
    ids=["missing", "query-only", "unknown", "unknown-x-api-key", "other-org"],
)
async def test_v1_refusals(
    client: Client,
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
    expected: dict[str, str],
) -> None:
    resp = await client.post(V1_A, json=envelope(), headers=headers, params=params)

    assert resp.status == status
    body = await resp.json()
    if "request_id" in body:
        assert_kong(body, expected)
    else:
        assert body == expected
    assert state_of(client).received == []
    assert state_of(client).order_request_attempts == 1


async def test_v1_does_not_accept_a_bearer_token(client: Client) -> None:
    token = await fetch_token(client)

    resp = await client.post(V1_A, json=envelope(), headers=bearer(token))

    assert resp.status == 401
    assert_kong(await resp.json(), NO_KEY)


# --- validation -------------------------------------------------------------------------------


VALIDATION_CASES: list[tuple[str, object, str, str]] = [
    ("not-json", b"{not json", "invalid_body", "JSON object"),
    ("not-utf8", b"\xff\xfe\xfa", "invalid_body", "JSON object"),
    ("empty", b"", "invalid_body", "JSON object"),
    ("json-list", [envelope()], "invalid_body", "JSON object"),
    ("payload-missing", {"external_reference": "R"}, "validation_error", "payload is required"),
    ("payload-string", {"payload": "x"}, "validation_error", "payload is required"),
    ("shop-missing", envelope(shop_id=None), "validation_error", "shop_id is required"),
    ("shop-blank", envelope(shop_id=" "), "validation_error", "shop_id is required"),
    ("shop-other-org", envelope(shop_id="shop-b"), "validation_error", "does not belong"),
    (
        "no-customer",
        envelope(customer_name=None),
        "validation_error",
        "customer_name or customer_email",
    ),
    (
        "blank-customer",
        envelope(customer_name="", customer_email=" "),
        "validation_error",
        "customer",
    ),
    ("no-items", envelope(items=None), "validation_error", "items are required"),
    ("empty-items", envelope(items=[]), "validation_error", "items are required"),
    ("items-not-list", envelope(items={"name": "x", "quantity": 1}), "validation_error", "list"),
    ("line-not-object", envelope(items=["x"]), "validation_error", "items[0]"),
    (
        "quantity-zero",
        envelope(items=[{"name": "x", "quantity": 0}]),
        "validation_error",
        "items[0]",
    ),
    (
        "quantity-negative",
        envelope(items=[{"name": "x", "quantity": -1}]),
        "validation_error",
        "quantity > 0",
    ),
    (
        "quantity-string",
        envelope(items=[{"name": "x", "quantity": "2"}]),
        "validation_error",
        "quantity > 0",
    ),
    (
        "quantity-bool",
        envelope(items=[{"name": "x", "quantity": True}]),
        "validation_error",
        "quantity > 0",
    ),
    ("qty-instead", envelope(items=[{"name": "x", "qty": 1}]), "validation_error", "items[0]"),
    (
        "second-line-no-id",
        envelope(items=[{"p1_id": "1", "quantity": 1}, {"price": 2, "quantity": 1}]),
        "validation_error",
        "items[1]",
    ),
    (
        "invalid-line-beside-prescription",
        envelope(items=[{"name": "x", "quantity": 0}], prescription_pdf_url="https://x/r.pdf"),
        "validation_error",
        "items[0]",
    ),
    (
        "blank-prescription",
        envelope(items=None, prescription_pdf_base64="", prescription_pdf_url=" "),
        "validation_error",
        "prescription_pdf_url",
    ),
]


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
async def test_invalid_order_requests_are_refused_like_manager(
    client: Client, body: object, error: str, message: str
) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}

    resp = await client.post(V1_A, headers={"apikey": "key-a"}, **kwargs)

    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == error
    assert message in answer["message"]
    assert state_of(client).received == []


@pytest.mark.parametrize(
    "payload",
    [
        {"customer_name": None, "customer_email": "max@example.com"},
        {"items": None, "prescription_pdf_url": "https://doc.example/rx.pdf"},
        {"items": [], "prescription_pdf_base64": "JVBERi0xLjQK"},
        {"items": [{"p1_id": "12345", "quantity": 1}]},
        {"items": [{"p1_id": 12345, "quantity": 1}]},
        {"items": [{"product_id": 7, "quantity": 0.5}]},
    ],
    ids=["email-only", "prescription-url", "prescription-pdf", "p1-id", "numeric-p1-id", "prod"],
)
async def test_valid_variants_are_accepted(client: Client, payload: dict[str, Any]) -> None:
    token = await fetch_token(client)

    resp = await client.post(V2_A, json=envelope(**payload), headers=bearer(token))

    assert resp.status == 200
    assert len(state_of(client).received) == 1


async def test_v2_validates_the_body_too(client: Client) -> None:
    token = await fetch_token(client)

    resp = await client.post(V2_A, json=envelope(shop_id="shop-b"), headers=bearer(token))

    assert resp.status == 400
    assert await resp.json() == {
        "error": "validation_error",
        "message": "shop_id does not belong to this organisation",
    }


def test_envelope_check_is_pure_and_accepts_the_documented_example() -> None:
    example = {
        "external_reference": "POS-123",
        "source": "pos-system",
        "payload": {
            "shop_id": "shop1",
            "customer_name": "Max Mustermann",
            "customer_email": "max@example.com",
            "total_amount": 42.99,
            "items": [{"name": "Product name", "quantity": 5, "price": 8.59, "p1_id": "12345"}],
        },
    }

    assert find_envelope_problem(example, frozenset({"shop1"})) is None
    assert find_envelope_problem(example, frozenset({"shop2"})) is not None


# --- listing and reset ------------------------------------------------------------------------


async def test_reset_clears_received_counters_and_faults(client: Client) -> None:
    await fetch_token(client)
    await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    state_of(client).faults.append(Fault(503))

    resp = await client.delete(LISTING)

    assert resp.status == 204
    assert await (await client.get(LISTING)).json() == {
        "order_requests": [],
        "token_requests": 0,
        "order_request_attempts": 0,
    }
    assert state_of(client).faults == []
    after = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    assert after.status == 200


# --- faults -----------------------------------------------------------------------------------


async def test_scripted_faults_are_answered_in_order_then_normal_service_resumes(
    client: Client,
) -> None:
    faults = [
        {"status": 503, "retry_after": "7"},
        {"status": 429, "body": {"error": "slow_down"}},
    ]
    scripted = await client.post("/_sandbox/faults", json=faults)
    assert scripted.status == 201

    first = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    second = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    third = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})

    assert (first.status, first.headers.get("Retry-After")) == (503, "7")
    assert await first.json() == {"error": "sandbox_fault"}
    assert (second.status, second.headers.get("Retry-After")) == (429, None)
    assert await second.json() == {"error": "slow_down"}
    assert third.status == 200
    listing = await (await client.get(LISTING)).json()
    assert listing["order_request_attempts"] == 3
    assert len(listing["order_requests"]) == 1


async def test_a_fault_preempts_authentication(client: Client) -> None:
    state_of(client).faults.append(Fault(500))

    resp = await client.post(V2_A, json=envelope())

    assert resp.status == 500


async def test_faults_only_hit_their_endpoint(client: Client) -> None:
    resp = await client.post("/_sandbox/faults", json={"status": 502, "endpoint": "token"})
    assert resp.status == 201

    order = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    faulted = await client.post(TOKEN_A, headers={"apikey": "key-a"})
    recovered = await client.post(TOKEN_A, headers={"apikey": "key-a"})

    assert order.status == 200
    assert faulted.status == 502
    assert await faulted.json() == {"error": "sandbox_fault"}
    assert recovered.status == 200
    assert state_of(client).token_requests == 2


async def test_a_delayed_fault_answers_after_its_delay(client: Client) -> None:
    state_of(client).faults.append(Fault(504, delay_s=0.05))
    loop = asyncio.get_running_loop()

    started = loop.time()
    resp = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})

    assert resp.status == 504
    assert loop.time() - started >= 0.05


async def test_a_delayed_fault_provokes_a_client_timeout(client: Client) -> None:
    state_of(client).faults.append(Fault(200, delay_s=0.15))

    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            V1_A,
            json=envelope(),
            headers={"apikey": "key-a"},
            timeout=aiohttp.ClientTimeout(total=0.02),
        )
    assert state_of(client).received == []


async def test_a_dropped_connection_is_a_client_connection_error(client: Client) -> None:
    state_of(client).faults.append(Fault(200, drop=True))

    with pytest.raises(aiohttp.ClientConnectionError):
        await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})

    assert state_of(client).received == []
    assert state_of(client).order_request_attempts == 1
    after = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    assert after.status == 200


async def test_a_dropped_token_exchange_is_a_client_connection_error(client: Client) -> None:
    await client.post("/_sandbox/faults", json={"status": 200, "endpoint": "token", "drop": True})

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post(TOKEN_A, headers={"apikey": "key-a"})

    assert state_of(client).faults == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        {"endpoint": "token"},
        {"status": "503"},
        {"status": True},
        {"status": 99},
        {"status": 503, "colour": "red"},
        {"status": 503, "endpoint": "orders"},
        {"status": 503, "drop": "yes"},
        {"status": 503, "delay_s": -1},
        b'{"status": 503, "delay_s": Infinity}',
        {"status": 503, "retry_after": 7},
        {"status": 503, "body": ["x"]},
        [{"status": 503}, 5],
    ],
)
async def test_malformed_faults_are_refused_and_none_queued(client: Client, body: object) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}

    resp = await client.post("/_sandbox/faults", **kwargs)

    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_body"
    assert state_of(client).faults == []


async def test_fault_fields_arrive_intact(client: Client) -> None:
    fault = {
        "status": 503,
        "body": {"error": "x"},
        "retry_after": "3",
        "delay_s": 0.01,
        "endpoint": "token",
        "drop": False,
    }

    resp = await client.post("/_sandbox/faults", json=[fault, {"status": 500}])

    assert resp.status == 201
    assert await resp.json() == {"queued": 2}
    assert state_of(client).faults == [
        Fault(503, {"error": "x"}, "3", 0.01, "token", False),
        Fault(500),
    ]


# --- everything else --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("POST", "/api/v3/public/orgs/org-a/order-requests"),
        ("POST", "/api/v1/public/orgs/org-a/auth/token"),
        ("GET", "/api/v2/public/orgs/org-a/orders"),
    ],
)
async def test_unknown_paths_get_kongs_404(client: Client, method: str, path: str) -> None:
    resp = await client.request(method, path)

    assert resp.status == 404
    assert await resp.json() == {"message": "no Route matched with those values"}


async def test_default_app_serves_the_demo_org(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_sandbox_app())
    token_resp = await client.post(
        f"/api/v2/public/orgs/{DEMO_ORG_ID}/auth/token", headers={"apikey": DEMO_ORG_KEY}
    )
    token = (await token_resp.json())["access_token"]

    resp = await client.post(
        f"/api/v2/public/orgs/{DEMO_ORG_ID}/order-requests",
        json=envelope(shop_id=DEMO_SHOP_ID),
        headers=bearer(token),
    )

    assert resp.status == 200
    assert state_of(client).token_ttl_s == 3600


@pytest.mark.parametrize(
    "orgs",
    [
        [ORG_A, SandboxOrg("org-a", frozenset({"s"}), frozenset({"other"}))],
        [ORG_A, SandboxOrg("org-c", frozenset({"s"}), frozenset({"key-a"}))],
    ],
    ids=["same-id", "shared-key"],
)
def test_ambiguous_orgs_are_refused(orgs: list[SandboxOrg]) -> None:
    with pytest.raises(ValueError, match="distinct"):
        create_sandbox_app(orgs=orgs)


async def test_run_sandbox_serves_the_demo_org_and_prints_no_key(unused_tcp_port: int) -> None:
    code = f"from gateway.sandbox import run_sandbox; run_sandbox('127.0.0.1', {unused_tcp_port})"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        assert line == (
            f"sandbox listening on http://127.0.0.1:{unused_tcp_port} "
            f"(org {DEMO_ORG_ID}, shop {DEMO_SHOP_ID})\n"
        )
        url = f"http://127.0.0.1:{unused_tcp_port}{LISTING}"
        async with aiohttp.ClientSession() as session:
            status = await poll_status(session, url)
        assert status == 200
    finally:
        proc.terminate()
        _, rest = await proc.communicate()
    assert DEMO_ORG_KEY.encode() not in rest


async def poll_status(session: aiohttp.ClientSession, url: str) -> int:
    """The status of GET url, retried while the child process is still binding its port."""
    for _ in range(250):
        try:
            async with session.get(url) as resp:
                return resp.status
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.02)
    raise AssertionError(f"nothing listened at {url}")


# --- outage -----------------------------------------------------------------------------------


async def test_an_outage_answers_every_call_until_it_is_ended(client: Client) -> None:
    started = await client.post("/_sandbox/outage", json={"status": 502})
    assert started.status == 201
    for _ in range(3):
        refused = await client.post(TOKEN_A, headers={"apikey": "key-a"})
        assert refused.status == 502
    ended = await client.delete("/_sandbox/outage")
    assert ended.status == 204
    token = await client.post(TOKEN_A, headers={"apikey": "key-a"})
    assert token.status == 200


async def test_an_outage_without_a_body_is_a_503_and_a_bad_one_is_refused(client: Client) -> None:
    assert (await client.post("/_sandbox/outage")).status == 201
    refused = await client.post(V1_A, json=envelope(), headers={"apikey": "key-a"})
    assert refused.status == 503
    bad = await client.post("/_sandbox/outage", json={"status": "down"})
    assert bad.status == 400
    await client.delete("/_sandbox/order-requests")
    assert state_of(client).outage is None
