"""In-process state: idempotency records with their own expiry, token buckets in a TTL cache.

Correct for one process only: several processes would each keep their own records, which is why
``serve --workers N`` with N > 1 refuses this backend.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

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
        self._max_entries = max_entries
        # Each record expires at its own time (a lease, or the TTL in force when it completed),
        # so a reload that changes ttl_hours applies to every record from then on. Records are
        # dropped oldest first: when expired, or when there are more than max_entries. (A heap
        # ordered by expiry, as in cachetools' TLRUCache, costs several times more per order.)
        self._records: dict[str, _Record] = {}
        self._order: deque[tuple[str, _Record]] = deque()
        self._buckets: TTLCache[str, _Bucket] = TTLCache(
            maxsize=DEFAULT_MAX_BUCKETS, ttl=3600, timer=clock
        )

    def __len__(self) -> int:
        """Records held now (expired ones included until they are dropped)."""
        return len(self._records)

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> Claim:
        now = self._clock()
        record = self._records.get(key)
        if record is not None and record.expires_at <= now:
            record = None
        if record is None:
            self._put(key, _Record(fingerprint, None, now + lease_s), now)
            return Claim(ClaimStatus.NEW)
        if record.fingerprint != fingerprint:
            return Claim(ClaimStatus.CONFLICT)
        if record.reply is None:
            return Claim(ClaimStatus.IN_PROGRESS)
        return Claim(ClaimStatus.REPLAY, record.reply)

    async def complete(self, key: str, fingerprint: str, reply: StoredReply, ttl_s: float) -> None:
        now = self._clock()
        self._put(key, _Record(fingerprint, reply, now + ttl_s), now)

    def _put(self, key: str, record: _Record, now: float) -> None:
        self._records[key] = record
        self._order.append((key, record))
        order, records = self._order, self._records
        while order and (order[0][1].expires_at <= now or len(records) > self._max_entries):
            old_key, old = order.popleft()
            if records.get(old_key) is old:  # not replaced since (a claim completed, say)
                del records[old_key]

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
        self._order.clear()
        self._buckets.clear()
