"""The Manager client and its token cache: against the sandbox, a scripted fake and aioresponses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from conftest import (
    KEYS,
    Client,
    FakeTime,
    MakeGateway,
    StartFakeManager,
    StartSandbox,
    assert_error,
    base_url_of,
    flat_order,
    post_order,
)
from yarl import URL

from gateway.config import ManagerConfig
from gateway.errors import UpstreamAuthFailedError, UpstreamUnavailableError
from gateway.manager import ManagerClient, UpstreamTarget
from gateway.observability import Metrics
from gateway.sandbox import DEMO_ORG_KEY, SANDBOX_KEY, Fault, SandboxState

# --- tokens -------------------------------------------------------------------------------------


async def test_token_is_fetched_once_for_20_concurrent_first_requests(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    replies = await asyncio.gather(
        *(post_order(gateway_client, flat_order(external_reference=f"C-{i}")) for i in range(20))
    )

    assert [r.status for r in replies] == [200] * 20
    assert sandbox_state.token_requests == 1
    assert len(sandbox_state.received) == 20


async def test_token_is_renewed_before_it_expires(
    start_sandbox: StartSandbox, make_gateway: MakeGateway, fake_time: FakeTime
) -> None:
    # Tokens of 300 s are renewed 60 s before exp: after 240 s.
    short = await start_sandbox(token_ttl_s=300)
    state = short.app[SANDBOX_KEY]
    client = (await make_gateway(base_url=base_url_of(short))).client

    assert (await post_order(client, flat_order())).status == 200
    assert state.token_requests == 1

    fake_time.now += 230
    assert (await post_order(client, flat_order())).status == 200
    assert state.token_requests == 1

    fake_time.now += 20  # 250 s after the first token: past renew_at, before exp
    assert (await post_order(client, flat_order())).status == 200
    assert state.token_requests == 2

    assert (await post_order(client, flat_order())).status == 200
    assert state.token_requests == 2
    assert len(state.received) == 4


async def test_token_past_its_expiry_is_never_used(
    start_sandbox: StartSandbox, make_gateway: MakeGateway, fake_time: FakeTime
) -> None:
    short = await start_sandbox(token_ttl_s=300)
    state = short.app[SANDBOX_KEY]
    client = (await make_gateway(base_url=base_url_of(short))).client
    assert (await post_order(client, flat_order())).status == 200

    fake_time.now += 301  # the sandbox would refuse the old token with a 401
    reply = await post_order(client, flat_order())

    assert reply.status == 200, reply.body
    assert state.token_requests == 2
    assert state.order_request_attempts == 2  # no refused attempt with the expired token


async def test_one_401_leads_to_one_new_token_and_one_retry(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults.append(Fault(401, body={"error": "Invalid or missing API key"}))

    reply = await post_order(gateway_client, flat_order())

    assert reply.status == 200, reply.body
    assert sandbox_state.token_requests == 2
    assert sandbox_state.order_request_attempts == 2
    assert len(sandbox_state.received) == 1


async def test_two_401s_are_upstream_auth_failed_with_exactly_one_new_token(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults += [Fault(401), Fault(401)]

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 502, "upstream_auth_failed")
    assert sandbox_state.token_requests == 2
    assert sandbox_state.order_request_attempts == 2


async def test_token_endpoint_503_is_retried(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    sandbox_state.faults.append(Fault(503, endpoint="token"))

    reply = await post_order(gateway_client, flat_order())

    assert reply.status == 200, reply.body
    assert sandbox_state.token_requests == 2
    assert sandbox_state.order_request_attempts == 1


# --- retries ------------------------------------------------------------------------------------


async def test_retries_reuse_the_same_external_reference(
    make_gateway: MakeGateway, start_fake_manager: StartFakeManager
) -> None:
    fake, base_url = await start_fake_manager([503, 503, 200])
    client = (await make_gateway(base_url=base_url)).client

    reply = await post_order(client, flat_order())  # no reference: the gateway makes one

    assert reply.status == 200, reply.body
    bodies = [json.loads(body) for _, _, body in fake.calls]
    assert len(bodies) == 3
    references = {body["external_reference"] for body in bodies}
    assert references == {reply.body["external_reference"]}
    assert bodies[0] == bodies[1] == bodies[2]


@pytest.mark.parametrize(("status", "answer"), [(503, 502), (429, 503)])
async def test_retries_stop_at_the_deadline(
    status: int,
    answer: int,
    make_gateway: MakeGateway,
    start_fake_manager: StartFakeManager,
    fake_time: FakeTime,
) -> None:
    fake_time.advance_on_sleep = True
    fake, base_url = await start_fake_manager([status] * 20)
    manager = {"retries": 10, "timeout_s": 1.0}
    client = (await make_gateway(base_url=base_url, manager=manager)).client

    reply = await post_order(client, flat_order())

    assert_error(reply, answer, "upstream_unavailable")
    assert sum(fake_time.delays) <= 1.0
    assert len(fake.calls) == len(fake_time.delays) + 1
    assert len(fake.calls) < 11  # fewer attempts than retries = 10 would allow


@pytest.mark.parametrize(
    ("retry_after", "at_least"),
    [("2", 2.0), (formatdate(1_700_000_003.0, usegmt=True), 3.0)],
    ids=["seconds", "http-date"],
)
async def test_retry_after_of_a_429_is_honoured(
    retry_after: str,
    at_least: float,
    gateway_client: Client,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
) -> None:
    sandbox_state.faults.append(Fault(429, retry_after=retry_after))

    reply = await post_order(gateway_client, flat_order())

    assert reply.status == 200, reply.body
    assert len(fake_time.delays) == 1
    assert fake_time.delays[0] >= at_least
    assert sandbox_state.order_request_attempts == 2


async def test_retry_after_beyond_the_deadline_is_not_waited_for(
    gateway_client: Client, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    sandbox_state.faults.append(Fault(429, retry_after="120"))  # timeout_s is 5

    reply = await post_order(gateway_client, flat_order())

    assert_error(reply, 503, "upstream_unavailable")
    assert int(reply.headers["Retry-After"]) >= 120
    assert fake_time.delays == []
    assert sandbox_state.order_request_attempts == 1


# --- v1 -----------------------------------------------------------------------------------------


async def test_v1_shop_sends_no_token_request(
    gateway_client: Client, sandbox_state: SandboxState
) -> None:
    for _ in range(2):
        reply = await post_order(gateway_client, flat_order(), key=KEYS["legacy"])
        assert reply.status == 200, reply.body

    assert sandbox_state.token_requests == 0
    assert [r["api"] for r in sandbox_state.received] == ["v1", "v1"]


async def test_v1_shop_sends_the_org_key_in_apikey_on_every_call(
    make_gateway: MakeGateway, start_fake_manager: StartFakeManager
) -> None:
    fake, base_url = await start_fake_manager([503, 200, 200])
    client = (await make_gateway(base_url=base_url)).client

    for _ in range(2):
        reply = await post_order(client, flat_order(), key=KEYS["legacy"])
        assert reply.status == 200, reply.body

    assert fake.token_requests == 0
    assert len(fake.calls) == 3
    for path, headers, _ in fake.calls:
        assert path == "/api/v1/public/orgs/demo-org/order-requests"
        assert headers["apikey"] == DEMO_ORG_KEY
        assert "Authorization" not in headers


async def test_v2_shop_sends_a_bearer_token_and_no_key(
    make_gateway: MakeGateway, start_fake_manager: StartFakeManager
) -> None:
    fake, base_url = await start_fake_manager([200])
    client = (await make_gateway(base_url=base_url)).client

    assert (await post_order(client, flat_order())).status == 200

    [(path, headers, _)] = fake.calls
    assert path == "/api/v2/public/orgs/demo-org/order-requests"
    assert headers["Authorization"] == "Bearer fake-token"
    assert "apikey" not in headers and "X-API-Key" not in headers


# --- the client alone, with aioresponses --------------------------------------------------------

BASE = "http://127.0.0.1:9"  # never contacted: aioresponses answers every call
ORG = "org-x"
TOKEN_URL = f"{BASE}/api/v2/public/orgs/{ORG}/auth/token"
V2_URL = f"{BASE}/api/v2/public/orgs/{ORG}/order-requests"
V1_URL = f"{BASE}/api/v1/public/orgs/{ORG}/order-requests"
V2_TARGET = UpstreamTarget(org_id=ORG, api="v2", key="org-x-key")
BODY = json.dumps({"external_reference": "R-1", "source": "t", "payload": {}}).encode()
OK = {"id": "1", "external_reference": "R-1", "status": "pending"}


class _NoStreamWriter:
    output_size = 0


class CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without aiohttp 3.14's ``stream_writer``.

    pnuckowski/aioresponses#289 (open); remove once a fixed aioresponses is released.
    """

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _NoStreamWriter())
        super().__init__(method, url, **kwargs)


