"""A partner's body → the canonical envelope: the partner's profile (JMESPath), then built-in rules.

Pure code: no I/O, no aiohttp. The result is a plain dict that ``models.parse_envelope`` checks
and that is forwarded as it is, so values the gateway does not know pass through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jmespath
import jmespath.exceptions
import jmespath.functions
from jmespath.parser import ParsedResult

from gateway.errors import ConfigError, ShopMismatchError, ValidationFailedError

ENVELOPE_FIELDS: Final = frozenset({"external_reference", "source", "payload"})
NUMERIC_LINE_FIELDS: Final = ("quantity", "price")
NUMERIC_PAYLOAD_FIELDS: Final = ("total_amount",)
_NUMERIC: Final = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")


@dataclass(frozen=True, slots=True)
class Profile:
    """A compiled ``[profiles.NAME]`` table."""

    name: str
    fields: tuple[tuple[str, ParsedResult], ...]
    keep_unmapped: bool
    # Top-level names the expressions read; with keep_unmapped, the other body keys are copied.
    referenced: frozenset[str]
    reads_whole_body: bool = False  # an expression reads `@` or `*`: nothing is "unmapped"


@dataclass(frozen=True, slots=True)
class Target:
    """What normalization needs to know about the caller and its shop."""

    partner: str
    shop_id: str
    org_id: str
    default_source: str
    require_reference: bool = False
    profile: Profile | None = None


def compile_profile(name: str, fields: Mapping[str, str], keep_unmapped: bool) -> Profile:
    """Compile every expression once, at configuration load.

    Raises:
        ConfigError: naming the profile and the field whose expression does not parse.
    """
    compiled: list[tuple[str, ParsedResult]] = []
    roots: set[str | None] = set()
    for target, expression in fields.items():
        where = f"profiles.{name}.{target}"
        try:
            parsed = jmespath.compile(expression)
        except jmespath.exceptions.JMESPathError as exc:
            raise ConfigError(
                f"{where}: not a valid JMESPath expression ({exc.__class__.__name__})"
            ) from None
        _check_functions(parsed.parsed, where)
        compiled.append((target, parsed))
        roots.update(_root_names(parsed.parsed))
    named = frozenset(root for root in roots if root is not None)
    return Profile(name, tuple(compiled), keep_unmapped, named, reads_whole_body=None in roots)


# Nodes whose first child is evaluated against the body and the others against its result.
_LEFT_ONLY: Final = frozenset(
    {"subexpression", "index_expression", "projection", "value_projection",
     "filter_projection", "flatten", "pipe"}
)  # fmt: skip
_FUNCTIONS: Final = jmespath.functions.Functions().FUNCTION_TABLE


def _root_names(node: Any) -> Iterator[str | None]:
    """Top-level body keys an expression reads (None: the whole body, as ``@`` or ``*``)."""
    kind = node.get("type")
    if kind == "field":
        yield node["value"]
    elif kind in ("identity", "current"):
        yield None
    elif kind in _LEFT_ONLY:
        yield from _root_names(node["children"][0])
    elif kind != "expref":  # &expr is applied to elements, not to the body
        for child in node.get("children", ()):
            yield from _root_names(child)


def _check_functions(node: Any, where: str) -> None:
    """jmespath checks function names and arities only when searching: check them at load."""
    if node.get("type") == "function_expression":
        name = node["value"]
        entry = _FUNCTIONS.get(name)
        if entry is None:
            raise ConfigError(f"{where}: unknown JMESPath function {name}()")
        signature = entry["signature"]
        count = len(node["children"])
        variadic = bool(signature) and signature[-1].get("variadic", False)
        if count < len(signature) or (count > len(signature) and not variadic):
            raise ConfigError(f"{where}: {name}() takes {len(signature)} argument(s), not {count}")
    for child in node.get("children", ()):
        _check_functions(child, where)


def apply_profile(body: Mapping[str, object], profile: Profile) -> dict[str, object]:
    """Map a partner's own shape to the flat shape (payload fields plus reference and source).

    Raises:
        ValidationFailedError: an expression could not be evaluated on this body.
    """
    flat: dict[str, object] = {}
    if profile.keep_unmapped and not profile.reads_whole_body:
        flat.update((k, v) for k, v in body.items() if k not in profile.referenced)
    problems: list[Mapping[str, object]] = []
    for target, expression in profile.fields:
        try:
            value = expression.search(body)
        except jmespath.exceptions.JMESPathError:
            # jmespath's message quotes the values it saw: health data, so it is not passed on.
            problems.append(
                {"field": target, "message": f"profile {profile.name}: the expression does not fit"}
            )
            continue
        if value is None:
            flat.pop(target, None)
        else:
            flat[target] = without_nulls(value)
    if problems:
        raise ValidationFailedError(details=problems)
    return flat


def without_nulls(value: object) -> object:
    """Null results are left out at every depth: ``lines[].{price: unit_price}`` on a line
    without a price gives no ``price``, not ``"price": null``."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def build_envelope(
    body: Mapping[str, object],
    target: Target,
    *,
    idempotency_key: str | None,
    new_reference: Callable[[], str],
) -> dict[str, object]:
    """Turn a partner body (envelope, flat, or profiled shape) into the canonical envelope dict.

    Raises:
        ShopMismatchError: the body names another shop or org.
        ValidationFailedError: alias conflicts, or a reference required and missing.
    """
    if target.profile is not None:
        body = apply_profile(body, target.profile)
    if "payload" in body:
        envelope = {k: v for k, v in body.items() if k != "payload"}
        payload_in = body["payload"]
    else:
        envelope = {k: body[k] for k in ("external_reference", "source") if k in body}
        payload_in = {k: v for k, v in body.items() if k not in ENVELOPE_FIELDS}
    _check_shop(envelope, target)
    if isinstance(payload_in, Mapping):
        _check_shop(payload_in, target)
        payload: object = build_payload(payload_in, target.shop_id)
    else:
        payload = payload_in  # validation reports that it is not an object
    envelope["external_reference"] = _reference(envelope, target, idempotency_key, new_reference)
    if envelope.get("source") in (None, ""):
        envelope["source"] = target.default_source
    envelope["payload"] = payload
    for key in ("shop_id", "org_id"):
        envelope.pop(key, None)
    return envelope


