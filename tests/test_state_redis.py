"""The Redis state backend against a real ``redis-server`` on a loopback port of its own.

The store's semantics (the same as the memory store's), atomicity across connections, the shared
token bucket and token cache, and, through HTTP, two gateway apps sharing one Redis in front of
one sandbox: one order per reference, one rate limit, one token, and ``503 state_unavailable``
while Redis is down. Redis keeps real time, so the expiry tests sleep a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import (
    ENVIRON,
    Client,
    RedisServer,
    Reply,
    assert_error,
    base_url_of,
    flat_order,
    gateway_toml,
    post_order,
    toml_table,
)
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import Seams, create_admin_app, create_app
from gateway.auth import hash_key
from gateway.config import Config, parse_config
from gateway.errors import StateUnavailableError
from gateway.gateway import GATEWAY_KEY
from gateway.idempotency import build_key
from gateway.routes import REPLAYED_HEADER
from gateway.sandbox import DEMO_ORG_ID, DEMO_ORG_KEY, SANDBOX_KEY, SandboxState, create_sandbox_app
from gateway.state import Claim, ClaimStatus, StoredReply
from gateway.state.redis import NAMESPACE, RedisStore, RedisTokens
from gateway.tokens import Token


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def other_store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A second store with its own connection pool: another process, as far as Redis knows."""
    store = RedisStore(redis_url)
    try:
        yield store
    finally:
        await store.close()


async def all_keys(url: str) -> list[str]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(await client.keys("*"))
    finally:
        await client.aclose()


