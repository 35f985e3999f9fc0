"""Reading a partner's request body: JSON or multipart (``order`` + ``prescription``), with limits.

The body is read only after authentication, and never past ``server.max_body_mb``.
"""

from __future__ import annotations

import asyncio
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from gateway.codec import parse_json
from gateway.errors import (
    InvalidJsonError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)

JSON_TYPES: Final = frozenset({"application/json"})
MULTIPART_TYPE: Final = "multipart/form-data"
ORDER_PART: Final = "order"
PRESCRIPTION_PART: Final = "prescription"
CHUNK_SIZE: Final = 65536
# Content-Encoding → zlib's wbits. The gateway decodes bodies itself (aiohttp's auto_decompress
# is off, app.py) so that the size limit counts decoded bytes and a broken encoding is a 4xx.
ENCODINGS: Final = {"identity": 0, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# What aiohttp raises for bytes it cannot make a body of: a multipart body without its boundary,
# cut short, or with a part header that is not a header (ValueError, AssertionError, the
# HttpProcessingError family: InvalidHeader, LineTooLong, ...), a Content-Encoding the bytes do
# not match (zlib.error). The JSON reader raises ValueError too.
UNREADABLE_BODY: Final = (
    ValueError,
    zlib.error,
    AssertionError,
    HttpProcessingError,
    web.RequestPayloadError,
)


@dataclass(frozen=True, slots=True)
class Intake:
    """What the partner sent: the order's JSON object, and a prescription file if uploaded."""

    body: Mapping[str, object]
    prescription: bytes | None = None


def is_json_type(content_type: str) -> bool:
    return content_type in JSON_TYPES or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def read_intake(request: web.Request, max_bytes: int, timeout_s: float) -> Intake:
    """Read and parse the body, within ``timeout_s``.

    This is the one place where a body that cannot be read or parsed becomes the contract's 4xx:
    whatever the bytes, the answer is one of the errors below, never a 500.

    Raises:
        UnsupportedMediaTypeError, PayloadTooLargeError, InvalidJsonError, ValidationFailedError,
        RequestTimeoutError.
    """
    content_type = request.content_type
    if not (is_json_type(content_type) or content_type == MULTIPART_TYPE):
        raise UnsupportedMediaTypeError()
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise UnsupportedMediaTypeError("Content-Encoding may be gzip, deflate or identity.")
    if encoding != "identity" and content_type == MULTIPART_TYPE:
        raise UnsupportedMediaTypeError("Send multipart bodies without a Content-Encoding.")
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        if content_type != MULTIPART_TYPE and request.content.is_eof():
            # The whole body is here already (a small one arrives with the headers): reading it
            # cannot wait, so it needs no deadline, and no timer is set on every order.
            raw = await _read_limited(request, max_bytes, ENCODINGS[encoding])
        else:
            async with asyncio.timeout(timeout_s):
                if content_type == MULTIPART_TYPE:
                    return await _read_multipart(request, max_bytes)
                raw = await _read_limited(request, max_bytes, ENCODINGS[encoding])
    except TimeoutError:
        raise RequestTimeoutError() from None
    except UNREADABLE_BODY:
        kind = "multipart" if content_type == MULTIPART_TYPE else "JSON"
        raise InvalidJsonError(f"The {kind} body could not be read.") from None
    return Intake(parse_json_object(raw))


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body as sent (a signature covers these bytes), never read past ``max_bytes``.

    Raises:
        PayloadTooLargeError, RequestTimeoutError, InvalidJsonError (the body broke off).
    """
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_limited(request, max_bytes, 0)
    except TimeoutError:
        raise RequestTimeoutError() from None
    except UNREADABLE_BODY:
        raise InvalidJsonError("The body could not be read.") from None


def parse_json_object(raw: bytes) -> Mapping[str, object]:
    """The body as a JSON object, or :class:`InvalidJsonError`."""
    try:
        data = parse_json(raw)
    except ValueError:  # UnicodeDecodeError included
        raise InvalidJsonError() from None
    if not isinstance(data, dict):
        raise InvalidJsonError("The body is JSON, but not an object.")
    return data


async def _read_limited(request: web.Request, max_bytes: int, wbits: int) -> bytes:
    if not wbits and request.content_length is not None:
        return await request.read()  # already checked against the limit; one buffer, no copies
    # A compressed body is decoded as it arrives and cut at the limit: a small gzip body may
    # decode to gigabytes.
    inflater = zlib.decompressobj(wbits) if wbits else None
    buffer = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        if inflater is not None:
            chunk = inflater.decompress(chunk, max_bytes - len(buffer) + 1)
        buffer += chunk
        if len(buffer) > max_bytes:
            raise _too_large(max_bytes)
    if inflater is not None and not (inflater.eof and not inflater.unused_data):
        raise ValueError("the compressed body is cut short or followed by other bytes")
    return bytes(buffer)


async def _read_multipart(request: web.Request, max_bytes: int) -> Intake:
    reader = await request.multipart()
    body: Mapping[str, object] | None = None
    prescription: bytes | None = None
    remaining = max_bytes
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise InvalidJsonError("Nested multipart bodies are not accepted.")
        data = await _read_part(part, remaining, max_bytes)
        remaining -= len(data)
        name = _part_name(part)
        if name == ORDER_PART:
            body = parse_json_object(data)
        elif name == PRESCRIPTION_PART:
            prescription = data
        # Other parts are read and ignored: a form may carry a submit button or similar.
    if body is None:
        raise ValidationFailedError(
            details=[{"field": ORDER_PART, "message": "a multipart order needs a part 'order'"}]
        )
    return Intake(body, prescription)


async def _read_part(part: BodyPartReader, remaining: int, max_bytes: int) -> bytes:
    buffer = bytearray()
    while chunk := await part.read_chunk(CHUNK_SIZE):
        buffer += chunk
        if len(buffer) > remaining:
            raise _too_large(max_bytes)
    return bytes(buffer)


def _part_name(part: BodyPartReader) -> str | None:
    # aiohttp warns about a malformed Content-Disposition, quoting it, and gives no name: a part
    # without a name is what the gateway makes of it, and partner input stays out of stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadContentDispositionHeader)
        warnings.simplefilter("ignore", BadContentDispositionParam)
        return part.name


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {max_bytes / 1048576:g} MB.")
