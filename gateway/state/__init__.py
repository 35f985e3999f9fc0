"""Shared state behind one interface: idempotency records and rate-limit buckets.

``memory`` keeps them in this process (bounded, expiring). A backend for several processes
(Redis) implements the same :class:`StateStore` protocol; handlers only see the protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class ClaimStatus(enum.Enum):
    NEW = "new"  # the caller now owns the reference and must complete or release it
    IN_PROGRESS = "in_progress"  # another request with the same body is being processed
    REPLAY = "replay"  # done before with the same body: answer with the stored reply
    CONFLICT = "conflict"  # the reference is taken by a different body


@dataclass(frozen=True, slots=True)
class StoredReply:
    """Manager's success reply as first answered to the partner."""

    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    reply: StoredReply | None = None


class StateStore(Protocol):
    """What the order pipeline needs from shared state. Every method is atomic per key."""

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> Claim:
        """Claim ``key`` for a body with ``fingerprint``, or say who has it.

        A claim that is neither completed nor released within ``lease_s`` (its process died)
        lapses, so that a crash does not block the reference for the whole TTL.
        """
        ...

    async def complete(self, key: str, fingerprint: str, reply: StoredReply, ttl_s: float) -> None:
        """Remember the success reply for ``ttl_s`` (replayed to repeats of the same body)."""
        ...

    async def release(self, key: str, fingerprint: str) -> None:
        """Forget a claim that failed, so that the partner may retry it."""
        ...

    async def take(self, bucket: str, rate_per_min: int) -> float:
        """Take one request from a token bucket: 0 if allowed, else seconds until one is free."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers now (``/readyz``)."""
        ...

    async def close(self) -> None: ...
