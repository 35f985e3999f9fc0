"""Shared state in Redis, for several processes and replicas: same interface as ``memory``.

Every decision is one Lua script, so claim/complete/release and the token buckets are atomic
across processes (never read-then-write from Python). Keys are namespaced and carry no customer
data: the reference is hashed before it becomes part of a key (``idempotency.build_key``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StateUnavailableError
from gateway.state import Claim, ClaimStatus, StoredReply
from gateway.tokens import Token, TokenFetch

NAMESPACE: Final = "telemed-gateway"
SOCKET_TIMEOUT_S: Final = 2.0

# KEYS[1] record; ARGV fingerprint, lease ms. Returns {status, http status, content type, body}.
_CLAIM: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'pending')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'new'}
end
local record = redis.call('HMGET', KEYS[1], 'fp', 'state', 'status', 'type', 'body')
if record[1] ~= ARGV[1] then return {'conflict'} end
if record[2] ~= 'done' then return {'in_progress'} end
return {'replay', record[3], record[4], record[5]}
"""
# KEYS[1] record; ARGV fingerprint, ttl ms, status, content type, body. Only the claim's owner.
_COMPLETE: Final = """
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[3], 'type', ARGV[4], 'body', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1] record; ARGV fingerprint. Forget a failed claim, never a completed one.
_RELEASE: Final = """
local record = redis.call('HMGET', KEYS[1], 'fp', 'state')
if record[1] == ARGV[1] and record[2] == 'pending' then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] bucket; ARGV rate per minute. Redis's own clock, so that replicas agree on time.
# Returns 0 when a token was taken, else the milliseconds until one is free.
_TAKE: Final = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local rate = tonumber(ARGV[1])
local per_ms = rate / 60000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or rate
local ts = tonumber(bucket[2]) or now
tokens = math.min(rate, tokens + math.max(0, now - ts) * per_ms)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / per_ms) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return wait
"""

# KEYS[1] token; ARGV the refused token's value. Compare-and-delete, so a newer one survives.
_FORGET_TOKEN: Final = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['value'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS[1] lock; ARGV the holder's value. Only the holder frees its lock.
_UNLOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Longer than any token request can take (manager.timeout_s is at most a few tens of seconds).
TOKEN_LOCK_S: Final = 30.0
TOKEN_POLL_S: Final = 0.05

T = TypeVar("T")


class RedisStore:
    """:class:`gateway.state.StateStore` over one Redis (``redis_url``), shared by all processes."""

    def __init__(self, url: str, *, namespace: str = NAMESPACE) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=10,
            decode_responses=False,
        )
        self._ns = namespace
        self._claim = self._redis.register_script(_CLAIM)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)
        self._take = self._redis.register_script(_TAKE)

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool (the shared token cache uses it too)."""
        return self._redis

    def key(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> Claim:
        result = await self.call(self._claim, [self.key(key)], [fingerprint, _ms(lease_s)])
        status = ClaimStatus(_text(result[0]))
        if status is not ClaimStatus.REPLAY:
            return Claim(status)
        reply = StoredReply(int(_text(result[1])), bytes(result[3]), _text(result[2]))
        return Claim(status, reply)

    async def complete(self, key: str, fingerprint: str, reply: StoredReply, ttl_s: float) -> None:
        args = [fingerprint, _ms(ttl_s), reply.status, reply.content_type, reply.body]
        await self.call(self._complete, [self.key(key)], args)

    async def release(self, key: str, fingerprint: str) -> None:
        await self.call(self._release, [self.key(key)], [fingerprint])

    async def take(self, bucket: str, rate_per_min: int) -> float:
        wait_ms = await self.call(self._take, [self.key(bucket)], [rate_per_min])
        return int(wait_ms) / 1000.0

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def get_json(self, key: str) -> Any:
        raw = await self._guard(lambda: self._redis.get(self.key(key)))
        return json.loads(raw) if raw else None

    async def set_json(self, key: str, value: object, ttl_s: float, *, only_new: bool) -> bool:
        data = json.dumps(value)
        return bool(
            await self._guard(
                lambda: self._redis.set(self.key(key), data, px=_ms(ttl_s), nx=only_new)
            )
        )

    async def close(self) -> None:
        await self._redis.aclose()

    async def call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._guard(lambda: script(keys=keys, args=args))

    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            raise StateUnavailableError() from exc


class RedisTokens:
    """:class:`gateway.tokens.SharedTokens` in Redis: one token request per org for the fleet.

    The token lives in Redis with a TTL that ends at its expiry (configure that Redis without
    persistence: ``save ""``, ``appendonly no``; tokens must not reach a disk).
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self._forget = store.client.register_script(_FORGET_TOKEN)
        self._unlock = store.client.register_script(_UNLOCK)

    async def fetch(self, org_id: str, key: str, fetch: TokenFetch) -> Token:
        slot = _token_slot(org_id, key)
        lock = f"{slot}:lock"
        holder = secrets.token_hex(16)
        give_up = self._clock() + TOKEN_LOCK_S
        while True:
            token = await self._usable(slot)
            if token is not None:
                return token
            if await self._store.set_json(lock, holder, TOKEN_LOCK_S, only_new=True):
                try:
                    # Another process may have stored one between our look and our lock.
                    return await self._usable(slot) or await self._fetch_and_share(
                        slot, org_id, key, fetch
                    )
                finally:
                    await self._store.call(
                        self._unlock, [self._store.key(lock)], [json.dumps(holder)]
                    )
            if self._clock() >= give_up:  # the lock holder is stuck: do it ourselves
                return await self._fetch_and_share(slot, org_id, key, fetch)
            await self._sleep(TOKEN_POLL_S)

    async def _usable(self, slot: str) -> Token | None:
        cached = await self._store.get_json(slot)
        if isinstance(cached, dict):
            token = Token(**cached)
            if token.is_usable(self._clock()):
                return token
        return None

    async def _fetch_and_share(self, slot: str, org_id: str, key: str, fetch: TokenFetch) -> Token:
        token = await fetch(org_id, key)
        ttl = token.expires_at - self._clock()
        await self._store.set_json(slot, asdict(token), ttl, only_new=False)
        return token

    async def forget(self, org_id: str, key: str, token: Token) -> None:
        slot = self._store.key(_token_slot(org_id, key))
        await self._store.call(self._forget, [slot], [token.value])


def _token_slot(org_id: str, key: str) -> str:
    # The key itself never becomes part of a Redis key: a prefix of its hash names the slot.
    return f"token:{org_id}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
