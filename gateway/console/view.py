"""The console page's view model: plain values built from what the gateway knows (pure).

Nothing here reads a token, a key or an order's body: the facts that come in are already the
ledger's (partner, reference, statuses, error codes), the request log's fields, and expiry times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from gateway.observability import RequestRecord, UpstreamHealth
from gateway.outbox import LedgerEntry, OrderStatus, OutboxStats

REFRESH_S: Final = 10
NOTICES: Final[Mapping[str, str]] = {
    "retried": "The order is queued again; the deliverer sends it shortly.",
    "dropped": "The order was dropped: its stored body is deleted.",
    "unchanged": "Nothing changed: there is no such order in a state that allows this.",
    "login_failed": "That token was not accepted.",
    "logged_out": "Logged out.",
}


@dataclass(frozen=True, slots=True)
class TokenFact:
    """One org's Manager credential as this process holds it (never the token itself)."""

    org_id: str
    shops: tuple[str, ...]
    api: str
    expires_at: float | None  # the cached token's expiry; None: none cached


@dataclass(frozen=True, slots=True)
class OutboxFacts:
    stats: OutboxStats
    failed: Sequence[LedgerEntry]
    latest: Sequence[LedgerEntry]


@dataclass(frozen=True, slots=True)
class ConsoleFacts:
    """Everything the page shows, as the gateway knows it at one moment."""

    version: str
    config_digest: str
    created_at: float
    pid: int
    worker: bool  # one of several processes (serve --workers N)
    backend: str
    state_ok: bool
    upstream: UpstreamHealth
    tokens: Sequence[TokenFact]
    outbox_enabled: bool
    outbox: OutboxFacts | None  # None with the outbox on: it could not be read
    requests: Sequence[RequestRecord]


@dataclass(frozen=True, slots=True)
class Item:
    """A label and its value; ``tone`` is "ok", "warn", "bad" or "" (neutral)."""

    label: str
    value: str
    tone: str = ""


@dataclass(frozen=True, slots=True)
class OrderRow:
    partner: str
    reference: str
    status: str
    attempts: int
    last_error: str
    age: str


@dataclass(frozen=True, slots=True)
class RequestRow:
    time: str
    partner: str
    method: str
    path: str
    status: int
    tone: str
    code: str
    duration: str
    reference: str
    request_id: str


@dataclass(frozen=True, slots=True)
class ConsolePage:
    process: tuple[Item, ...]
    manager: tuple[Item, ...]
    tokens: tuple[Item, ...]
    outbox: tuple[Item, ...]
    failed: tuple[OrderRow, ...]
    latest: tuple[OrderRow, ...]
    requests: tuple[RequestRow, ...]
    answered_by: str
    refresh_s: int = REFRESH_S


def build_page(facts: ConsoleFacts, now: float) -> ConsolePage:
    """The page's values at ``now`` (Unix time)."""
    answered_by = f"worker pid {facts.pid}" if facts.worker else f"pid {facts.pid}"
    process = (
        Item("version", facts.version),
        Item("configuration", facts.config_digest),
        Item("uptime", to_duration_text(now - facts.created_at)),
        Item("process", answered_by + (" (one of several workers)" if facts.worker else "")),
        Item(
            "state backend",
            f"{facts.backend}: " + ("reachable" if facts.state_ok else "unreachable"),
            "ok" if facts.state_ok else "bad",
        ),
    )
    return ConsolePage(
        process=process,
        manager=build_manager_items(facts.upstream, now),
        tokens=tuple(build_token_item(token, now) for token in facts.tokens),
        outbox=build_outbox_items(facts, now),
        failed=tuple(to_order_row(e, now) for e in facts.outbox.failed) if facts.outbox else (),
        latest=tuple(to_order_row(e, now) for e in facts.outbox.latest) if facts.outbox else (),
        requests=tuple(to_request_row(record) for record in facts.requests),
        answered_by=answered_by,
    )


def build_manager_items(health: UpstreamHealth, now: float) -> tuple[Item, ...]:
    success = health.last_success_at
    failure = health.last_failure_at
    failing = failure is not None and (success is None or failure > success)
    return (
        Item(
            "last success",
            "none yet" if success is None else to_moment_text(success, now),
            "" if success is None else ("warn" if failing else "ok"),
        ),
        Item(
            "last failure",
            "none"
            if failure is None
            else f"{to_moment_text(failure, now)}: {to_failure_text(health.last_failure)}",
            "bad" if failing else "",
        ),
    )


def to_failure_text(status: str | None) -> str:
    if status == "error":
        return "no answer (connection error)"
    if status == "timeout":
        return "no answer in time (timeout)"
    return f"HTTP {status}"


def build_token_item(token: TokenFact, now: float) -> Item:
    label = f"{token.org_id} ({', '.join(token.shops)})"
    if token.api == "v1":
        return Item(label, "v1: the org key on every call, no token")
    if token.expires_at is None:
        return Item(label, "v2: no token cached (fetched with the next order)")
    left = token.expires_at - now
    if left <= 0:
        return Item(label, "v2: cached token expired (renewed with the next order)", "warn")
    return Item(label, f"v2: token cached, expires in {to_duration_text(left)}", "ok")


def build_outbox_items(facts: ConsoleFacts, now: float) -> tuple[Item, ...]:
    if not facts.outbox_enabled:
        return (Item("outbox", "off ([outbox] enabled = false)"),)
    if facts.outbox is None:
        return (Item("outbox", "could not be read (see the log and /readyz)", "bad"),)
    stats = facts.outbox.stats
    items = [
        Item(
            status.value,
            str(stats.by_status.get(status.value, 0)),
            "bad" if status is OrderStatus.FAILED and stats.by_status.get(status.value) else "",
        )
        for status in OrderStatus
    ]
    oldest = stats.oldest_queued_at
    items.append(
        Item("oldest queued", "none waiting" if oldest is None else to_duration_text(now - oldest))
    )
    return tuple(items)


def to_order_row(entry: LedgerEntry, now: float) -> OrderRow:
    return OrderRow(
        partner=entry.partner,
        reference=entry.reference,
        status=entry.status.value,
        attempts=entry.attempts,
        last_error=entry.last_error or "",
        age=to_duration_text(now - entry.created_at),
    )


def to_request_row(record: RequestRecord) -> RequestRow:
    return RequestRow(
        time=datetime.fromtimestamp(record.at, UTC).strftime("%H:%M:%S"),
        partner=record.partner or "",
        method=record.method,
        path=record.path,
        status=record.status,
        tone="ok" if record.status < 400 else ("warn" if record.status < 500 else "bad"),
        code=record.code or "",
        duration=f"{record.duration_ms:.1f} ms",
        reference=record.reference or "",
        request_id=record.request_id or "",
    )


def to_duration_text(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3 h 5 min``, ``2 d 4 h`` (never negative)."""
    total = max(0, int(seconds))
    if total < 60:
        return f"{total} s"
    minutes, hours, days = total // 60, total // 3600, total // 86400
    if total < 3600:
        return f"{minutes} min"
    if total < 86400:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


def to_moment_text(at: float, now: float) -> str:
    """``2026-12-02 10:00:01 UTC (3 min ago)``."""
    when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{when} ({to_duration_text(now - at)} ago)"


def to_notice(code: str | None) -> str | None:
    """The message for a notice code in the page's address (a fixed set: nothing is echoed)."""
    return NOTICES.get(code) if code else None
