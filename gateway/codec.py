"""JSON in and out, fast (orjson) and exact (the standard library where orjson would not be).

orjson reads integers beyond 64 bits as floats and refuses to write them; a partner's 20-digit
numeric id must reach Manager digit for digit, so such bodies take the standard library's path.
Both paths accept the same documents: orjson decides what is JSON (UTF-8 without lone
surrogates, no NaN, nesting at most ``MAX_DEPTH``), so whatever ``parse_json`` returns,
``dump_canonical`` can write.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final

import orjson

# A run of 19+ digits may be an integer beyond 64 bits (or a float's long mantissa). Whether there
# is one is looked for as "0" * 19 in the body with every digit mapped to 0: a regex scan of every
# body cost four times orjson's parse. The regex serves the rare bodies that have one.
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN: Final = b"0" * 19
_LONG_NUMBER: Final = re.compile(rb"(\d{4})\d{15,}")
# Deeper bodies are refused: orjson writes at most 254 levels, the envelope adds one or two, and
# the standard library's recursive reader and writer must stay far from Python's recursion limit.
MAX_DEPTH: Final = 128


def parse_json(raw: bytes) -> object:
    """Parse a JSON document.

    Raises:
        ValueError: not JSON (including NaN / Infinity, which JSON does not have, and lone
            surrogates, which are not text), or nested deeper than ``MAX_DEPTH``.
    """
    if _LONG_RUN not in raw.translate(_DIGITS_TO_ZERO):
        data = orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
        _check_depth(raw, data)
        return data
    # The same document with each long run of digits cut to its first four (which keeps a \uXXXX
    # escape whole) is JSON exactly when this one is: orjson checks it and its depth, then the
    # standard library reads the numbers exactly.
    _check_depth(raw, orjson.loads(_LONG_NUMBER.sub(rb"\1", raw)))
    return json.loads(raw, parse_float=_finite_float)


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


def _check_depth(raw: bytes, data: object) -> None:
    # Cheap first: a body with few brackets cannot be deep (a PDF's base64 has none at all).
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    pending: list[tuple[object, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children: list[object] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        pending.extend((child, depth + 1) for child in children)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1000…(400 digits).5: orjson refuses it too
        raise ValueError("a number beyond the range of a double")
    return value
