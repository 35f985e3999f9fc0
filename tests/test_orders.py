"""orders.py: the envelope serialised once, with a fetched PDF spliced in as base64."""

from __future__ import annotations

import base64
import json

import pytest

from gateway.manager import SPLICE_CHUNK, SplicedBody
from gateway.orders import encode_envelope


async def collect(body: SplicedBody) -> bytes:
    return b"".join([chunk async for chunk in body.chunks()])


def test_envelope_without_pdf_is_compact_utf8_json() -> None:
    envelope = {"external_reference": "R-1", "payload": {"customer_name": "Jürgen"}}

    body = encode_envelope(envelope, envelope["payload"], None)  # type: ignore[arg-type]

    assert isinstance(body, bytes)
    assert body == '{"external_reference":"R-1","payload":{"customer_name":"Jürgen"}}'.encode()


@pytest.mark.parametrize(
    "size",
    [0, 1, 2, 3, 4, SPLICE_CHUNK - 1, SPLICE_CHUNK, SPLICE_CHUNK + 1, 2 * SPLICE_CHUNK + 2],
)
async def test_spliced_pdf_is_the_same_json_as_base64_in_the_dict(size: int) -> None:
    pdf = bytes(range(256)) * (size // 256) + bytes(size % 256)
    payload: dict[str, object] = {"shop_id": "s1", "customer_name": "A"}
    envelope = {"external_reference": "R-1", "source": "x", "payload": payload}

    body = encode_envelope(envelope, payload, bytearray(pdf))

    assert isinstance(body, SplicedBody)
    sent = await collect(body)
    assert body.length == len(sent)
    decoded = json.loads(sent)
    assert base64.b64decode(decoded["payload"]["prescription_pdf_base64"]) == pdf
    assert decoded["payload"]["customer_name"] == "A"
    assert "prescription_pdf_base64" not in payload  # the dict is left as it was


async def test_spliced_body_can_be_sent_again_for_a_retry() -> None:
    payload: dict[str, object] = {"shop_id": "s1"}
    body = encode_envelope({"payload": payload}, payload, b"%PDF-1.4 retry")
    assert isinstance(body, SplicedBody)

    assert await collect(body) == await collect(body)