def mock_post(mocked: aioresponses, url: str, **reply: Any) -> None:
    mocked.post(url, response_class=CompatResponse, **reply)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def direct_client(metrics: Metrics, fake_time: FakeTime) -> AsyncIterator[ManagerClient]:
    config = ManagerConfig(base_url=BASE, timeout_s=5, retries=2)
    async with aiohttp.ClientSession() as session:
        yield ManagerClient(
            session,
            config,
            metrics=metrics,
            clock=fake_time.clock,
            sleep=fake_time.sleep,
            rand=lambda: 0.5,
        )


def calls(mocked: aioresponses, url: str) -> int:
    return len(mocked.requests.get(("POST", URL(url)), []))


@pytest.mark.parametrize(
    "token_reply",
    [
        {"body": "<html>gateway error</html>", "content_type": "text/html"},
        {"payload": {"token_type": "Bearer", "expires_in": 3600}},
        {"payload": {"access_token": 42, "expires_in": 3600}},
        {"payload": ["not", "an", "object"]},
        {"payload": {"access_token": "t", "expires_in": 0}},
    ],
    ids=["not-json", "no-access-token", "token-not-a-string", "not-an-object", "expired"],
)
async def test_unusable_token_reply_is_upstream_unavailable(
    token_reply: dict[str, object], direct_client: ManagerClient, metrics: Metrics
) -> None:
    with aioresponses() as mocked:
        mock_post(mocked, TOKEN_URL, status=200, **token_reply)
        with pytest.raises(UpstreamUnavailableError) as caught:
            await direct_client.send_order_request(V2_TARGET, BODY)
        assert calls(mocked, V2_URL) == 0

    assert caught.value.http_status == 502
    assert caught.value.code == "upstream_unavailable"
    sample = metrics.registry.get_sample_value
    assert sample("gateway_token_fetches_total", {"result": "invalid"}) == 1


