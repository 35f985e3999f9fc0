"""Idempotency decisions: which order a request is, and whether its body is the same as before.

Pure code. ``(partner, external_reference)`` names an order; the canonical envelope's hash (key
order and whitespace do not matter, a PDF URL counts, not its bytes) tells repeats from conflicts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

from gateway.codec import dump_canonical
from gateway.errors import IdempotencyConflictError, RequestInProgressError
from gateway.state import Claim, ClaimStatus, StoredReply

KEY_PREFIX: Final = "idem"


def build_key(partner: str, reference: str) -> str:
    """The store key of an order. The reference is hashed: it may carry customer data."""
    digest = hashlib.sha256(f"{partner}\x00{reference}".encode()).hexdigest()
    return f"{KEY_PREFIX}:{partner}:{digest}"


def build_fingerprint(envelope: Mapping[str, object]) -> str:
    """sha256 of the canonical envelope: sorted keys, no whitespace, before any PDF is fetched."""
    return hash_canonical(dump_canonical(envelope))


def hash_canonical(canonical: bytes) -> str:
    """The fingerprint of envelope bytes already in canonical form (``codec.dump_canonical``)."""
    return hashlib.sha256(canonical).hexdigest()


def to_replay(claim: Claim) -> StoredReply | None:
    """The stored reply to answer with, None if the caller owns the order now.

    Raises:
        IdempotencyConflictError: the reference was used with a different body.
        RequestInProgressError: the same order is still being processed.
    """
    if claim.status is ClaimStatus.NEW:
        return None
    if claim.status is ClaimStatus.REPLAY:
        assert claim.reply is not None
        return claim.reply
    if claim.status is ClaimStatus.CONFLICT:
        raise IdempotencyConflictError()
    raise RequestInProgressError()
