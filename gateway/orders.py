"""The order pipeline, in the contract's order: map → normalize → validate → PDF → forward.

Cheap checks come first, so an invalid order never triggers a download or an upstream call.
HTTP stays outside: this module takes a parsed body and returns Manager's reply.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from gateway.codec import dump_canonical
from gateway.errors import (
    PayloadTooLargeError,
    PrescriptionPdfInvalidError,
    StateUnavailableError,
    ValidationFailedError,
)
from gateway.idempotency import build_key, hash_canonical, to_replay
from gateway.manager import ManagerClient, SplicedBody, UpstreamBody
from gateway.models import parse_envelope
from gateway.normalize import build_envelope
from gateway.observability import bind_log_context, log_event
from gateway.outbox.deliverer import Outbox
from gateway.pdf import PdfFetcher, check_inline_pdf, is_pdf
from gateway.runtime import Route
from gateway.state import StateStore, StoredReply


@dataclass(frozen=True, slots=True)
class PreparedOrder:
    """A validated canonical envelope, ready for the PDF step and Manager."""

    envelope: dict[str, object]
    payload: dict[str, object]
    reference: str
    body: bytes  # the envelope serialised once: what is sent (without a fetch) and hashed
    uploaded: bool = False  # the PDF came as a multipart file and is already checked

    @property
    def fingerprint(self) -> str:
        return hash_canonical(self.body)


def prepare_order(
    body: Mapping[str, object],
    route: Route,
    *,
    idempotency_key: str | None,
    prescription: bytes | None = None,
    max_pdf_bytes: int,
) -> PreparedOrder:
    """Map, normalize and validate (pure): the envelope that would be sent, minus fetched PDFs.

    ``prescription`` is a PDF uploaded as a multipart file; it becomes ``prescription_pdf_base64``.
    """
    envelope = build_envelope(
        body, route.target, idempotency_key=idempotency_key, new_reference=_new_reference
    )
    payload = envelope["payload"]
    if prescription is not None and isinstance(payload, dict):
        attach_prescription(payload, prescription, max_pdf_bytes)
    parsed = parse_envelope(envelope)
    assert isinstance(payload, dict)  # parse_envelope has checked it is an object
    return PreparedOrder(
        envelope,
        payload,
        parsed.external_reference,
        dump_canonical(envelope),
        uploaded=prescription is not None,
    )


def attach_prescription(payload: dict[str, object], data: bytes, max_bytes: int) -> None:
    """Put an uploaded PDF into the payload, after the same checks as an inline one."""
    if payload.get("prescription_pdf_base64") or payload.get("prescription_pdf_url"):
        raise ValidationFailedError(
            details=[
                {
                    "field": "prescription",
                    "message": "the order already carries a prescription; send it once",
                }
            ]
        )
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"The prescription PDF is larger than {max_bytes / 1048576:g} MB."
        )
    if not is_pdf(data):
        raise PrescriptionPdfInvalidError("The uploaded prescription is not a PDF.")
    payload["prescription_pdf_base64"] = base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class Delivery:
    reply: StoredReply
    replayed: bool


async def deliver_order(
    order: PreparedOrder,
    route: Route,
    *,
    store: StateStore,
    ttl_s: float,
    lease_s: float,
    manager: ManagerClient,
    pdf: PdfFetcher,
    max_pdf_bytes: int,
    outbox: Outbox | None = None,
    request_id: str | None = None,
) -> Delivery:
    """Deliver an order at most once per ``(partner, external_reference)`` within ``ttl_s``.

    A repeat of a delivered order gets the first reply again without a Manager call; failures
    are forgotten so that the partner may retry them. With the outbox, the order is stored
    before Manager is called, and one that Manager cannot take now is answered ``202 queued``.
    """
    key = build_key(route.target.partner, order.reference)
    fingerprint = order.fingerprint  # before the PDF step: a URL, not its bytes
    replay = to_replay(await store.claim(key, fingerprint, lease_s))
    if replay is not None:
        bind_log_context(replayed=True)
        return Delivery(replay, replayed=True)
    try:
        body = await build_upstream_body(order, route, pdf=pdf, max_pdf_bytes=max_pdf_bytes)
        # A caller's own org key is not verified until Manager answers, and it must not be
        # stored: such orders are not kept, as before.
        if outbox is not None and not route.upstream.from_caller:
            stored = await outbox.forward(
                partner=route.target.partner, reference=order.reference,
                target=route.upstream, body=to_bytes(body), send=manager.send_order_request,
                key=key, fingerprint=fingerprint, ttl_s=ttl_s, lease_s=lease_s,
                request_id=request_id,
            )  # fmt: skip
            return Delivery(stored.reply, replayed=False)
        reply = await manager.send_order_request(route.upstream, body)
    except BaseException:
        try:
            await store.release(key, fingerprint)
        except StateUnavailableError:
            # The claim stays until its lease ends; the partner's retry waits that long.
            log_event(40, "idempotency_release_failed")
        raise
    stored_reply = StoredReply(reply.status, reply.body, reply.content_type)
    try:
        await store.complete(key, fingerprint, stored_reply, ttl_s)
    except StateUnavailableError:
        # The order did reach Manager: the partner must hear so. Only the replay is lost.
        log_event(40, "idempotency_record_lost")
    return Delivery(stored_reply, replayed=False)


async def build_upstream_body(
    order: PreparedOrder,
    route: Route,
    *,
    pdf: PdfFetcher,
    max_pdf_bytes: int,
) -> UpstreamBody:
    """Check or fetch the prescription PDF: the body to send to Manager."""
    bind_log_context(external_reference=order.reference)
    payload = order.payload
    inline = payload.get("prescription_pdf_base64")
    if inline is not None and not order.uploaded:
        check_inline_pdf(inline, max_pdf_bytes)
    elif route.pdf == "fetch" and isinstance(payload.get("prescription_pdf_url"), str):
        url = payload.pop("prescription_pdf_url")
        assert isinstance(url, str)
        return encode_envelope(order.envelope, payload, await pdf.fetch_pdf(url))
    return order.body


def to_bytes(body: UpstreamBody) -> bytes:
    """The body in one piece (to be stored): a spliced PDF is encoded now."""
    if isinstance(body, SplicedBody):
        return body.head + binascii.b2a_base64(body.pdf, newline=False) + body.tail
    return body


def encode_envelope(
    envelope: Mapping[str, object], payload: dict[str, object], pdf: bytes | bytearray | None
) -> UpstreamBody:
    """The JSON body for Manager, serialised once.

    A fetched PDF is not put through the JSON encoder: the envelope is serialised around a
    placeholder, and the PDF is base64-encoded chunk by chunk while it is sent, so a 10 MB PDF
    is in memory once (not as bytes, base64 bytes, a JSON str and its encoding).
    """
    if pdf is None:
        return dump_canonical(envelope)
    payload["prescription_pdf_base64"] = _PDF_PLACEHOLDER
    try:
        data = dump_canonical(envelope)
    finally:
        del payload["prescription_pdf_base64"]
    head, tail = data.split(_PDF_PLACEHOLDER.encode("ascii"), 1)
    return SplicedBody(head, pdf, tail)


# Base64 needs no JSON escaping, so the placeholder's position is where the bytes go verbatim.
_PDF_PLACEHOLDER: Final = f"telemed-gateway-pdf-{uuid.uuid4().hex}"


def _new_reference() -> str:
    return str(uuid.uuid4())
