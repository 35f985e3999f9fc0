"""Reading a partner's request body: JSON or multipart (``order`` + ``prescription``), with limits.

The body is read only after authentication, and never past ``server.max_body_mb``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import BodyPartReader, web

from gateway.codec import parse_json
from gateway.errors import (
    InvalidJsonError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)

JSON_TYPES: Final = frozenset({"application/json"})
MULTIPART_TYPE: Final = "multipart/form-data"
ORDER_PART: Final = "order"
PRESCRIPTION_PART: Final = "prescription"
CHUNK_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class Intake:
    """What the partner sent: the order's JSON object, and a prescription file if uploaded."""

    body: Mapping[str, object]
    prescription: bytes | None = None


def is_json_type(content_type: str) -> bool:
    return content_type in JSON_TYPES or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def read_intake(request: web.Request, max_bytes: int) -> Intake:
    """Read and parse the body.

    Raises:
        UnsupportedMediaTypeError, PayloadTooLargeError, InvalidJsonError, ValidationFailedError.
    """
    content_type = request.content_type
    if not (is_json_type(content_type) or content_type == MULTIPART_TYPE):
        raise UnsupportedMediaTypeError()
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    if content_type == MULTIPART_TYPE:
        return await _read_multipart(request, max_bytes)
    raw = await _read_limited(request, max_bytes)
    return Intake(parse_json_object(raw))


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The raw body, never read past ``max_bytes``.

    Raises:
        PayloadTooLargeError: the body is (or announces itself) larger.
    """
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    return await _read_limited(request, max_bytes)


def parse_json_object(raw: bytes) -> Mapping[str, object]:
    """The body as a JSON object, or :class:`InvalidJsonError`."""
    try:
        data = parse_json(raw)
    except ValueError:  # UnicodeDecodeError included
        raise InvalidJsonError() from None
    if not isinstance(data, dict):
        raise InvalidJsonError("The body is JSON, but not an object.")
    return data


async def _read_limited(request: web.Request, max_bytes: int) -> bytes:
    if request.content_length is not None:
        return await request.read()  # already checked against the limit; one buffer, no copies
    buffer = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        buffer += chunk
        if len(buffer) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(buffer)


async def _read_multipart(request: web.Request, max_bytes: int) -> Intake:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError):
        raise InvalidJsonError("The multipart body could not be read.") from None
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
        if part.name == ORDER_PART:
            body = parse_json_object(data)
        elif part.name == PRESCRIPTION_PART:
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


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {max_bytes / 1048576:g} MB.")