async def pttl_ms(url: str, key: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int(await client.pttl(key))
    finally:
        await client.aclose()


async def wait_until(check: Callable[[], bool], what: str, within_s: float = 5.0) -> None:
    """Poll ``check`` (bounded): for state that another task or process changes."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                if check():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def stop_redis(server: RedisServer) -> None:
    await asyncio.to_thread(server.stop)


async def start_redis(server: RedisServer) -> None:
    await asyncio.to_thread(server.start)


# --- the store: claims --------------------------------------------------------------------------

KEY = build_key("acme", "POS-123")
OTHER_KEY = build_key("acme", "POS-456")
FP = "fingerprint-1"
OTHER_FP = "fingerprint-2"
LEASE_S = 60.0
TTL_S = 3600.0
# Not UTF-8 and with a NUL byte: the reply must come back byte for byte.
REPLY = StoredReply(201, b'{"id": "r-1"}\x00\xff\xfe', "application/json; charset=utf-8")


async def test_first_claim_is_new(store: RedisStore) -> None:
    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.NEW)


async def test_second_claim_same_fingerprint_is_in_progress(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.IN_PROGRESS)


async def test_second_claim_other_fingerprint_is_conflict(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    assert await store.claim(KEY, OTHER_FP, LEASE_S) == Claim(ClaimStatus.CONFLICT)


async def test_claims_of_other_keys_are_independent(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    assert (await store.claim(OTHER_KEY, OTHER_FP, LEASE_S)).status is ClaimStatus.NEW


async def test_complete_then_claim_replays_the_exact_reply(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.complete(KEY, FP, REPLY, TTL_S)

    claim = await store.claim(KEY, FP, LEASE_S)

    assert claim.status is ClaimStatus.REPLAY
    assert claim.reply == REPLY
    # replays are not consumed
    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.REPLAY, REPLY)


async def test_complete_then_claim_other_fingerprint_is_conflict(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    assert await store.claim(KEY, OTHER_FP, LEASE_S) == Claim(ClaimStatus.CONFLICT)


async def test_complete_by_another_fingerprint_does_not_overwrite_the_claim(
    store: RedisStore,
) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.complete(KEY, OTHER_FP, REPLY, TTL_S)

    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.IN_PROGRESS)
    assert await store.claim(KEY, OTHER_FP, LEASE_S) == Claim(ClaimStatus.CONFLICT)


async def test_release_forgets_a_pending_claim(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.release(KEY, FP)
    assert (await store.claim(KEY, FP, LEASE_S)).status is ClaimStatus.NEW


async def test_release_after_release_lets_another_body_take_the_reference(
    store: RedisStore,
) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.release(KEY, FP)
    assert (await store.claim(KEY, OTHER_FP, LEASE_S)).status is ClaimStatus.NEW


async def test_release_does_not_forget_a_completed_reply(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    await store.release(KEY, FP)
    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.REPLAY, REPLY)


async def test_release_with_another_fingerprint_does_not_forget_the_claim(
    store: RedisStore,
) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.release(KEY, OTHER_FP)
    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.IN_PROGRESS)


async def test_release_of_an_unknown_key_is_harmless(store: RedisStore) -> None:
    await store.release(KEY, FP)
    assert (await store.claim(KEY, FP, LEASE_S)).status is ClaimStatus.NEW


async def test_a_claim_lapses_after_its_lease(store: RedisStore) -> None:
    await store.claim(KEY, FP, 0.2)
    assert (await store.claim(KEY, OTHER_FP, LEASE_S)).status is ClaimStatus.CONFLICT

    await asyncio.sleep(0.3)  # Redis's own clock: a real wait

    assert (await store.claim(KEY, OTHER_FP, LEASE_S)).status is ClaimStatus.NEW


async def test_a_completed_reply_outlives_the_lease(store: RedisStore) -> None:
    await store.claim(KEY, FP, 0.2)
    await store.complete(KEY, FP, REPLY, TTL_S)

    await asyncio.sleep(0.3)

    assert await store.claim(KEY, FP, LEASE_S) == Claim(ClaimStatus.REPLAY, REPLY)


async def test_a_completed_reply_is_forgotten_after_its_ttl(store: RedisStore) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.complete(KEY, FP, REPLY, 0.2)
    assert (await store.claim(KEY, FP, LEASE_S)).status is ClaimStatus.REPLAY

    await asyncio.sleep(0.3)

    assert (await store.claim(KEY, FP, LEASE_S)).status is ClaimStatus.NEW


async def test_records_expire_in_redis_with_the_lease_then_the_ttl(
    store: RedisStore, redis_url: str
) -> None:
    await store.claim(KEY, FP, LEASE_S)
    assert 0 < await pttl_ms(redis_url, store.key(KEY)) <= LEASE_S * 1000

    await store.complete(KEY, FP, REPLY, TTL_S)

    assert LEASE_S * 1000 < await pttl_ms(redis_url, store.key(KEY)) <= TTL_S * 1000


async def test_keys_are_namespaced_and_carry_no_reference(
    store: RedisStore, redis_url: str
) -> None:
    key = build_key("acme", "max@example.com")
    await store.claim(key, FP, LEASE_S)
    await store.complete(key, FP, REPLY, TTL_S)
    await store.take("rate:acme", 10)

    keys = await all_keys(redis_url)

    assert len(keys) == 2
    assert all(k.startswith(f"{NAMESPACE}:") for k in keys)
    assert NAMESPACE == "telemed-gateway"
    assert not [k for k in keys if "max" in k or "example.com" in k]


# --- atomicity across connections ---------------------------------------------------------------


async def test_concurrent_claims_from_two_stores_make_exactly_one_owner(
    store: RedisStore, other_store: RedisStore
) -> None:
    stores = [store, other_store]
    claims = await asyncio.gather(*(stores[i % 2].claim(KEY, FP, LEASE_S) for i in range(50)))

    statuses = [claim.status for claim in claims]
    assert statuses.count(ClaimStatus.NEW) == 1
    assert statuses.count(ClaimStatus.IN_PROGRESS) == 49


async def test_concurrent_claims_with_two_bodies_agree_on_one_owner(
    store: RedisStore, other_store: RedisStore
) -> None:
    stores = [store, other_store]
    fingerprints = [FP, OTHER_FP]
    claims = await asyncio.gather(
        *(stores[i % 2].claim(KEY, fingerprints[i // 2 % 2], LEASE_S) for i in range(50))
    )

    owners = [i for i, claim in enumerate(claims) if claim.status is ClaimStatus.NEW]
    assert len(owners) == 1
    winner = fingerprints[owners[0] // 2 % 2]
    for i, claim in enumerate(claims):
        if i == owners[0]:
            continue
        same = fingerprints[i // 2 % 2] == winner
        assert claim.status is (ClaimStatus.IN_PROGRESS if same else ClaimStatus.CONFLICT)


async def test_concurrent_repeats_after_completion_all_replay(
    store: RedisStore, other_store: RedisStore
) -> None:
    await store.claim(KEY, FP, LEASE_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    stores = [store, other_store]

    claims = await asyncio.gather(*(stores[i % 2].claim(KEY, FP, LEASE_S) for i in range(20)))

    assert set(claims) == {Claim(ClaimStatus.REPLAY, REPLY)}


# --- token buckets ------------------------------------------------------------------------------


async def test_take_allows_the_rate_then_says_how_long_to_wait(store: RedisStore) -> None:
    assert [await store.take("rate:acme", 3) for _ in range(3)] == [0.0, 0.0, 0.0]

    wait_s = await store.take("rate:acme", 3)

    assert wait_s == pytest.approx(20.0, abs=0.5)  # one request per 20 s at 3/min


async def test_a_refused_take_does_not_consume_a_token(store: RedisStore) -> None:
    for _ in range(3):
        await store.take("rate:acme", 3)
    first = await store.take("rate:acme", 3)
    second = await store.take("rate:acme", 3)
    assert 0 < second <= first


async def test_two_stores_share_one_bucket(store: RedisStore, other_store: RedisStore) -> None:
    assert await store.take("rate:acme", 3) == 0
    assert await other_store.take("rate:acme", 3) == 0
    assert await store.take("rate:acme", 3) == 0

    assert await other_store.take("rate:acme", 3) > 0
    assert await store.take("rate:acme", 3) > 0


async def test_concurrent_takes_from_two_stores_allow_exactly_the_rate(
    store: RedisStore, other_store: RedisStore
) -> None:
    stores = [store, other_store]
    waits = await asyncio.gather(*(stores[i % 2].take("rate:burst", 5) for i in range(30)))
    assert sum(1 for wait in waits if wait == 0) == 5


async def test_buckets_are_independent(store: RedisStore) -> None:
    for _ in range(3):
        await store.take("rate:acme", 3)
    assert await store.take("rate:acme", 3) > 0
    assert await store.take("rate:drx", 3) == 0


async def test_a_bucket_refills_with_time(store: RedisStore) -> None:
    # 600/min: one token every 100 ms. Taking 600 takes a while itself, so drain until refused.
    for _ in range(1000):
        if await store.take("rate:fast", 600) > 0:
            break
    else:
        pytest.fail("the bucket was never empty")

    await asyncio.sleep(0.25)

    assert await store.take("rate:fast", 600) == 0


# --- Redis down and back ------------------------------------------------------------------------


async def test_store_reports_redis_down_and_recovers_when_it_returns(
    store: RedisStore, redis_server: RedisServer
) -> None:
    assert await store.ping() is True
    await store.claim(KEY, FP, LEASE_S)  # a pooled connection, which the outage breaks

    await stop_redis(redis_server)

    assert await store.ping() is False
    with pytest.raises(StateUnavailableError):
        await store.claim(OTHER_KEY, FP, LEASE_S)
    with pytest.raises(StateUnavailableError):
        await store.complete(KEY, FP, REPLY, TTL_S)
    with pytest.raises(StateUnavailableError):
        await store.release(KEY, FP)
    with pytest.raises(StateUnavailableError):
        await store.take("rate:acme", 3)

    await start_redis(redis_server)

    assert await store.ping() is True
    # Without persistence the records are gone; the scripts are loaded again by themselves.
    assert (await store.claim(OTHER_KEY, FP, LEASE_S)).status is ClaimStatus.NEW
    assert await store.take("rate:acme", 3) == 0


# --- the shared token cache ---------------------------------------------------------------------

TOKEN_NOW = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = TOKEN_NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class CountingFetch:
    """Manager's token exchange, counted; each call makes a new token valid for an hour."""

    clock: FakeClock
    delay_s: float = 0.0
    calls: int = 0

    async def __call__(self, org_id: str, key: str) -> Token:
        self.calls += 1
        number = self.calls
        await asyncio.sleep(self.delay_s)  # an exchange takes a moment: others must wait for it
        now = self.clock()
        return Token(value=f"token-{number}", expires_at=now + 3600, renew_at=now + 3540)


@pytest.fixture
def token_clock() -> FakeClock:
    return FakeClock()


async def test_concurrent_fetches_from_two_processes_make_one_token_request(
    store: RedisStore, other_store: RedisStore, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock, delay_s=0.05)
    caches = [RedisTokens(store, clock=token_clock), RedisTokens(other_store, clock=token_clock)]

    tokens = await asyncio.gather(
        *(caches[i % 2].fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch) for i in range(10))
    )

    assert fetch.calls == 1
    assert {token.value for token in tokens} == {"token-1"}


