"""The JSON codec: both paths (orjson, and the standard library for long integers) accept the same
documents, and whatever is parsed can be written back."""

from __future__ import annotations

import pytest

from gateway.codec import MAX_DEPTH, dump_canonical, parse_json

LONG: bytes = b"123456789012345678901234567890"


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
        b"[" * (MAX_DEPTH + 1) + LONG + b"]" * (MAX_DEPTH + 1),
        b'{"a": "\\ud800", "n": ' + LONG + b"}",
        b'{"a": "\xed\xa0\x80", "n": ' + LONG + b"}",  # a surrogate as raw bytes: not UTF-8
        b'{"n": ' + LONG + b', "x": 1e400}',
        b'{"n": 1e' + LONG + b"}",
        b'{"n": ' + LONG + b', "x": NaN}',
        b"[0" + LONG + b"]",  # a leading zero
        b'{"n": 1' + b"0" * 400 + b".5}",  # beyond a double, written without an exponent
        b'{"a": ' * (MAX_DEPTH + 1) + b"[1, true]" + b"}" * (MAX_DEPTH + 1),
    ],
    ids=[
        "deep",
        "deep-long",
        "surrogate",
        "surrogate-bytes",
        "inf",
        "inf-exp",
        "nan",
        "zero",
        "inf-digits",
        "deep-objects",
    ],  # fmt: skip
)
def test_what_orjson_refuses_is_refused_on_the_long_number_path_too(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_json(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH, None),
        (b"[" + b",".join([b'{"a": [1]}'] * 200) + b"]", [{"a": [1]}] * 200),  # many, not deep
        (b'{"n": ' + LONG + b"}", {"n": int(LONG)}),
        (b'{"s": "\\u0041' + LONG + b'"}', {"s": "A" + LONG.decode()}),
        (b'{"n": 1' + b"0" * 400 + b"}", {"n": 10**400}),
        (b'{"n": 1.5e-' + LONG + b"}", {"n": 0.0}),
    ],
    ids=["max-depth", "wide", "long", "escape-then-digits", "beyond-double", "tiny"],
)
def test_what_is_parsed_can_be_written(raw: bytes, expected: object) -> None:
    data = parse_json(raw)

    if expected is not None:
        assert data == expected
    assert parse_json(dump_canonical(data)) == data
