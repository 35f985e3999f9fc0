"""Tests for gateway.models: the canonical envelope's validation rules and their details."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ValidationFailedError
from gateway.models import parse_envelope, to_field_path
from gateway.normalize import Target, build_envelope, compile_profile

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DROP = object()  # marks a payload field to remove


def valid_payload() -> dict[str, Any]:
    return {
        "shop_id": "shop1",
        "customer_name": "Max Mustermann",
        "items": [{"name": "Flos 22/1", "quantity": 1}],
    }


def order(payload_changes: dict[str, Any] | None = None, **envelope: Any) -> dict[str, Any]:
    """A valid envelope, with payload fields changed (DROP removes one) and envelope fields set."""
    payload = valid_payload()
    for key, value in (payload_changes or {}).items():
        if value is DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    data: dict[str, Any] = {"external_reference": "TM-1", "source": "telemed-one"}
    data["payload"] = payload
    data.update(envelope)
    return data


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationFailedError) as caught:
        parse_envelope(data)
    assert caught.value.http_status == 422
    assert caught.value.details
    return {str(d["field"]): str(d["message"]) for d in caught.value.details}


def line(**fields: Any) -> dict[str, Any]:
    return {"name": "A", "quantity": 1, **fields}


# --- the samples --------------------------------------------------------------------------------


def sample_target(name: str) -> Target:
    if name != "nested-partner.json":
        return Target(partner="telemed-one", shop_id="shop1", org_id="org1", default_source="t1")
    with open(SAMPLES / "nested-partner.profile.toml", "rb") as fh:
        table = tomllib.load(fh)["profiles"]["drx"]
    keep = table.pop("keep_unmapped", False)
    drx = compile_profile("drx", table, keep)
    return Target(partner="drx", shop_id="shop1", org_id="org1", default_source="drx", profile=drx)


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.json")))
def test_every_sample_is_valid_after_normalization(name: str) -> None:
    body = json.loads((SAMPLES / name).read_text())
    data = build_envelope(
        body, sample_target(name), idempotency_key=None, new_reference=lambda: "ref"
    )

    envelope = parse_envelope(data)

    assert envelope.payload.shop_id == "shop1"
    assert envelope.external_reference == data["external_reference"]


def test_unknown_fields_are_kept_on_the_model() -> None:
    envelope = parse_envelope(
        order({"address_city": "Berlin", "items": [line(dosage="1-0-1")]}, extra="x")
    )

    assert envelope.payload.model_extra == {"address_city": "Berlin"}
    assert envelope.model_extra == {"extra": "x"}
    assert envelope.payload.items is not None
    assert envelope.payload.items[0].model_extra == {"dosage": "1-0-1"}


# --- the rules, one at a time -------------------------------------------------------------------

VALID = [
    {},
    {"customer_name": DROP, "customer_email": "max@example.com"},
    {"customer_name": "Max", "customer_email": ""},
    {"customer_name": "Max", "customer_email": None},
    {"items": DROP, "prescription_pdf_url": "https://x.example/rx.pdf"},
    {"items": [], "prescription_pdf_base64": "JVBERi0="},
    {"items": [line(name=None, p1_id="12345")]},
    {"items": [line(name=None, p1_id=12345)]},
    {"items": [line(name=None, product_id="PRD-9")]},
    {"items": [line(quantity=0.5)]},
    {"items": [line(price=0)]},
    {"items": [line(price=8.59)]},
    {"total_amount": 0},
    {"total_amount": 42.99},
    {"cash_on_pickup": True},
    {"cash_on_pickup": False},
]


@pytest.mark.parametrize("changes", VALID)
def test_valid_orders_pass(changes: dict[str, Any]) -> None:
    parse_envelope(order(changes))


INVALID: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    # (payload changes, envelope fields, the field reported)
    ({"customer_name": DROP}, {}, "payload.customer_name"),
    ({"customer_name": ""}, {}, "payload.customer_name"),
    ({"customer_name": "   "}, {}, "payload.customer_name"),
    ({"customer_name": "", "customer_email": ""}, {}, "payload.customer_name"),
    ({"customer_email": "not-an-email"}, {}, "payload.customer_email"),
    ({"customer_email": "max@example"}, {}, "payload.customer_email"),
    ({"customer_email": "max mu@example.com"}, {}, "payload.customer_email"),
    ({"customer_email": "max@@example.com"}, {}, "payload.customer_email"),
    ({"customer_name": 5}, {}, "payload.customer_name"),
    ({"items": DROP}, {}, "payload.items"),
    ({"items": []}, {}, "payload.items"),
    ({"items": [], "prescription_pdf_url": ""}, {}, "payload.items"),
    ({"items": None, "prescription_pdf_base64": "  "}, {}, "payload.items"),
    ({"items": "Flos", "prescription_pdf_url": "https://x.example/rx"}, {}, "payload.items"),
    ({"items": ["Flos"]}, {}, "payload.items[0]"),
    ({"items": [line(quantity=0)]}, {}, "payload.items[0].quantity"),
    ({"items": [line(quantity=-1)]}, {}, "payload.items[0].quantity"),
    ({"items": [{"name": "A"}]}, {}, "payload.items[0].quantity"),
    ({"items": [line(), line(quantity=0)]}, {}, "payload.items[1].quantity"),
    ({"items": [{"quantity": 1}]}, {}, "payload.items[0]"),
    ({"items": [line(name="")]}, {}, "payload.items[0]"),
    ({"items": [line(name=None, p1_id=" ")]}, {}, "payload.items[0]"),
    ({"items": [line(name=None, p1_id=1.5)]}, {}, "payload.items[0].p1_id"),
    ({"items": [line(p1_id=True)]}, {}, "payload.items[0].p1_id"),
    ({"items": [line(price=-0.01)]}, {}, "payload.items[0].price"),
    ({"total_amount": -1}, {}, "payload.total_amount"),
    ({"cash_on_pickup": "yes"}, {}, "payload.cash_on_pickup"),
    ({"cash_on_pickup": 1}, {}, "payload.cash_on_pickup"),
    ({"cash_on_pickup": "true"}, {}, "payload.cash_on_pickup"),
    # strings are refused for numbers (normalization converts the numeric ones before this)
    ({"items": [line(quantity="5")]}, {}, "payload.items[0].quantity"),
    ({"items": [line(price="8.59")]}, {}, "payload.items[0].price"),
    ({"total_amount": "42.99"}, {}, "payload.total_amount"),
    # booleans are refused for numbers
    ({"items": [line(quantity=True)]}, {}, "payload.items[0].quantity"),
    ({"items": [line(price=False)]}, {}, "payload.items[0].price"),
    ({"total_amount": True}, {}, "payload.total_amount"),
    # the envelope
    ({}, {"external_reference": ""}, "external_reference"),
    ({}, {"external_reference": 42}, "external_reference"),
    ({}, {"external_reference": "x" * 201}, "external_reference"),
    ({}, {"source": ""}, "source"),
    ({}, {"source": None}, "source"),
    ({}, {"payload": ["not", "an", "object"]}, "payload"),
    ({"shop_id": DROP}, {}, "payload.shop_id"),
]


@pytest.mark.parametrize(("changes", "envelope", "field"), INVALID)
def test_each_rule_reports_its_field(
    changes: dict[str, Any], envelope: dict[str, Any], field: str
) -> None:
    found = problems(order(changes, **envelope))

    assert list(found) == [field]
    assert found[field]


def test_reference_of_exactly_200_characters_is_accepted() -> None:
    parse_envelope(order(external_reference="x" * 200))


def test_all_problems_are_reported_at_once() -> None:
    data = order(
        {
            "customer_name": DROP,
            "customer_email": "nope",
            "items": [line(quantity=0, price=-1), {"quantity": 2}, line(quantity="x")],
            "total_amount": -5,
            "cash_on_pickup": "no",
        },
        source="",
    )

    assert set(problems(data)) == {
        "source",
        "payload.customer_email",
        "payload.items[0].quantity",
        "payload.items[0].price",
        "payload.items[1]",
        "payload.items[2].quantity",
        "payload.total_amount",
        "payload.cash_on_pickup",
    }


def test_invalid_email_with_no_name_reports_both_problems() -> None:
    assert set(problems(order({"customer_name": DROP, "customer_email": "   "}))) == {
        "payload.customer_name",
        "payload.customer_email",
    }


def test_union_field_is_reported_once() -> None:
    with pytest.raises(ValidationFailedError) as caught:
        parse_envelope(order({"items": [line(p1_id=[1])]}))

    assert caught.value.details is not None
    assert [d["field"] for d in caught.value.details] == ["payload.items[0].p1_id"]


# --- details never echo the input ---------------------------------------------------------------

SECRETS = [
    ({"customer_email": "max.secret@example"}, {}, "max.secret@example"),
    ({"customer_email": "max.secret example.com"}, {}, "max.secret example.com"),
    ({"customer_name": ["Maximilian Geheim"]}, {}, "Maximilian Geheim"),
    ({"items": [line(quantity="drei Stück")]}, {}, "drei Stück"),
    ({"items": [line(name=None, p1_id=["PZN-0815-SECRET"])]}, {}, "PZN-0815-SECRET"),
    ({"cash_on_pickup": "vielleicht"}, {}, "vielleicht"),
    ({}, {"external_reference": "SECRET" * 40}, "SECRETSECRET"),
    ({}, {"payload": "Max Mustermann, Musterstr. 1"}, "Musterstr"),
]


@pytest.mark.parametrize(("changes", "envelope", "value"), SECRETS)
def test_details_never_contain_the_input_values(
    changes: dict[str, Any], envelope: dict[str, Any], value: str
) -> None:
    with pytest.raises(ValidationFailedError) as caught:
        parse_envelope(order(changes, **envelope))

    rendered = json.dumps(caught.value.details, ensure_ascii=False) + caught.value.message
    assert value not in rendered


# --- to_field_path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        ((), ""),
        (("external_reference",), "external_reference"),
        (("payload",), "payload"),
        (("payload", "customer_email"), "payload.customer_email"),
        (("payload", "items", 0), "payload.items[0]"),
        (("payload", "items", 0, "quantity"), "payload.items[0].quantity"),
        (("payload", "items", 12, "price"), "payload.items[12].price"),
        (("payload", "items", 0, "p1_id", "str"), "payload.items[0].p1_id"),
        (("payload", "items", 0, "p1_id", "int"), "payload.items[0].p1_id"),
        (("payload", "items", 0, 1), "payload.items[0][1]"),
    ],
)
def test_to_field_path(loc: tuple[int | str, ...], expected: str) -> None:
    assert to_field_path(loc) == expected
