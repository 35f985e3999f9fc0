"""Tests for gateway.tokens: Manager's token reply → Token, and the single-flight TokenCache.

Time is a fake clock; fetches are fakes gated by events, so nothing sleeps and nothing connects.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from typing import Any

import jwt
import pytest

from gateway.tokens import (
    FALLBACK_LIFETIME_S,
    Token,
    TokenCache,
    TokenReplyError,
    parse_token_reply,
    read_jwt_claims,
)

NOW = 1_800_000_000.0
SECRET = "a-test-secret-that-is-at-least-32-bytes-long"


def make_jwt(**claims: Any) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


# --- parse_token_reply --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exp_in", "expires_in", "lifetime"),
    [
        (3600, 3600, 3600),
        (600, 3600, 600),  # the claim is earlier
        (3600, 120, 120),  # expires_in is earlier
        (None, 3600, 3600),  # no claim
        (900, None, 900),  # no expires_in
        (None, 1.5, 1.5),
        (3600, True, 3600),  # a boolean is not a lifetime
        (None, "3600", FALLBACK_LIFETIME_S),  # nor is a string
    ],
)
def test_expiry_is_the_earlier_of_exp_claim_and_expires_in(
    exp_in: float | None, expires_in: object, lifetime: float
) -> None:
    claims = {"sub": "org1"} if exp_in is None else {"sub": "org1", "exp": int(NOW + exp_in)}
    body: dict[str, object] = {"access_token": make_jwt(**claims)}
    if expires_in is not None:
        body["expires_in"] = expires_in

    token = parse_token_reply(body, NOW)

    assert token.value == body["access_token"]
    assert token.expires_at == pytest.approx(NOW + lifetime)


def test_reply_without_any_expiry_gets_the_short_fallback_lifetime() -> None:
    token = parse_token_reply({"access_token": make_jwt(sub="org1")}, NOW)

    assert token.expires_at == NOW + FALLBACK_LIFETIME_S
    assert token.expires_at - NOW < 3600  # shorter than Manager's documented lifetime


@pytest.mark.parametrize(("expires_in", "lifetime"), [(3600, 3600), (None, FALLBACK_LIFETIME_S)])
def test_opaque_token_that_is_not_a_jwt_is_accepted(
    expires_in: int | None, lifetime: float
) -> None:
    body: dict[str, object] = {"access_token": "opaque-token-value"}
    if expires_in is not None:
        body["expires_in"] = expires_in

    token = parse_token_reply(body, NOW)

    assert token.value == "opaque-token-value"
    assert token.expires_at == NOW + lifetime


def test_exp_claim_is_read_without_the_signing_secret() -> None:
    value = jwt.encode({"exp": int(NOW + 500)}, "another-secret-unknown-to-the-gateway-xx", "HS256")

    assert parse_token_reply({"access_token": value}, NOW).expires_at == NOW + 500


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"expires_in": 3600},
        {"access_token": None, "expires_in": 3600},
        {"access_token": 12345, "expires_in": 3600},
        {"token": "x", "expires_in": 3600},
        ["access_token"],
        "access_token",
        None,
    ],
)
def test_reply_without_access_token_is_refused(body: object) -> None:
    with pytest.raises(TokenReplyError):
        parse_token_reply(body, NOW)


@pytest.mark.parametrize(
    ("exp_in", "expires_in"),
    [(-1, None), (0, None), (-3600, 3600), (None, 0), (None, -5), (3600, 0)],
)
def test_already_expired_token_is_refused(exp_in: int | None, expires_in: int | None) -> None:
    claims = {} if exp_in is None else {"exp": int(NOW + exp_in)}
    body: dict[str, object] = {"access_token": make_jwt(sub="org1", **claims)}
    if expires_in is not None:
        body["expires_in"] = expires_in

    with pytest.raises(TokenReplyError):
        parse_token_reply(body, NOW)


@pytest.mark.parametrize("lifetime", [3600, 600, 300, 60, 5, 0.5])
def test_renewal_is_due_before_expiry_and_after_now(lifetime: float) -> None:
    token = parse_token_reply({"access_token": "t", "expires_in": lifetime}, NOW)

    assert NOW < token.renew_at < token.expires_at
    assert token.is_usable(NOW)
    assert not token.is_usable(token.renew_at)
    assert not token.is_usable(token.expires_at)


def test_renewal_margin_of_a_long_token_is_at_most_a_minute() -> None:
    token = parse_token_reply({"access_token": "t", "expires_in": 3600}, NOW)

    assert token.expires_at - token.renew_at == pytest.approx(60)


# --- TokenCache ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeFetch:
    """Counts calls; each call returns a new token (or raises), optionally after ``gate`` opens."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.finished = 0
        self.fail_with: Exception | None = None

    async def __call__(self, org_id: str, key: str) -> Token:
        self.calls.append((org_id, key))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        self.finished += 1
        if self.fail_with is not None:
            raise self.fail_with
        now = self.clock()
        return Token(
            value=f"token-{len(self.calls)}",
            expires_at=now + self.lifetime,
            renew_at=now + self.lifetime - 60,
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetch(clock: FakeClock) -> FakeFetch:
    return FakeFetch(clock)


@pytest.fixture
def cache(fetch: FakeFetch, clock: FakeClock) -> TokenCache:
    return TokenCache(fetch, clock=clock)


async def test_token_is_fetched_once_then_served_from_the_cache(
    cache: TokenCache, fetch: FakeFetch, clock: FakeClock
) -> None:
    first = await cache.get("org1", "key1")
    clock.now += 100
    second = await cache.get("org1", "key1")

    assert first is second
    assert fetch.calls == [("org1", "key1")]


async def test_concurrent_requests_share_one_token_fetch(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(cache.get("org1", "key1")) for _ in range(20)]
    await fetch.started.wait()
    fetch.gate.set()

    tokens = await asyncio.gather(*waiters)

    assert len(fetch.calls) == 1
    assert {t.value for t in tokens} == {"token-1"}


async def test_expired_token_is_fetched_once_for_concurrent_requests(
    cache: TokenCache, fetch: FakeFetch, clock: FakeClock
) -> None:
    await cache.get("org1", "key1")
    clock.now += 3600
    fetch.gate = asyncio.Event()
    fetch.started.clear()
    waiters = [asyncio.ensure_future(cache.get("org1", "key1")) for _ in range(20)]
    await fetch.started.wait()
    fetch.gate.set()

    tokens = await asyncio.gather(*waiters)

    assert len(fetch.calls) == 2
    assert {t.value for t in tokens} == {"token-2"}


async def test_orgs_and_keys_have_their_own_tokens(cache: TokenCache, fetch: FakeFetch) -> None:
    a = await cache.get("org1", "key1")
    b = await cache.get("org1", "key2")
    c = await cache.get("org2", "key1")
    again = await cache.get("org1", "key1")

    assert len({a.value, b.value, c.value}) == 3
    assert again is a
    assert fetch.calls == [("org1", "key1"), ("org1", "key2"), ("org2", "key1")]


@pytest.mark.parametrize(
    ("elapsed", "renewed"),
    [(0, False), (3539.9, False), (3540, True), (3570, True), (3600, True), (7200, True)],
)
async def test_token_is_renewed_from_renew_at_and_never_used_at_or_after_expiry(
    cache: TokenCache, fetch: FakeFetch, clock: FakeClock, elapsed: float, renewed: bool
) -> None:
    first = await cache.get("org1", "key1")  # expires at NOW+3600, renew at NOW+3540
    clock.now = NOW + elapsed

    token = await cache.get("org1", "key1")

    assert (token is not first) == renewed
    assert len(fetch.calls) == (2 if renewed else 1)
    assert clock.now < token.expires_at


async def test_invalidate_drops_the_refused_token(cache: TokenCache, fetch: FakeFetch) -> None:
    refused = await cache.get("org1", "key1")

    cache.invalidate("org1", "key1", refused)
    fresh = await cache.get("org1", "key1")

    assert fresh.value == "token-2"
    assert len(fetch.calls) == 2


async def test_invalidate_keeps_a_newer_token(cache: TokenCache, fetch: FakeFetch) -> None:
    old = await cache.get("org1", "key1")
    cache.invalidate("org1", "key1", old)
    newer = await cache.get("org1", "key1")

    cache.invalidate("org1", "key1", old)  # a late refusal of the old token
    current = await cache.get("org1", "key1")

    assert current is newer
    assert len(fetch.calls) == 2


async def test_invalidate_of_another_slot_or_an_empty_cache_changes_nothing(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    token = await cache.get("org1", "key1")

    cache.invalidate("org2", "key1", token)
    cache.invalidate("org1", "key2", token)
    cache.invalidate("org9", "key9", token)

    assert await cache.get("org1", "key1") is token
    assert len(fetch.calls) == 1


async def test_failed_fetch_reaches_every_waiter_and_the_next_get_fetches_again(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate = asyncio.Event()
    fetch.fail_with = TokenReplyError("the token reply has no access_token")
    waiters = [asyncio.ensure_future(cache.get("org1", "key1")) for _ in range(5)]
    await fetch.started.wait()
    fetch.gate.set()

    results = await asyncio.gather(*waiters, return_exceptions=True)

    assert all(isinstance(r, TokenReplyError) for r in results)
    assert len(fetch.calls) == 1
    fetch.fail_with = None
    token = await cache.get("org1", "key1")
    assert token.value == "token-2"
    assert len(fetch.calls) == 2


async def test_one_waiter_cancelled_does_not_cancel_the_fetch_for_the_others(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(cache.get("org1", "key1")) for _ in range(3)]
    await fetch.started.wait()

    waiters[0].cancel()
    fetch.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)

    assert isinstance(results[0], asyncio.CancelledError)
    assert [r.value for r in results[1:] if isinstance(r, Token)] == ["token-1", "token-1"]
    assert len(fetch.calls) == 1


async def test_fetch_completes_and_is_cached_when_every_waiter_gave_up(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate = asyncio.Event()
    waiter = asyncio.ensure_future(cache.get("org1", "key1"))
    await fetch.started.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    fetch.gate.set()
    token = await cache.get("org1", "key1")

    assert token.value == "token-1"
    assert len(fetch.calls) == 1
    assert fetch.finished == 1


# --- shared tokens (state.share_tokens) ---------------------------------------------------------


class FakeShared:
    """Stands in for the fleet-wide store: fetches through the given function, records forgets."""

    def __init__(self) -> None:
        self.fetches: list[tuple[str, str]] = []
        self.forgotten: list[tuple[str, str, Token]] = []

    async def fetch(self, org_id: str, key: str, fetch: Any) -> Token:
        self.fetches.append((org_id, key))
        token: Token = await fetch(org_id, key)
        return token

    async def forget(self, org_id: str, key: str, token: Token) -> None:
        self.forgotten.append((org_id, key, token))


async def test_shared_store_is_asked_once_and_its_token_cached_locally(
    fetch: FakeFetch, clock: FakeClock
) -> None:
    shared = FakeShared()
    cache = TokenCache(fetch, clock=clock, shared=shared)

    first = await cache.get("org1", "key1")
    second = await cache.get("org1", "key1")

    assert first is second
    assert shared.fetches == [("org1", "key1")]
    assert fetch.calls == [("org1", "key1")]


async def test_forget_drops_the_token_here_and_in_the_shared_store(
    fetch: FakeFetch, clock: FakeClock
) -> None:
    shared = FakeShared()
    cache = TokenCache(fetch, clock=clock, shared=shared)
    refused = await cache.get("org1", "key1")

    await cache.forget("org1", "key1", refused)
    fresh = await cache.get("org1", "key1")

    assert shared.forgotten == [("org1", "key1", refused)]
    assert fresh.value == "token-2"


async def test_forget_without_a_shared_store_drops_the_local_token(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    refused = await cache.get("org1", "key1")

    await cache.forget("org1", "key1", refused)

    assert (await cache.get("org1", "key1")).value == "token-2"


async def test_rebind_fetches_through_the_new_function(
    cache: TokenCache, fetch: FakeFetch, clock: FakeClock
) -> None:
    await cache.get("org1", "key1")
    other = FakeFetch(clock)
    cache.rebind(other)

    await cache.get("org2", "key1")

    assert fetch.calls == [("org1", "key1")]
    assert other.calls == [("org2", "key1")]


# --- reading the exp claim without PyJWT ---------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _compact(header: object, payload: object, signature: str = "c2ln") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}.{signature}"


SAME_AS_PYJWT = [
    make_jwt(exp=int(NOW + 500), sub="org1"),
    make_jwt(sub="org1"),
    jwt.encode({"exp": NOW + 0.5}, "another-secret-unknown-to-the-gateway-xx", "HS256"),
    jwt.encode({"exp": 1}, SECRET, "HS256", headers={"kid": "k1"}),
    _compact({"alg": "none"}, {"exp": 12}, signature=""),
    _compact({"alg": "HS256"}, {"exp": 12}) + "=",  # padded signature, as some issuers send
    _compact({"alg": "HS256"}, {"exp": "soon"}),
    "opaque-token",
    "a.b",
    "a.b.c.d",
    "!!!.e30.c2ln",
    _compact({"alg": "HS256"}, {"exp": 12}, signature="c2l"),  # bits beyond the data
    _compact({"alg": "HS256"}, {"exp": 12}, signature="c2lu"),
    _compact({"alg": "HS256"}, {"exp": 12}, signature="c2k="),
    _compact({"alg": "HS256"}, {"exp": 12}, signature="c2k==="),
    _compact({"alg": "HS256"}, {"exp": 12}, signature="c"),
    f"{_b64(b'not json')}.e30.c2ln",
    _compact([1], {"exp": 12}),
    _compact({"alg": "HS256"}, [1, 2]),
    _compact({"alg": "HS256", "kid": 5}, {"exp": 12}),
    _compact({"alg": "HS256"}, {"exp": 12}).replace(".", "..", 1),
    "",
]


def _pyjwt_claims(value: str) -> dict[str, object]:
    try:
        claims: dict[str, object] = jwt.decode(value, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims


@pytest.mark.parametrize("value", SAME_AS_PYJWT)
def test_jwt_claims_are_read_as_pyjwt_reads_them_without_verifying(value: str) -> None:
    assert read_jwt_claims(value) == _pyjwt_claims(value)


@pytest.mark.parametrize(
    "header",
    [{"alg": "HS256", "b64": False, "crit": ["b64"]}, {"alg": "HS256", "crit": ["exp"]}],
)
def test_jwt_with_critical_extensions_is_treated_as_opaque(header: dict[str, object]) -> None:
    # Never more than PyJWT reads: an unusual header means no exp claim (expires_in, or 5 min).
    assert read_jwt_claims(_compact(header, {"exp": 12})) == {}


def test_damaged_jwts_are_read_as_pyjwt_reads_them() -> None:
    rng = random.Random(13)
    tokens = [make_jwt(exp=int(NOW + 500), sub="org1"), _compact({"alg": "none"}, {"exp": 1})]
    alphabet = "AQgw_-=.!eyJ9"
    for _ in range(2000):
        value = list(rng.choice(tokens))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(value))
            action = rng.choice(("replace", "delete", "insert"))
            if action == "replace":
                value[at] = rng.choice(alphabet)
            elif action == "delete":
                del value[at]
            else:
                value.insert(at, rng.choice(alphabet))
        damaged = "".join(value)
        assert read_jwt_claims(damaged) == _pyjwt_claims(damaged), damaged
