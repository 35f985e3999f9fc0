"""In-process state: idempotency records in a bounded TTL cache, token buckets in a dict.

Correct for one process only: several processes would each keep their own records, which is why
``serve --workers N`` with N > 1 refuses this backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TLRUCache, TTLCache

from gateway.state import Claim, ClaimStatus, StoredReply

DEFAULT_MAX_BUCKETS = 10_000


@dataclass(slots=True)
class _Record:
    fingerprint: str
    reply: StoredReply | None  # None while in progress
    expires_at: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class MemoryStore:
    """:class:`gateway.state.StateStore` for one process (no awaits inside: atomic on the loop)."""

    def __init__(
        self,
        *,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        # Each record expires at its own time (a lease, or the TTL in force when it completed),
        # so a reload that changes ttl_hours applies to every record from then on.
        self._records: TLRUCache[str, _Record] = TLRUCache(
            maxsize=max_entries, ttu=lambda _key, record, _now: record.expires_at, timer=clock
        )
        self._buckets: TTLCache[str, _Bucket] = TTLCache(
            maxsize=DEFAULT_MAX_BUCKETS, ttl=3600, timer=clock
        )

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> Claim:
        now = self._clock()
        record = self._records.get(key)
        if record is not None and record.expires_at <= now:
            record = None
        if record is None:
            self._records[key] = _Record(fingerprint, None, now + lease_s)
            return Claim(ClaimStatus.NEW)
        if record.fingerprint != fingerprint:
            return Claim(ClaimStatus.CONFLICT)
        if record.reply is None:
            return Claim(ClaimStatus.IN_PROGRESS)
        return Claim(ClaimStatus.REPLAY, record.reply)

    async def complete(self, key: str, fingerprint: str, reply: StoredReply, ttl_s: float) -> None:
        self._records[key] = _Record(fingerprint, reply, self._clock() + ttl_s)

    async def release(self, key: str, fingerprint: str) -> None:
        record = self._records.get(key)
        if record is not None and record.fingerprint == fingerprint and record.reply is None:
            del self._records[key]

    async def take(self, bucket: str, rate_per_min: int) -> float:
        now = self._clock()
        per_second = rate_per_min / 60.0
        state = self._buckets.get(bucket)
        if state is None:
            state = _Bucket(tokens=float(rate_per_min), updated=now)
        # Refill for the time passed; a full bucket holds one minute's worth (the burst).
        state.tokens = min(float(rate_per_min), state.tokens + (now - state.updated) * per_second)
        state.updated = now
        self._buckets[bucket] = state
        if state.tokens >= 1.0:
            state.tokens -= 1.0
            return 0.0
        return (1.0 - state.tokens) / per_second

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._records.clear()
        self._buckets.clear()