def build_payload(payload_in: Mapping[str, object], shop_id: str) -> dict[str, object]:
    """Apply the per-field rules: aliases, numeric strings, the shop injected."""
    problems: list[Mapping[str, object]] = []
    # The shop first, then the partner's fields in their order, without its shop_id or org_id.
    payload: dict[str, object] = {"shop_id": shop_id, **payload_in}
    payload["shop_id"] = shop_id
    payload.pop("org_id", None)
    if "prescription_url" in payload:
        alias = payload.pop("prescription_url")
        if alias is not None and payload.get("prescription_pdf_url") not in (None, alias):
            problems.append(
                {
                    "field": "payload.prescription_url",
                    "message": "differs from prescription_pdf_url; send one of them",
                }
            )
        elif alias is not None:
            payload["prescription_pdf_url"] = alias
    for name in NUMERIC_PAYLOAD_FIELDS:
        if name in payload:
            payload[name] = to_number(payload[name])
    items = payload.get("items")
    if isinstance(items, list):
        payload["items"] = [_build_line(line, i, problems) for i, line in enumerate(items)]
    if problems:
        raise ValidationFailedError(details=problems)
    return payload


def _build_line(line: object, index: int, problems: list[Mapping[str, object]]) -> object:
    if not isinstance(line, Mapping):
        return line
    out = dict(line)
    if out.get("qty") is None:
        out.pop("qty", None)  # a null alias is an alias not sent
    else:
        qty = to_number(out.pop("qty"))
        if out.get("quantity") is not None and to_number(out["quantity"]) != qty:
            problems.append(
                {
                    "field": f"payload.items[{index}].qty",
                    "message": "qty and quantity differ; send one of them",
                }
            )
        out["quantity"] = qty
    for name in NUMERIC_LINE_FIELDS:
        if name in out:
            out[name] = to_number(out[name])
    return out


def to_number(value: object) -> object:
    """``"5"`` → 5, ``"8.59"`` → 8.59; anything else is returned as it is, for validation."""
    if isinstance(value, str) and _NUMERIC.match(value):
        text = value.strip()
        return float(text) if "." in text else int(text)
    return value


def _check_shop(data: Mapping[str, object], target: Target) -> None:
    for key, expected in (("shop_id", target.shop_id), ("org_id", target.org_id)):
        value = data.get(key)
        if value is not None and str(value) != expected:
            raise ShopMismatchError(f"The body's {key} is not the shop this key belongs to.")


def _reference(
    envelope: Mapping[str, object],
    target: Target,
    idempotency_key: str | None,
    new_reference: Callable[[], str],
) -> object:
    value = envelope.get("external_reference")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value not in (None, ""):
        return value  # a non-string is reported by validation
    if idempotency_key:
        return idempotency_key
    if target.require_reference:
        raise ValidationFailedError(
            details=[
                {
                    "field": "external_reference",
                    "message": "this partner must send external_reference (or Idempotency-Key)",
                }
            ]
        )
    return f"{target.partner}-{new_reference()}"