async def test_a_shared_token_is_reused_by_the_other_process(
    store: RedisStore, other_store: RedisStore, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    first = await RedisTokens(store, clock=token_clock).fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    again = await RedisTokens(other_store, clock=token_clock).fetch(
        DEMO_ORG_ID, DEMO_ORG_KEY, fetch
    )

    assert again == first
    assert fetch.calls == 1


async def test_a_token_past_its_renew_time_is_fetched_again(
    store: RedisStore, other_store: RedisStore, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    tokens = RedisTokens(store, clock=token_clock)
    first = await tokens.fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    token_clock.now = first.renew_at + 1
    renewed = await tokens.fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    assert renewed.value == "token-2"
    assert fetch.calls == 2
    shared = await RedisTokens(other_store, clock=token_clock).fetch(
        DEMO_ORG_ID, DEMO_ORG_KEY, fetch
    )
    assert shared == renewed
    assert fetch.calls == 2


async def test_tokens_of_other_orgs_and_keys_are_separate(
    store: RedisStore, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    tokens = RedisTokens(store, clock=token_clock)

    a = await tokens.fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)
    b = await tokens.fetch("other-org", DEMO_ORG_KEY, fetch)
    c = await tokens.fetch(DEMO_ORG_ID, "another-key", fetch)

    assert len({a.value, b.value, c.value}) == 3


async def test_forget_with_the_current_token_deletes_it(
    store: RedisStore, other_store: RedisStore, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    first = await RedisTokens(store, clock=token_clock).fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    await RedisTokens(other_store, clock=token_clock).forget(DEMO_ORG_ID, DEMO_ORG_KEY, first)
    again = await RedisTokens(store, clock=token_clock).fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    assert again.value == "token-2"
    assert fetch.calls == 2


async def test_forget_with_an_older_token_keeps_the_newer_one(
    store: RedisStore, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    tokens = RedisTokens(store, clock=token_clock)
    old = await tokens.fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)
    token_clock.now = old.renew_at + 1
    new = await tokens.fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    await tokens.forget(DEMO_ORG_ID, DEMO_ORG_KEY, old)

    assert await tokens.fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch) == new
    assert fetch.calls == 2


async def test_the_token_key_expires_with_the_token_and_names_no_key(
    store: RedisStore, redis_url: str, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    await RedisTokens(store, clock=token_clock).fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)

    [key] = await all_keys(redis_url)  # the lock is gone once the token is stored

    assert key.startswith(f"{NAMESPACE}:token:{DEMO_ORG_ID}:")
    assert DEMO_ORG_KEY not in key
    assert 3590_000 < await pttl_ms(redis_url, key) <= 3600_000


class GatedStore(RedisStore):
    """A store whose first cache read stays in flight until ``release`` is set."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()
        self.gated = False

    async def get_json(self, key: str) -> object:
        value = await super().get_json(key)
        if not self.gated:
            self.gated = True
            self.read_done.set()
            await self.release.wait()
        return value


async def test_a_process_that_missed_the_token_by_a_hair_does_not_fetch_another(
    store: RedisStore, redis_url: str, token_clock: FakeClock
) -> None:
    fetch = CountingFetch(token_clock)
    late = GatedStore(redis_url)
    try:
        # The late process reads the cache (empty) ...
        pending = asyncio.create_task(
            RedisTokens(late, clock=token_clock).fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)
        )
        await late.read_done.wait()
        # ... the other process fetches and stores a token and releases the lock ...
        first = await RedisTokens(store, clock=token_clock).fetch(DEMO_ORG_ID, DEMO_ORG_KEY, fetch)
        # ... then the late one takes the (free) lock.
        late.release.set()
        second = await pending
    finally:
        await late.close()

    assert second == first
    assert fetch.calls == 1


# --- through HTTP: two gateway apps sharing one Redis in front of one sandbox ------------------

REDIS_URL_ENV = "TEST_REDIS_URL"
BURST_KEY = "burst-partner-key-0123456789"


def redis_config(
    base_url: str,
    redis_url: str,
    *,
    share_tokens: bool = False,
    burst_rate: int = 3,
) -> Config:
    """The test configuration with the Redis backend and a partner ``burst`` at ``burst_rate``."""
    text = gateway_toml(base_url, server={"admin_port": 0}, manager={"retries": 0})
    text += "\n" + toml_table(
        "partners.burst",
        {"shop": "main", "key_sha256": hash_key(BURST_KEY), "rate_per_min": burst_rate},
    )
    text += "\n" + toml_table(
        "state",
        {"backend": "redis", "redis_url_env": REDIS_URL_ENV, "share_tokens": share_tokens},
    )
    return parse_config(text, environ={**ENVIRON, REDIS_URL_ENV: redis_url})


@dataclass
class Pair:
    """Two gateway apps (two "processes") with one Redis and one sandbox."""

    clients: list[Client]
    sandbox: SandboxState
    sandbox_url: str

    def client(self, i: int) -> Client:
        return self.clients[i % len(self.clients)]


MakePair = Callable[..., Awaitable[Pair]]


@pytest.fixture
def make_pair(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, redis_url: str
) -> MakePair:
    async def make(*, share_tokens: bool = False, burst_rate: int = 3) -> Pair:
        sandbox: TestServer = await aiohttp_server(create_sandbox_app(), host="127.0.0.1")
        config = redis_config(
            base_url_of(sandbox), redis_url, share_tokens=share_tokens, burst_rate=burst_rate
        )
        clients = [await aiohttp_client(create_app(config, Seams())) for _ in range(2)]
        return Pair(clients, sandbox.app[SANDBOX_KEY], base_url_of(sandbox))

    return make


def order(reference: str, **fields: object) -> dict[str, object]:
    return flat_order(external_reference=reference, **fields)


async def readyz(client: Client) -> int:
    async with client.get("/readyz") as response:
        return response.status


async def test_the_same_order_sent_to_both_apps_at_once_reaches_manager_once(
    make_pair: MakePair,
) -> None:
    pair = await make_pair()
    body = order("POS-SHARED-1")

    replies = await asyncio.gather(*(post_order(pair.client(i), body) for i in range(10)))

    assert len(pair.sandbox.received) == 1
    first = [r for r in replies if r.status == 200 and REPLAYED_HEADER not in r.headers]
    assert len(first) == 1
    for reply in replies:
        if reply.status == 200:
            assert reply.body == first[0].body
        else:
            assert_error(reply, 409, "request_in_progress")
    # Once done, both apps replay it.
    for i in range(2):
        again = await post_order(pair.client(i), body)
        assert again.status == 200
        assert again.headers[REPLAYED_HEADER] == "true"
        assert again.body == first[0].body
    assert len(pair.sandbox.received) == 1


async def test_a_reference_used_with_another_body_on_the_other_app_is_a_conflict(
    make_pair: MakePair,
) -> None:
    pair = await make_pair()
    assert (await post_order(pair.client(0), order("POS-C-1"))).status == 200

    reply = await post_order(pair.client(1), order("POS-C-1", customer_name="Someone Else"))

    assert_error(reply, 409, "idempotency_conflict")
    assert len(pair.sandbox.received) == 1


async def test_a_failed_order_can_be_retried_through_the_other_app(make_pair: MakePair) -> None:
    pair = await make_pair()
    async with pair.clients[0].session.post(
        f"{pair.sandbox_url}/_sandbox/faults", json=[{"status": 500}]
    ) as response:
        assert response.status == 201

    failed = await post_order(pair.client(0), order("POS-F-1"))
    retried = await post_order(pair.client(1), order("POS-F-1"))

    assert_error(failed, 502, "upstream_unavailable")
    assert retried.status == 200
    assert REPLAYED_HEADER not in retried.headers
    assert len(pair.sandbox.received) == 1


async def test_a_partners_rate_limit_holds_across_both_apps(make_pair: MakePair) -> None:
    pair = await make_pair(burst_rate=3)

    replies = await asyncio.gather(
        *(post_order(pair.client(i), order(f"BURST-{i}"), key=BURST_KEY) for i in range(6))
    )

    assert sorted(r.status for r in replies) == [200, 200, 200, 429, 429, 429]
    for reply in replies:
        if reply.status == 429:
            assert_error(reply, 429, "rate_limited")
            assert 1 <= int(reply.headers["Retry-After"]) <= 20
    assert len(pair.sandbox.received) == 3
    # Another partner has its own bucket.
    assert (await post_order(pair.client(0), order("ACME-1"))).status == 200


@pytest.mark.parametrize(("share_tokens", "token_requests"), [(True, 1), (False, 2)])
async def test_shared_tokens_make_one_token_request_for_both_apps(
    make_pair: MakePair, share_tokens: bool, token_requests: int
) -> None:
    pair = await make_pair(share_tokens=share_tokens)

    replies = await asyncio.gather(
        *(post_order(pair.client(i), order(f"TOKEN-{i}")) for i in range(6))
    )

    assert [r.status for r in replies] == [200] * 6
    assert pair.sandbox.token_requests == token_requests
    assert len(pair.sandbox.received) == 6


async def test_redis_keys_from_real_traffic_are_namespaced_and_carry_no_customer_data(
    make_pair: MakePair, redis_url: str
) -> None:
    pair = await make_pair(share_tokens=True)
    reply = await post_order(
        pair.client(0), order("max@example.com", customer_email="max@example.com"), key=BURST_KEY
    )
    assert reply.status == 200

    keys = await all_keys(redis_url)

    assert {k.split(":")[1] for k in keys} == {"idem", "rate", "token"}
    for key in keys:
        assert key.startswith("telemed-gateway:")
        for secret in ("max", "example.com", "Erika", DEMO_ORG_KEY, BURST_KEY, hash_key(BURST_KEY)):
            assert secret not in key


async def test_redis_down_answers_state_unavailable_and_forwards_nothing_then_recovers(
    make_pair: MakePair, redis_server: RedisServer
) -> None:
    pair = await make_pair()
    assert [await readyz(c) for c in pair.clients] == [200, 200]
    assert (await post_order(pair.client(0), order("BEFORE-1"))).status == 200

    await stop_redis(redis_server)

    for i in range(2):
        reply = await post_order(pair.client(i), order("OUTAGE-1"))
        assert_error(reply, 503, "state_unavailable")
        limited = await post_order(pair.client(i), order("OUTAGE-2"), key=BURST_KEY)
        assert_error(limited, 503, "state_unavailable")
    assert [r["envelope"]["external_reference"] for r in pair.sandbox.received] == ["BEFORE-1"]
    assert pair.sandbox.order_request_attempts == 1
    assert [await readyz(c) for c in pair.clients] == [503, 503]

    await start_redis(redis_server)

    assert [await readyz(c) for c in pair.clients] == [200, 200]
    again = await post_order(pair.client(1), order("OUTAGE-1"))
    assert again.status == 200
    assert REPLAYED_HEADER not in again.headers
    assert (await post_order(pair.client(0), order("OUTAGE-1"))).headers[REPLAYED_HEADER] == "true"
    assert [r["envelope"]["external_reference"] for r in pair.sandbox.received] == [
        "BEFORE-1",
        "OUTAGE-1",
    ]


async def test_readyz_on_the_admin_app_follows_redis(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    sandbox = await aiohttp_server(create_sandbox_app(), host="127.0.0.1")
    config = redis_config(base_url_of(sandbox), redis_url)
    partner = await aiohttp_client(create_app(config, Seams()))
    admin = await aiohttp_client(create_admin_app(partner.server.app[GATEWAY_KEY]))

    assert await readyz(admin) == 200
    await stop_redis(redis_server)
    async with admin.get("/readyz") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "state_unavailable"
    async with admin.get("/healthz") as response:
        assert response.status == 200  # the process is alive: no restart for a Redis outage
    await start_redis(redis_server)
    assert await readyz(admin) == 200


async def test_redis_lost_while_the_order_is_at_manager_still_answers_success(
    make_pair: MakePair, redis_server: RedisServer
) -> None:
    pair = await make_pair()
    answer = {"id": "slow-1", "external_reference": "SLOW-1", "status": "pending"}
    async with pair.clients[0].session.post(
        f"{pair.sandbox_url}/_sandbox/faults", json=[{"status": 200, "body": answer, "delay_s": 1}]
    ) as response:
        assert response.status == 201

    in_flight = asyncio.create_task(post_order(pair.client(0), order("SLOW-1")))
    await wait_until(lambda: pair.sandbox.order_request_attempts == 1, "the call at the sandbox")
    await stop_redis(redis_server)
    reply: Reply = await in_flight

    assert reply.status == 200  # the order did reach Manager: the partner must hear so
    assert reply.body == answer
    assert REPLAYED_HEADER not in reply.headers
    await start_redis(redis_server)


async def test_a_gateway_started_while_redis_is_down_serves_once_it_is_up(
    make_pair: MakePair, redis_server: RedisServer
) -> None:
    await stop_redis(redis_server)
    pair = await make_pair()  # starting does not need Redis: readiness says when it is there

    assert await readyz(pair.client(0)) == 503
    assert_error(await post_order(pair.client(0), order("EARLY-1")), 503, "state_unavailable")
    assert pair.sandbox.order_request_attempts == 0

    await start_redis(redis_server)

    assert await readyz(pair.client(0)) == 200
    assert (await post_order(pair.client(0), order("EARLY-1"))).status == 200
    assert len(pair.sandbox.received) == 1
