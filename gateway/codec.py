"""JSON in and out, fast (orjson) and exact (the standard library where orjson would not be).

orjson reads integers beyond 64 bits as floats and refuses to write them; a partner's 20-digit
numeric id must reach Manager digit for digit, so such bodies take the standard library's path.
"""

from __future__ import annotations

import json
from typing import Final

import orjson

# A run of 19+ digits may be an integer beyond 64 bits (or a float's long mantissa). Looked for
# as "0" * 19 in the body with every digit mapped to 0: a regex scan costs more than orjson's parse.
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN: Final = b"0" * 19


def parse_json(raw: bytes) -> object:
    """Parse a JSON document.

    Raises:
        ValueError: not JSON (including NaN / Infinity, which JSON does not have).
    """
    if _LONG_RUN not in raw.translate(_DIGITS_TO_ZERO):
        return orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
    return json.loads(raw, parse_constant=_refuse_constant)


def dump_canonical(data: object) -> bytes:
    """Compact UTF-8 JSON with sorted keys: the bytes sent upstream and hashed for idempotency.

    Key order and whitespace of the partner's body do not change these bytes.
    """
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits: exact, the slower way
        return json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")


def dump_line(data: object) -> bytes:
    """Compact JSON for a log line (values the encoder does not know are written as str)."""
    return orjson.dumps(data, default=str)


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
