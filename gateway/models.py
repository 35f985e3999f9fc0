"""The canonical order request: Manager's envelope and its rules, as pydantic models.

Fields the gateway does not know (address fields, notes, …) are kept and forwarded untouched.
``parse_envelope`` turns pydantic's errors into the contract's per-field ``details``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from gateway.errors import ValidationFailedError

_EMAIL: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_REFERENCE_LENGTH: Final = 200

# StrictFloat accepts ints and refuses strings and booleans; the model only validates: what is
# forwarded is the normalized dict, so an int quantity stays an int on the wire.
Number = StrictFloat
NonNegative = Annotated[Number, Field(ge=0)]
Identifier = StrictStr | StrictInt


class LineItem(BaseModel):
    """One order line: ``quantity`` > 0 and at least one of ``name``, ``p1_id``, ``product_id``."""

    model_config = ConfigDict(extra="allow")

    quantity: Annotated[Number, Field(gt=0)]
    name: StrictStr | None = None
    p1_id: Identifier | None = None
    product_id: Identifier | None = None
    price: NonNegative | None = None


class Payload(BaseModel):
    """The order itself, as Manager's order-requests endpoint takes it."""

    model_config = ConfigDict(extra="allow")

    shop_id: StrictStr
    customer_name: StrictStr | None = None
    customer_email: StrictStr | None = None
    items: list[LineItem] | None = None
    prescription_pdf_base64: StrictStr | None = None
    prescription_pdf_url: StrictStr | None = None
    total_amount: NonNegative | None = None
    cash_on_pickup: StrictBool | None = None

    @field_validator("customer_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value and not _EMAIL.match(value):
            raise ValueError("is not an email address")
        return value


class Envelope(BaseModel):
    """Manager's order-request envelope; ``external_reference`` and ``source`` always set here."""

    model_config = ConfigDict(extra="allow")

    external_reference: Annotated[StrictStr, Field(min_length=1, max_length=MAX_REFERENCE_LENGTH)]
    source: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    payload: Payload


def parse_envelope(data: Mapping[str, object]) -> Envelope:
    """Validate a normalized envelope: field types (pydantic) and Manager's cross-field rules.

    Raises:
        ValidationFailedError: with one ``{"field", "message"}`` detail per problem, all at once.
    """
    problems = find_rule_problems(data)
    try:
        envelope = Envelope.model_validate(data)
    except ValidationError as exc:
        problems = {**build_details(exc), **problems}
    else:
        if not problems:
            return envelope
    raise ValidationFailedError(
        details=[{"field": field, "message": message} for field, message in problems.items()]
    )


def find_rule_problems(envelope: Mapping[str, object]) -> dict[str, str]:
    """Manager's rules across fields (pydantic checks each field alone), as field → message."""
    payload = envelope.get("payload")
    if not isinstance(payload, Mapping):
        return {}
    problems: dict[str, str] = {}
    if not _filled(payload.get("customer_name")) and not _filled(payload.get("customer_email")):
        problems["payload.customer_name"] = "customer_name or customer_email is required"
    items = payload.get("items")
    has_prescription = _filled(payload.get("prescription_pdf_base64")) or _filled(
        payload.get("prescription_pdf_url")
    )
    if not has_prescription and not (isinstance(items, list) and items):
        problems["payload.items"] = "items (at least one line) or a prescription is required"
    if isinstance(items, list):
        for index, line in enumerate(items):
            if isinstance(line, Mapping) and not any(
                _filled(line.get(k)) for k in ("name", "p1_id", "product_id")
            ):
                problems[f"payload.items[{index}]"] = "needs one of name, p1_id or product_id"
    return problems


def _filled(value: object) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return value is not None and not isinstance(value, bool)


def build_details(exc: ValidationError) -> dict[str, str]:
    """pydantic errors as field → message, without the values (they may be health data)."""
    details: dict[str, str] = {}
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        # A union (str | int) reports once per member; one entry per field is enough.
        details.setdefault(to_field_path(error["loc"]), _message(error["msg"]))
    return details


def to_field_path(loc: tuple[int | str, ...]) -> str:
    """``("payload", "items", 0, "quantity")`` → ``payload.items[0].quantity``.

    pydantic adds the member type of a union to the location (``int``, ``str``); those are dropped.
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_MEMBERS:
            continue
        else:
            path += f".{part}" if path else part
    return path


_UNION_MEMBERS: Final = frozenset({"int", "str"})


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")