async def test_token_endpoint_401_is_upstream_auth_failed(
    direct_client: ManagerClient, metrics: Metrics
) -> None:
    with aioresponses() as mocked:
        mock_post(mocked, TOKEN_URL, status=401, payload={"message": "Unauthorized"})
        with pytest.raises(UpstreamAuthFailedError) as caught:
            await direct_client.send_order_request(V2_TARGET, BODY)
        assert calls(mocked, TOKEN_URL) == 1
        assert calls(mocked, V2_URL) == 0

    assert caught.value.http_status == 502
    sample = metrics.registry.get_sample_value
    assert sample("gateway_token_fetches_total", {"result": "refused"}) == 1


async def test_connection_reset_on_order_requests_is_retried(
    direct_client: ManagerClient, metrics: Metrics, fake_time: FakeTime
) -> None:
    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    with aioresponses() as mocked:
        mock_post(mocked, TOKEN_URL, payload={"access_token": "tok", "expires_in": 3600})
        mock_post(mocked, V2_URL, exception=reset)
        mock_post(mocked, V2_URL, payload=OK)
        reply = await direct_client.send_order_request(V2_TARGET, BODY)
        assert calls(mocked, V2_URL) == 2
        assert calls(mocked, TOKEN_URL) == 1
        sent = mocked.requests[("POST", URL(V2_URL))]
        assert [c.kwargs["data"] for c in sent] == [BODY, BODY]
        assert sent[1].kwargs["headers"]["Authorization"] == "Bearer tok"

    assert reply.status == 200
    assert json.loads(reply.body) == OK
    assert len(fake_time.delays) == 1
    sample = metrics.registry.get_sample_value
    assert sample("gateway_upstream_requests_total", {"status": "error"}) == 1
    assert sample("gateway_upstream_requests_total", {"status": "200"}) == 1


async def test_connection_resets_beyond_the_retries_are_upstream_unavailable(
    direct_client: ManagerClient,
) -> None:
    with aioresponses() as mocked:
        mock_post(mocked, TOKEN_URL, payload={"access_token": "tok", "expires_in": 3600})
        mock_post(mocked, V2_URL, exception=aiohttp.ServerDisconnectedError(), repeat=True)
        with pytest.raises(UpstreamUnavailableError) as caught:
            await direct_client.send_order_request(V2_TARGET, BODY)
        assert calls(mocked, V2_URL) == 3  # retries = 2

    assert caught.value.http_status == 502


async def test_v1_target_sends_the_org_key_on_every_call_and_no_token_request(
    direct_client: ManagerClient,
) -> None:
    target = UpstreamTarget(org_id=ORG, api="v1", key="org-x-key")
    with aioresponses() as mocked:
        mock_post(mocked, V1_URL, status=502)
        mock_post(mocked, V1_URL, payload=OK)
        reply = await direct_client.send_order_request(target, BODY)
        sent = mocked.requests[("POST", URL(V1_URL))]
        assert calls(mocked, TOKEN_URL) == 0

    assert reply.status == 200
    assert len(sent) == 2
    for call in sent:
        assert call.kwargs["headers"]["apikey"] == "org-x-key"
        assert "Authorization" not in call.kwargs["headers"]
