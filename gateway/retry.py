"""Retry decisions for calls to Manager: which answers are transient, and how long to wait.

Pure code. Manager documents no rate limits; 429, 502, 503, 504 and connection failures are
treated as transient anyway (MANAGER_API.md), and 500 is not retried (it is not known to be safe).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
AUTH_STATUSES: Final = frozenset({401, 403})
DEFAULT_BASE_DELAY_S: Final = 0.2
DEFAULT_MAX_DELAY_S: Final = 2.0


class Outcome(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"  # transient: try again within the deadline
    REJECTED = "rejected"  # Manager refused the order: the partner must change it
    AUTH = "auth"  # Manager refused the credential
    FAILED = "failed"  # Manager failed in a way a retry is not known to fix


def classify_status(status: int) -> Outcome:
    """What an order-requests (or token) answer means for the caller."""
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status in RETRYABLE_STATUSES:
        return Outcome.RETRY
    if status in AUTH_STATUSES:
        return Outcome.AUTH
    if 400 <= status < 500:
        # 400/404/409/422 are documented; other 4xx (413, 405, …) are refusals of this request too.
        return Outcome.REJECTED
    return Outcome.FAILED


def backoff_delay(
    attempt: int,
    rand: Callable[[], float],
    *,
    base_s: float = DEFAULT_BASE_DELAY_S,
    cap_s: float = DEFAULT_MAX_DELAY_S,
) -> float:
    """Exponential backoff with full jitter: a random delay in ``[0, min(cap, base·2^attempt)]``.

    Full jitter spreads the retries of many gateways that failed at the same moment.
    """
    return rand() * min(cap_s, base_s * 2.0**attempt)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (Unix time): delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        # An HTTP date is GMT by definition (RFC 9110), whether or not it says so ("-0000" and a
        # missing zone both come back naive); never the local time of the host that reads it.
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def to_retry_after_header(seconds: float | None) -> int:
    """Seconds for a ``Retry-After`` header: whole, at least 1."""
    return max(1, math.ceil(seconds or 1))


def outbox_delay(attempts: int, min_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """When a stored order is tried again after ``attempts`` failed deliveries (at least 1).

    ``min_s`` doubling up to ``max_s``, each spread by ±20 % so that orders queued in the same
    outage do not all reach a recovering Manager in the same second.
    """
    base = min(max_s, min_s * 2.0 ** max(0, attempts - 1))
    return min(max_s, base * (0.8 + 0.4 * rand()))


def order_retry_delay(
    waited_s: float, min_s: float, max_s: float, rand: Callable[[], float]
) -> float:
    """When a stored order is tried again, after it has waited ``waited_s`` since it was stored.

    About as long again as it has waited (so the waits double), at least ``min_s`` and at most
    ``max_s``, each spread by ±20 %. Judged by age, not by a count of calls: one delivery
    attempt may be several calls (the Manager client's own quick retries).
    """
    base = min(max_s, max(min_s, waited_s))
    return min(max_s, base * (0.8 + 0.4 * rand()))
