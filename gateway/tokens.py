"""Manager v2 tokens: one JWT per org key, cached in memory, renewed before it expires.

A token is never used after its expiry; concurrent requests share one token request (single
flight); a token that Manager refused is dropped so that the next request fetches a new one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import jwt
from cachetools import LRUCache

# Manager's tokens live an hour; a reply that says nothing about expiry is trusted this long only.
FALLBACK_LIFETIME_S: Final = 300.0
MAX_RENEW_MARGIN_S: Final = 60.0
MAX_CACHED_TOKENS: Final = 1024


class TokenReplyError(ValueError):
    """Manager's token reply could not be used (no token, or no usable expiry)."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # Unix time
    renew_at: float  # Unix time: after this, fetch a new one before use

    def is_usable(self, now: float) -> bool:
        return now < self.renew_at


def parse_token_reply(body: object, now: float) -> Token:
    """Manager's ``{"access_token", "expires_in"}`` → a :class:`Token`.

    The expiry is the earlier of the JWT's ``exp`` claim and ``now + expires_in``. The signature is
    not verified: the gateway has no secret, and only reads the claim to stay on the safe side.

    Raises:
        TokenReplyError: no access_token, or an expiry already past.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("access_token"), str):
        raise TokenReplyError("the token reply has no access_token")
    value: str = body["access_token"]
    candidates: list[float] = []
    expires_in = body.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        candidates.append(now + float(expires_in))
    try:
        claims = jwt.decode(value, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    exp = claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        candidates.append(float(exp))
    expires_at = min(candidates) if candidates else now + FALLBACK_LIFETIME_S
    lifetime = expires_at - now
    if lifetime <= 0:
        raise TokenReplyError("the token reply holds a token that has already expired")
    margin = min(MAX_RENEW_MARGIN_S, lifetime / 5)
    return Token(value=value, expires_at=expires_at, renew_at=expires_at - margin)


TokenFetch = Callable[[str, str], Awaitable[Token]]


class SharedTokens(Protocol):
    """Tokens shared by several processes (``state.share_tokens``): one fetch for the fleet."""

    async def fetch(self, org_id: str, key: str, fetch: TokenFetch) -> Token:
        """A usable shared token, or one fetched with ``fetch`` by exactly one process."""
        ...

    async def forget(self, org_id: str, key: str, token: Token) -> None:
        """Drop the shared token if it is still ``token`` (Manager refused it)."""
        ...


class TokenCache:
    """Tokens by (org, key), fetched through ``fetch(org_id, key)`` at most once at a time."""

    def __init__(
        self,
        fetch: TokenFetch,
        *,
        clock: Callable[[], float] = time.time,
        shared: SharedTokens | None = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._shared = shared
        self._tokens: LRUCache[tuple[str, bytes], Token] = LRUCache(maxsize=MAX_CACHED_TOKENS)
        self._inflight: dict[tuple[str, bytes], asyncio.Future[Token]] = {}

    async def get(self, org_id: str, key: str) -> Token:
        """A token usable now; fetches one (once for all concurrent callers) when needed."""
        slot = (org_id, hashlib.sha256(key.encode("utf-8")).digest())
        token = self._tokens.get(slot)
        if token is not None and token.is_usable(self._clock()):
            return token
        future = self._inflight.get(slot)
        if future is None:
            future = asyncio.ensure_future(self._fetch_into(slot, org_id, key))
            self._inflight[slot] = future
            future.add_done_callback(lambda done: self._settle(slot, done))
        # shield: one caller giving up (deadline, disconnect) must not cancel the others' fetch.
        return await asyncio.shield(future)

    def expiry_of(self, org_id: str, key: str) -> float | None:
        """When this process's cached token for (org, key) expires; None when none is cached.

        For the operator console: the token itself never leaves the cache this way.
        """
        token = self._tokens.get((org_id, hashlib.sha256(key.encode("utf-8")).digest()))
        return None if token is None else token.expires_at

    def rebind(self, fetch: TokenFetch) -> None:
        """Fetch through ``fetch`` from now on (a reloaded client for the same Manager)."""
        self._fetch = fetch

    def invalidate(self, org_id: str, key: str, token: Token) -> None:
        """Drop ``token`` (Manager refused it) unless it was already replaced by a newer one."""
        slot = (org_id, hashlib.sha256(key.encode("utf-8")).digest())
        if self._tokens.get(slot) == token:
            del self._tokens[slot]

    async def forget(self, org_id: str, key: str, token: Token) -> None:
        """Drop a refused token here and, when tokens are shared, for every process."""
        self.invalidate(org_id, key, token)
        if self._shared is not None:
            await self._shared.forget(org_id, key, token)

    async def _fetch_into(self, slot: tuple[str, bytes], org_id: str, key: str) -> Token:
        if self._shared is not None:
            token = await self._shared.fetch(org_id, key, self._fetch)
        else:
            token = await self._fetch(org_id, key)
        self._tokens[slot] = token
        return token

    def _settle(self, slot: tuple[str, bytes], done: asyncio.Future[Token]) -> None:
        self._inflight.pop(slot, None)
        if not done.cancelled():
            done.exception()  # retrieved here, so a fetch nobody waits for any more is not logged
