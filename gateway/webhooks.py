"""Manager's webhooks (contract section 11): the signature, the event's fields, what to record.

Pure code but for :func:`record_webhook`, which hands one verified event to the outbox's store.
The signature is checked over the raw bytes before anything is parsed, against every configured
subscription secret, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from gateway.codec import parse_json
from gateway.errors import InvalidJsonError, InvalidSignatureError
from gateway.outbox import IncomingWebhook, LedgerEvent, OutboxStore, WebhookResult

PATH: Final = "/webhooks/pharmaone"
MAX_BODY_BYTES: Final = 1024 * 1024
SIGNATURE_HEADER: Final = "X-PharmaOne-Signature"
DELIVERY_HEADER: Final = "X-PharmaOne-Delivery-Id"
_SIGNATURE: Final = re.compile(r"^sha256=([0-9a-f]{64})$")
_DELIVERY_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def parse_signature(header: str | None) -> bytes | None:
    """The digest of ``sha256=<hex>``; hex case is not significant. None if malformed."""
    if header is None:
        return None
    match = _SIGNATURE.match(header.strip().lower())
    return bytes.fromhex(match.group(1)) if match else None


def find_signing_orgs(
    body: bytes, header: str | None, secrets: Sequence[tuple[str, bytes]]
) -> frozenset[str]:
    """The org ids whose subscription secret signed ``body`` (empty: no valid signature).

    Every secret is tried, whatever matched before: the time taken does not tell which did.
    """
    presented = parse_signature(header)
    if presented is None:
        return frozenset()
    orgs: set[str] = set()
    for org_id, secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).digest()
        if hmac.compare_digest(expected, presented):
            orgs.add(org_id)
    return frozenset(orgs)


@dataclass(frozen=True, slots=True)
class ManagerEvent:
    """The fields of an event the gateway uses (never Manager's title or description)."""

    org_id: str
    event_type: str | None
    order_request_id: str | None
    reference: str | None
    new_status: str | None
    created_at: float | None
    id: str | None


def parse_event(body: bytes, signing_orgs: frozenset[str]) -> ManagerEvent:
    """The event of a body whose signature verified for ``signing_orgs``.

    Raises:
        InvalidJsonError: not a JSON object.
        InvalidSignatureError: the event's org is not one whose secret signed it.
    """
    try:
        data = parse_json(body)
    except ValueError:
        raise InvalidJsonError() from None
    if not isinstance(data, dict):
        raise InvalidJsonError("The body is JSON, but not an object.")
    org_id = data.get("org_id")
    if not isinstance(org_id, str) or org_id not in signing_orgs:
        # A valid signature by another org's secret proves nothing about this org's orders.
        raise InvalidSignatureError()
    metadata = data.get("metadata")
    fields: Mapping[str, object] = metadata if isinstance(metadata, dict) else {}
    return ManagerEvent(
        org_id=org_id,
        event_type=_text(data.get("event_type")),
        order_request_id=_text(fields.get("order_request_id")),
        reference=_text(fields.get("external_reference")),
        new_status=_text(fields.get("new_status")),
        created_at=parse_timestamp(data.get("created_at")),
        id=_text(data.get("id")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_timestamp(value: object) -> float | None:
    """ISO 8601 (``Z`` or an offset; a naive time is taken as UTC) as Unix time, or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def build_delivery_key(header: str | None, event: ManagerEvent, body: bytes) -> str:
    """What a delivery is de-duplicated on: Manager's delivery id, else the event's id, else
    the body's hash (the same bytes again are the same delivery)."""
    for candidate in (header, event.id):
        if candidate is not None and _DELIVERY_ID.match(candidate.strip()):
            return f"{event.org_id}:{candidate.strip()}"
    return f"{event.org_id}:sha256:{hashlib.sha256(body).hexdigest()}"


def is_relayable(event: ManagerEvent) -> bool:
    """Whether an event can be matched at all: a type, and an id or a reference to match on."""
    return event.event_type is not None and (
        event.order_request_id is not None or event.reference is not None
    )


async def record_webhook(
    store: OutboxStore,
    event: ManagerEvent,
    *,
    delivery_key: str,
    org_partners: frozenset[str],
    now: float,
    dedupe_s: float,
    callback_partners: frozenset[str],
    callback_id: str,
    callback_max_age_s: float,
) -> WebhookResult:
    """Record a verified event in one committed write (dedupe, match, event, callback)."""
    assert event.event_type is not None  # is_relayable
    at = event.created_at if event.created_at is not None else now
    return await store.record_webhook(
        IncomingWebhook(
            delivery_id=delivery_key,
            org_id=event.org_id,
            org_partners=org_partners,
            order_request_id=event.order_request_id,
            reference=event.reference,
            event=LedgerEvent(event.event_type, event.new_status, at),
            manager_status=event.new_status,
            now=now,
            dedupe_until=now + dedupe_s,
            callback_partners=callback_partners,
            callback_id=callback_id,
            callback_expires_at=now + callback_max_age_s,
        )
    )


async def accept_webhook(
    store: OutboxStore,
    body: bytes,
    *,
    signature: str | None,
    delivery_id: str | None,
    secrets: Sequence[tuple[str, bytes]],
    partners_of: Mapping[str, frozenset[str]],
    callback_partners: frozenset[str],
    now: float,
    dedupe_s: float,
    callback_max_age_s: float,
) -> WebhookResult:
    """Verify, parse and record one delivery of Manager's (section 11).

    Raises:
        InvalidSignatureError: no subscribed org's secret signed it (nothing else happened).
        InvalidJsonError: a signed body that is not a JSON object.
    """
    orgs = find_signing_orgs(body, signature, secrets)
    if not orgs:
        raise InvalidSignatureError()
    event = parse_event(body, orgs)
    if not is_relayable(event):
        return WebhookResult.IGNORED
    return await record_webhook(
        store, event, delivery_key=build_delivery_key(delivery_id, event, body),
        org_partners=partners_of.get(event.org_id, frozenset()), now=now,
        dedupe_s=dedupe_s, callback_partners=callback_partners, callback_id=new_message_id(),
        callback_max_age_s=callback_max_age_s,
    )  # fmt: skip


def new_message_id() -> str:
    """A fresh ``webhook-id`` for a partner callback (Standard Webhooks' ``msg_`` form)."""
    return f"msg_{uuid.uuid4().hex}"
