"""Any body, in any content type the gateway accepts, is parsed or answered with a contract 4xx.

First the reproductions found from outside (each a 500 before), then property tests: raw and
structured bytes × JSON, ``+json`` and multipart (random boundaries, parts, headers, cuts), plain
or gzip-encoded, through the whole gateway; the gateway still serves a valid order afterwards.
"""

from __future__ import annotations

import gzip
import json
import string
import zlib
from typing import Any, Final

import pytest
from conftest import (
    KEYS,
    ORDER_PATH,
    Client,
    Reply,
    assert_error,
    flat_order,
    post_order,
    read_reply,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_docs import answer_codes

JSON: Final = "application/json"
MULTIPART: Final = "multipart/form-data"
LONG_INT: Final = b"123456789012345678901234567890"
ORDER_PART_HEAD: Final = b'Content-Disposition: form-data; name="order"'
# Bounded and derandomized: the same examples on every run, a few seconds in all.
PROPERTY: Final = settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def send(
    client: Client, body: bytes, content_type: str, *, encoding: str | None = None
) -> Reply:
    headers = {"apikey": KEYS["acme"], "Content-Type": content_type}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    async with client.post(
        ORDER_PATH, data=body, headers=headers, skip_auto_headers=["Content-Type"]
    ) as response:
        return await read_reply(response)


def assert_answered(reply: Reply) -> None:
    """Served (2xx), or refused with the contract's JSON error: a 4xx, never a 500."""
    if reply.status < 400:
        assert reply.status == 200, reply.body
        return
    assert 400 <= reply.status < 500, reply.body
    assert_error(reply, reply.status, reply.body["error"])
    assert reply.body["error"] in answer_codes()


def multipart_type(boundary: str) -> str:
    return f"{MULTIPART}; boundary={boundary}"


async def assert_invalid(client: Client, body: bytes, content_type: str, **kw: Any) -> None:
    assert_error(await send(client, body, content_type, **kw), 400, "invalid_json")


# --- the reproductions ----------------------------------------------------------------------------


async def test_multipart_with_an_empty_body_is_invalid_json(gateway_client: Client) -> None:
    await assert_invalid(gateway_client, b"", multipart_type("x"))


async def test_multipart_part_header_with_non_ascii_and_control_bytes_is_invalid_json(
    gateway_client: Client,
) -> None:
    body = b"--x\r\nCont\xffent-Dis\x01position: form-data\r\n\r\n{}\r\n--x--\r\n"

    await assert_invalid(gateway_client, body, multipart_type("x"))


async def test_multipart_part_name_with_non_ascii_and_control_bytes_is_a_4xx(
    gateway_client: Client,
) -> None:
    body = b'--x\r\nContent-Disposition: form-data; name="\xff\x01"\r\n\r\n{}\r\n--x--\r\n'

    reply = await send(gateway_client, body, multipart_type("x"))

    assert_answered(reply)
    assert reply.status in (400, 422)


async def test_multipart_with_no_delimiter_is_invalid_json(gateway_client: Client) -> None:
    await assert_invalid(gateway_client, b'{"customer_name": "A"}', multipart_type("x"))


async def test_multipart_with_an_empty_boundary_is_invalid_json(gateway_client: Client) -> None:
    await assert_invalid(gateway_client, b"--\r\n\r\n", multipart_type(""))


async def test_multipart_without_its_closing_delimiter_is_invalid_json(
    gateway_client: Client,
) -> None:
    body = b"--x\r\n" + ORDER_PART_HEAD + b'\r\n\r\n{"customer_name": "A"}'

    await assert_invalid(gateway_client, body, multipart_type("x"))


async def test_multipart_cut_inside_a_part_header_is_invalid_json(gateway_client: Client) -> None:
    await assert_invalid(
        gateway_client, b"--x\r\nContent-Disposition: form-da", multipart_type("x")
    )


async def test_multipart_part_header_line_without_a_colon_is_invalid_json(
    gateway_client: Client,
) -> None:
    body = b"--x\r\nContent-Disposition form-data\r\n\r\n{}\r\n--x--\r\n"

    await assert_invalid(gateway_client, body, multipart_type("x"))


async def test_multipart_part_header_line_over_the_line_limit_is_invalid_json(
    gateway_client: Client,
) -> None:
    body = (
        b"--x\r\nX-Padding: "
        + b"a" * 20_000
        + b"\r\n"
        + ORDER_PART_HEAD
        + b"\r\n\r\n{}\r\n--x--\r\n"
    )

    await assert_invalid(gateway_client, body, multipart_type("x"))


async def test_gzip_encoded_body_that_is_not_gzip_is_invalid_json(gateway_client: Client) -> None:
    await assert_invalid(gateway_client, json.dumps(flat_order()).encode(), JSON, encoding="gzip")


async def test_gzip_encoded_json_body_is_read(gateway_client: Client) -> None:
    body = gzip.compress(json.dumps(flat_order()).encode())

    reply = await send(gateway_client, body, JSON, encoding="gzip")

    assert reply.status == 200, reply.body


async def test_json_nested_thousands_deep_around_a_long_integer_is_invalid_json(
    gateway_client: Client,
) -> None:
    body = b"[" * 5000 + LONG_INT + b"]" * 5000

    await assert_invalid(gateway_client, body, JSON)


async def test_json_nested_a_thousand_deep_in_an_order_is_invalid_json(
    gateway_client: Client,
) -> None:
    # orjson reads 1024 levels but writes 254: such an order failed when it was forwarded.
    body = json.dumps(flat_order(notes="NESTED")).encode()
    body = body.replace(b'"NESTED"', b"[" * 1000 + b"1" + b"]" * 1000)

    await assert_invalid(gateway_client, body, JSON)


async def test_lone_surrogate_beside_a_long_integer_is_invalid_json(
    gateway_client: Client,
) -> None:
    body = json.dumps(flat_order(customer_name="\ud800", external_id="LONG")).encode()
    body = body.replace(b'"LONG"', LONG_INT)
    assert b"\\ud800" in body

    await assert_invalid(gateway_client, body, JSON)


async def test_long_integer_in_an_order_still_reaches_manager_digit_for_digit(
    gateway_client: Client,
) -> None:
    body = json.dumps(flat_order(external_id="LONG")).encode().replace(b'"LONG"', LONG_INT)

    assert (await send(gateway_client, body, JSON)).status == 200


# --- property tests -------------------------------------------------------------------------------

BOUNDARY_CHARS: Final = string.ascii_letters + string.digits + "'()+_,-./:=? "
boundaries = st.text(alphabet=BOUNDARY_CHARS, max_size=72)
json_types = st.sampled_from(
    [JSON, f"{JSON}; charset=utf-8", "application/vnd.partner+json", "application/merge+json"]
)
encodings = st.sampled_from([None, "gzip", "deflate", "identity"])
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
ORDER_FIELDS: Final = ["customer_name", "customer_email", "items", "quantity", "external_reference"]
orders = st.dictionaries(st.sampled_from(ORDER_FIELDS) | st.text(max_size=8), json_values)
header_lines = st.one_of(
    st.just(ORDER_PART_HEAD),
    st.just(b'Content-Disposition: form-data; name="prescription"; filename="rx.pdf"'),
    st.just(b"Content-Type: application/json"),
    st.just(b"Content-Length: -3"),
    st.just(b"Content-Transfer-Encoding: base64"),
    st.just(b"X-Long: " + b"a" * 9000),
    st.binary(max_size=40),
)


VALID_ORDER_HEAD: Final = b'{"customer_name": "A", "items": [{"name": "B", "quantity": 1}], '


@st.composite
def wrapped(draw: st.DrawFn, document: bytes) -> bytes:
    """``document``, maybe cut short, or inside a valid order: nested deep, beside an escape
    that is not text, or beside an integer beyond 64 bits (the standard library's path)."""
    how = draw(st.sampled_from(["as-is", "cut", "deep", "surrogate", "long-int"]))
    if how == "as-is":
        return document
    if how == "cut":
        return document[: draw(st.integers(0, max(0, len(document) - 1)))]
    extra = b""
    if how == "deep":
        depth = draw(st.integers(100, 3000))
        document = b"[" * depth + document + b"]" * depth
        extra = draw(st.sampled_from([b"", b'"n": ' + LONG_INT + b", "]))
    elif how == "surrogate":
        extra = b'"s": "\\udc00", "n": ' + LONG_INT + b", "
    else:
        extra = b'"n": ' + LONG_INT + b", "
    return VALID_ORDER_HEAD + extra + b'"d": ' + document + b"}"


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    document = draw(st.binary(max_size=200) | orders.map(lambda o: json.dumps(o).encode()))
    return draw(wrapped(document))


@st.composite
def multipart_bodies(draw: st.DrawFn, boundary: str) -> bytes:
    delimiter = draw(st.sampled_from([boundary, boundary + "x", ""])).encode("latin-1")
    chunks: list[bytes] = [draw(st.sampled_from([b"", b"preamble\r\n"]))]
    for _ in range(draw(st.integers(0, 3))):
        chunks.append(b"--" + delimiter + b"\r\n")
        chunks.extend(line + b"\r\n" for line in draw(st.lists(header_lines, max_size=3)))
        chunks.append(b"\r\n")
        chunks.append(draw(json_bodies() | st.binary(max_size=100)) + b"\r\n")
    if draw(st.booleans()):
        chunks.append(b"--" + delimiter + b"--\r\n")
    body = b"".join(chunks)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return body


def encoded(body: bytes, encoding: str | None, garble: bool) -> bytes:
    """The body as its Content-Encoding says (unless ``garble``: then the plain bytes)."""
    if encoding in (None, "identity") or garble:
        return body
    return gzip.compress(body) if encoding == "gzip" else zlib.compress(body)


@pytest.fixture
async def fuzzed_client(gateway_client: Client) -> Any:
    """The gateway under fuzzing; afterwards it must still take a valid order."""
    yield gateway_client
    reply = await post_order(gateway_client, flat_order(external_reference="AFTER-FUZZING"))
    assert reply.status == 200, reply.body


@PROPERTY
@given(
    body=st.binary(max_size=300), content_type=json_types, encoding=encodings, garble=st.booleans()
)
async def test_any_bytes_as_json_are_answered_with_a_4xx(
    fuzzed_client: Client, body: bytes, content_type: str, encoding: str | None, garble: bool
) -> None:
    assert_answered(
        await send(fuzzed_client, encoded(body, encoding, garble), content_type, encoding=encoding)
    )


@PROPERTY
@given(body=json_bodies(), content_type=json_types, encoding=encodings, garble=st.booleans())
async def test_json_cut_nested_or_not_text_is_answered_with_a_4xx(
    fuzzed_client: Client, body: bytes, content_type: str, encoding: str | None, garble: bool
) -> None:
    assert_answered(
        await send(fuzzed_client, encoded(body, encoding, garble), content_type, encoding=encoding)
    )


@PROPERTY
@given(data=st.data(), boundary=boundaries, encoding=encodings, garble=st.booleans())
async def test_any_multipart_body_is_answered_with_a_4xx(
    fuzzed_client: Client, data: st.DataObject, boundary: str, encoding: str | None, garble: bool
) -> None:
    body = data.draw(multipart_bodies(boundary))
    quoted = data.draw(st.booleans())
    content_type = multipart_type(f'"{boundary}"' if quoted else boundary)

    reply = await send(
        fuzzed_client, encoded(body, encoding, garble), content_type, encoding=encoding
    )

    assert_answered(reply)


@PROPERTY
@given(body=st.binary(max_size=300), boundary=boundaries)
async def test_any_bytes_as_multipart_are_answered_with_a_4xx(
    fuzzed_client: Client, body: bytes, boundary: str
) -> None:
    assert_answered(await send(fuzzed_client, body, multipart_type(boundary)))


async def test_gzip_body_is_cut_at_the_limit_when_decoded(make_gateway: Any) -> None:
    client = (await make_gateway(server={"max_body_mb": 1})).client
    body = gzip.compress(b'{"notes": "' + b" " * 3 * 1024 * 1024 + b'"}')  # 3 MiB in 3 KiB
    assert len(body) < 10_000

    assert_error(await send(client, body, JSON, encoding="gzip"), 413, "payload_too_large")


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [(JSON, "br"), (JSON, "compress"), (multipart_type("x"), "gzip")],
)
async def test_content_encoding_the_gateway_does_not_decode_is_unsupported_media_type(
    gateway_client: Client, content_type: str, encoding: str
) -> None:
    reply = await send(gateway_client, b"{}", content_type, encoding=encoding)

    assert_error(reply, 415, "unsupported_media_type")
