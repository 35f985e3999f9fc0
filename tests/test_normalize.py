"""Tests for gateway.normalize: partner body (envelope, flat, profiled) → canonical envelope."""

from __future__ import annotations

import copy
import json
import tomllib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError, ShopMismatchError, ValidationFailedError
from gateway.normalize import (
    Profile,
    Target,
    apply_profile,
    build_envelope,
    build_payload,
    compile_profile,
    to_number,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
TARGET = Target(partner="drx", shop_id="shop1", org_id="org1", default_source="drx-source")


def fixed_reference() -> str:
    return "00000000-0000-4000-8000-000000000000"


def envelope(
    body: Mapping[str, object],
    target: Target = TARGET,
    *,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    return build_envelope(
        body, target, idempotency_key=idempotency_key, new_reference=fixed_reference
    )


def profile(fields: Mapping[str, str], *, keep_unmapped: bool = False, name: str = "p") -> Profile:
    return compile_profile(name, fields, keep_unmapped)


def details(exc: pytest.ExceptionInfo[ValidationFailedError]) -> list[Mapping[str, object]]:
    assert exc.value.details is not None
    return list(exc.value.details)


def fields_of(exc: pytest.ExceptionInfo[ValidationFailedError]) -> list[object]:
    return [d["field"] for d in details(exc)]


ITEM = {"name": "Flos 22/1", "quantity": 5, "price": 8.59, "p1_id": "12345"}


# --- shapes -------------------------------------------------------------------------------------


def test_envelope_shape_keeps_reference_source_and_gets_the_shop_injected() -> None:
    body = {
        "external_reference": "TM-1",
        "source": "telemed-one",
        "payload": {"customer_name": "Max", "items": [ITEM]},
    }

    assert envelope(body) == {
        "external_reference": "TM-1",
        "source": "telemed-one",
        "payload": {"shop_id": "shop1", "customer_name": "Max", "items": [ITEM]},
    }


def test_flat_shape_moves_payload_fields_under_payload() -> None:
    body = {
        "external_reference": "TM-1",
        "source": "telemed-one",
        "customer_email": "max@example.com",
        "items": [ITEM],
    }

    assert envelope(body) == {
        "external_reference": "TM-1",
        "source": "telemed-one",
        "payload": {"shop_id": "shop1", "customer_email": "max@example.com", "items": [ITEM]},
    }


def test_unknown_fields_are_forwarded_untouched() -> None:
    unknown = {
        "address_street": "Musterstr. 1",
        "address_zip": "10115",
        "notes": "ring twice",
        "delivery": {"window": ["09:00", "12:00"], "express": True},
    }
    line = {**ITEM, "dosage": "1-0-1"}

    result = envelope({"customer_name": "Max", "items": [line], **unknown})

    assert {k: result["payload"][k] for k in unknown} == unknown
    assert result["payload"]["items"] == [line]


def test_unknown_envelope_level_fields_stay_at_envelope_level() -> None:
    body = {"external_reference": "R", "callback": "x", "payload": {"customer_name": "Max"}}

    result = envelope(body)

    assert result["callback"] == "x"
    assert "callback" not in result["payload"]


def test_payload_that_is_not_an_object_is_passed_on_for_validation() -> None:
    assert envelope({"external_reference": "R", "payload": ["not", "an", "object"]})["payload"] == [
        "not",
        "an",
        "object",
    ]


def test_the_partners_body_is_not_modified() -> None:
    body = {
        "external_reference": "R",
        "shop_id": "shop1",
        "payload": {
            "shop_id": "shop1",
            "org_id": "org1",
            "prescription_url": "https://x.example/a.pdf",
            "items": [{"name": "A", "qty": "2", "price": "1.5"}],
        },
    }
    before = copy.deepcopy(body)

    envelope(body)

    assert body == before


# --- quantities and numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5),
        ("8.59", 8.59),
        (" 3 ", 3),
        ("-2", -2),
        ("0", 0),
        ("5.0", 5.0),
        ("abc", "abc"),
        ("1e3", "1e3"),
        ("", ""),
        ("5,5", "5,5"),
        ("1.", "1."),
        (".5", ".5"),
        ("0x10", "0x10"),
        (5, 5),
        (8.59, 8.59),
        (True, True),
        (None, None),
    ],
)
def test_to_number_converts_only_plain_decimal_strings(value: object, expected: object) -> None:
    result = to_number(value)

    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"name": "A", "qty": 3}, {"name": "A", "quantity": 3}),
        ({"name": "A", "qty": "3"}, {"name": "A", "quantity": 3}),
        ({"name": "A", "qty": 3, "quantity": 3}, {"name": "A", "quantity": 3}),
        ({"name": "A", "qty": "3", "quantity": 3}, {"name": "A", "quantity": 3}),
        ({"name": "A", "qty": 3, "quantity": " 3 "}, {"name": "A", "quantity": 3}),
        (
            {"name": "A", "quantity": "5", "price": "8.59"},
            {"name": "A", "quantity": 5, "price": 8.59},
        ),
        ({"name": "A", "quantity": "abc"}, {"name": "A", "quantity": "abc"}),
        ({"name": "A", "quantity": "1e3"}, {"name": "A", "quantity": "1e3"}),
    ],
)
def test_line_qty_alias_and_numeric_strings(
    line: dict[str, object], expected: dict[str, object]
) -> None:
    payload = build_payload({"items": [line]}, "shop1")

    assert payload["items"] == [expected]
    assert [type(v) for v in payload["items"][0].values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize("index", [0, 2])
def test_qty_and_quantity_that_differ_is_a_validation_error_naming_the_line(index: int) -> None:
    items: list[object] = [{"name": "A", "quantity": 1} for _ in range(3)]
    items[index] = {"name": "A", "qty": "2", "quantity": 3}

    with pytest.raises(ValidationFailedError) as caught:
        envelope({"customer_name": "Max", "items": items})

    assert fields_of(caught) == [f"payload.items[{index}].qty"]


def test_total_amount_numeric_string_becomes_a_number() -> None:
    payload = build_payload({"total_amount": "25.77"}, "shop1")

    assert payload["total_amount"] == 25.77


def test_item_that_is_not_an_object_is_left_for_validation() -> None:
    assert build_payload({"items": ["A", 3]}, "shop1")["items"] == ["A", 3]


# --- prescription_url alias ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload_in",
    [
        {"prescription_url": "https://x.example/rx.pdf"},
        {"prescription_url": "https://x.example/rx.pdf", "prescription_pdf_url": None},
        {
            "prescription_url": "https://x.example/rx.pdf",
            "prescription_pdf_url": "https://x.example/rx.pdf",
        },
    ],
)
def test_prescription_url_is_taken_as_prescription_pdf_url(payload_in: dict[str, object]) -> None:
    payload = build_payload(payload_in, "shop1")

    assert payload["prescription_pdf_url"] == "https://x.example/rx.pdf"
    assert "prescription_url" not in payload


def test_prescription_url_differing_from_prescription_pdf_url_is_a_validation_error() -> None:
    body = {
        "customer_name": "Max",
        "prescription_url": "https://a.example/1.pdf",
        "prescription_pdf_url": "https://b.example/2.pdf",
    }

    with pytest.raises(ValidationFailedError) as caught:
        envelope(body)

    assert fields_of(caught) == ["payload.prescription_url"]
    assert "a.example" not in json.dumps(details(caught))


def test_null_prescription_url_next_to_prescription_pdf_url_is_ignored() -> None:
    payload = build_payload(
        {"prescription_url": None, "prescription_pdf_url": "https://x.example/rx.pdf"}, "shop1"
    )

    assert payload == {"shop_id": "shop1", "prescription_pdf_url": "https://x.example/rx.pdf"}


def test_null_qty_next_to_quantity_is_ignored() -> None:
    payload = build_payload({"items": [{"name": "A", "qty": None, "quantity": 3}]}, "shop1")

    assert payload["items"] == [{"name": "A", "quantity": 3}]


# --- shop_id / org_id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"shop_id": "shop1", "org_id": "org1", "customer_name": "Max"},
        {"shop_id": "shop1", "payload": {"org_id": "org1", "customer_name": "Max"}},
        {"org_id": "org1", "payload": {"shop_id": "shop1", "customer_name": "Max"}},
    ],
    ids=["flat", "envelope-top", "envelope-payload"],
)
def test_matching_shop_and_org_ids_are_removed(body: dict[str, object]) -> None:
    result = envelope(body)

    assert "shop_id" not in result and "org_id" not in result
    assert "org_id" not in result["payload"]
    assert result["payload"]["shop_id"] == "shop1"  # injected from the key's shop


@pytest.mark.parametrize(
    "body",
    [
        {"shop_id": "shop2", "customer_name": "Max"},
        {"org_id": "org2", "customer_name": "Max"},
        {"shop_id": "shop2", "payload": {"customer_name": "Max"}},
        {"org_id": "org2", "payload": {"customer_name": "Max"}},
        {"payload": {"shop_id": "shop2", "customer_name": "Max"}},
        {"payload": {"org_id": "org2", "customer_name": "Max"}},
        {"shop_id": 2, "customer_name": "Max"},
    ],
    ids=[
        "flat-shop",
        "flat-org",
        "envelope-top-shop",
        "envelope-top-org",
        "envelope-payload-shop",
        "envelope-payload-org",
        "number",
    ],
)
def test_differing_shop_or_org_id_is_a_shop_mismatch(body: dict[str, object]) -> None:
    with pytest.raises(ShopMismatchError) as caught:
        envelope(body)

    assert caught.value.http_status == 403
    assert "shop2" not in caught.value.message and "org2" not in caught.value.message


def test_numeric_shop_id_equal_as_text_is_accepted() -> None:
    target = Target(partner="drx", shop_id="17", org_id="4", default_source="drx")

    result = envelope({"shop_id": 17, "org_id": 4, "customer_name": "Max"}, target)

    assert result["payload"]["shop_id"] == "17"
    assert "org_id" not in result["payload"]


# --- source -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"source": "partner-app"}, "partner-app"),
        ({}, "drx-source"),
        ({"source": ""}, "drx-source"),
        ({"source": None}, "drx-source"),
        ({"payload": {}, "source": "env-src"}, "env-src"),
        ({"payload": {}}, "drx-source"),
    ],
)
def test_source_comes_from_the_body_then_the_targets_default(
    body: dict[str, object], expected: str
) -> None:
    result = envelope({"customer_name": "Max", **body})

    assert result["source"] == expected
    assert "source" not in result["payload"]


# --- external_reference -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "idempotency_key", "expected"),
    [
        ({"external_reference": "TM-1"}, None, "TM-1"),
        ({"external_reference": "TM-1"}, "IK-9", "TM-1"),
        ({"external_reference": 42}, None, "42"),
        ({"external_reference": ""}, "IK-9", "IK-9"),
        ({"external_reference": None}, "IK-9", "IK-9"),
        ({}, "IK-9", "IK-9"),
        ({}, None, "drx-00000000-0000-4000-8000-000000000000"),
        ({}, "", "drx-00000000-0000-4000-8000-000000000000"),
        ({"external_reference": ""}, None, "drx-00000000-0000-4000-8000-000000000000"),
    ],
)
def test_external_reference_from_body_then_idempotency_key_then_generated(
    body: dict[str, object], idempotency_key: str | None, expected: str
) -> None:
    result = envelope({"customer_name": "Max", **body}, idempotency_key=idempotency_key)

    assert result["external_reference"] == expected
    assert "external_reference" not in result["payload"]


def test_reference_in_envelope_shape_is_used() -> None:
    result = envelope({"external_reference": 7, "payload": {"customer_name": "Max"}})

    assert result["external_reference"] == "7"


def test_boolean_reference_is_left_for_validation() -> None:
    assert envelope({"external_reference": True})["external_reference"] is True


def test_generated_references_are_unique_per_call() -> None:
    made = {
        build_envelope({}, TARGET, idempotency_key=None, new_reference=lambda: str(uuid.uuid4()))[
            "external_reference"
        ]
        for _ in range(5)
    }

    assert len(made) == 5
    assert all(str(ref).startswith("drx-") for ref in made)


STRICT = Target(
    partner="drx", shop_id="shop1", org_id="org1", default_source="drx", require_reference=True
)


@pytest.mark.parametrize(
    ("body", "idempotency_key"),
    [({}, None), ({"external_reference": ""}, None), ({}, ""), ({"external_reference": None}, "")],
)
def test_missing_reference_is_a_validation_error_when_required(
    body: dict[str, object], idempotency_key: str | None
) -> None:
    with pytest.raises(ValidationFailedError) as caught:
        envelope({"customer_name": "Max", **body}, STRICT, idempotency_key=idempotency_key)

    assert fields_of(caught) == ["external_reference"]


@pytest.mark.parametrize(
    ("body", "idempotency_key", "expected"),
    [({"external_reference": "R-1"}, None, "R-1"), ({}, "IK-1", "IK-1")],
)
def test_required_reference_is_satisfied_by_body_or_idempotency_key(
    body: dict[str, object], idempotency_key: str | None, expected: str
) -> None:
    result = envelope(body, STRICT, idempotency_key=idempotency_key)

    assert result["external_reference"] == expected


# --- profiles: compile --------------------------------------------------------------------------


@pytest.mark.parametrize("expression", ["patient.[", "join(", "a ||", "", "lines[?"])
def test_expression_that_does_not_parse_is_a_config_error_naming_profile_and_field(
    expression: str,
) -> None:
    with pytest.raises(ConfigError, match=r"profiles\.drx\.customer_name"):
        compile_profile("drx", {"external_reference": "id", "customer_name": expression}, False)


@pytest.mark.parametrize("expression", ["jion(' ', [a, b])", "join(a)"])
def test_expression_with_unknown_function_or_wrong_arity_is_a_config_error(
    expression: str,
) -> None:
    with pytest.raises(ConfigError, match=r"profiles\.drx\.customer_name"):
        compile_profile("drx", {"customer_name": expression}, False)


# --- profiles: apply ----------------------------------------------------------------------------


def test_profile_result_that_is_null_is_left_out() -> None:
    mapped = apply_profile(
        {"order_no": "A-1"},
        profile({"external_reference": "order_no", "prescription_pdf_url": "rx.pdf"}),
    )

    assert mapped == {"external_reference": "A-1"}


def test_profile_without_keep_unmapped_copies_only_mapped_fields() -> None:
    body = {"order_no": "A-1", "patient": {"email": "m@example.com"}, "notes": "x"}

    mapped = apply_profile(
        body, profile({"external_reference": "order_no", "customer_email": "patient.email"})
    )

    assert mapped == {"external_reference": "A-1", "customer_email": "m@example.com"}


def test_keep_unmapped_copies_the_body_keys_no_expression_reads() -> None:
    body = {
        "order_no": "A-1",
        "patient": {"email": "m@example.com"},
        "lines": [{"title": "A", "count": 1}],
        "created": "2026-11-20",
        "notes": {"text": "ring twice"},
    }
    fields = {
        "external_reference": "order_no",
        "customer_email": "patient.email",
        "items": "lines[].{name: title, quantity: count}",
    }

    mapped = apply_profile(body, profile(fields, keep_unmapped=True))

    assert mapped == {
        "external_reference": "A-1",
        "customer_email": "m@example.com",
        "items": [{"name": "A", "quantity": 1}],
        "created": "2026-11-20",
        "notes": {"text": "ring twice"},
    }


def test_keep_unmapped_copies_a_top_level_key_named_like_a_nested_one() -> None:
    body = {"patient": {"email": "m@example.com"}, "email": "billing@example.com", "title": "Dr"}
    fields = {"customer_email": "patient.email", "items": "lines[].{name: title}"}

    mapped = apply_profile(body, profile(fields, keep_unmapped=True))

    assert mapped == {
        "customer_email": "m@example.com",
        "email": "billing@example.com",
        "title": "Dr",
    }


@pytest.mark.parametrize(
    ("expression", "body"),
    [
        (
            "join(' ', [patient.first_name, patient.last_name])",
            {"patient": {"first_name": "Maximiliane"}},
        ),
        ("length(patient.first_name)", {"patient": {"first_name": 1234567}}),
        ("sum(patient.first_name)", {"patient": {"first_name": ["Maximiliane"]}}),
    ],
    ids=["join-null", "length-number", "sum-strings"],
)
def test_expression_that_fails_on_a_body_is_a_validation_error_without_its_values(
    expression: str, body: dict[str, object]
) -> None:
    drx = profile({"customer_name": expression}, name="drx")

    with pytest.raises(ValidationFailedError) as caught:
        apply_profile(body, drx)

    assert fields_of(caught) == ["customer_name"]
    rendered = caught.value.message + json.dumps(details(caught))
    assert "Maximiliane" not in rendered and "1234567" not in rendered
    assert "drx" in rendered


def test_every_failing_expression_is_reported() -> None:
    fields = {"customer_name": "join(' ', [a, b])", "customer_email": "length(n)"}

    with pytest.raises(ValidationFailedError) as caught:
        apply_profile({"a": "x", "n": 5}, profile(fields))

    assert sorted(map(str, fields_of(caught))) == ["customer_email", "customer_name"]


# --- profiles: whole envelopes ------------------------------------------------------------------


def load_sample_profile() -> Profile:
    with open(SAMPLES / "nested-partner.profile.toml", "rb") as fh:
        table = tomllib.load(fh)["profiles"]["drx"]
    keep = table.pop("keep_unmapped", False)
    return compile_profile("drx", table, keep)


def test_nested_partner_sample_becomes_the_expected_envelope() -> None:
    body = json.loads((SAMPLES / "nested-partner.json").read_text())
    target = Target(
        partner="drx",
        shop_id="shop1",
        org_id="org1",
        default_source="drx",
        profile=load_sample_profile(),
    )

    result = envelope(body, target)

    assert result == {
        "external_reference": "DRX-2026-000815",
        "source": "drx",
        "payload": {
            "shop_id": "shop1",
            "customer_name": "Max Mustermann",
            "customer_email": "max@example.com",
            "address_street": "Musterstr. 1",
            "address_zip": "10115",
            "address_city": "Berlin",
            "items": [
                {"name": "Flos 22/1", "quantity": 5, "p1_id": "12345", "price": 8.59},
                {"name": "Extrakt 25", "quantity": 1, "p1_id": "67890", "price": 49.0},
            ],
            "prescription_pdf_url": "https://drx.example/rx/815.pdf",
        },
    }


def test_new_partner_shape_is_mapped_by_a_profile() -> None:
    # A shape none of the samples has: camelCase, numeric order id, basket with string amounts,
    # the channel as source, a nested note, no prescription.
    body = {
        "orderId": 4711,
        "channel": "app-ios",
        "buyer": {"fullName": "Erika Beispiel", "contact": {"mail": "erika@example.org"}},
        "basket": {
            "positions": [
                {"pzn": "0815", "amount": "2", "label": "Tropfen", "unitPrice": "3.10"},
                {"sku": "SKU-1", "amount": 1, "label": "Tee"},
            ],
            "sum": "7.20",
        },
        "meta": {"note": "bitte klingeln"},
        "tracking": "ignored",
    }
    fields = {
        "external_reference": "orderId",
        "source": "channel",
        "customer_name": "buyer.fullName",
        "customer_email": "buyer.contact.mail",
        "items": "basket.positions[].{p1_id: pzn, product_id: sku, name: label, "
        "quantity: amount, price: unitPrice}",
        "total_amount": "basket.sum",
        "notes": "meta.note",
        "prescription_pdf_url": "rx.url",
    }
    target = Target(
        partner="vivi",
        shop_id="shop9",
        org_id="org9",
        default_source="vivi",
        profile=compile_profile("vivi", fields, False),
    )

    result = envelope(body, target)

    assert result == {
        "external_reference": "4711",
        "source": "app-ios",
        "payload": {
            "shop_id": "shop9",
            "customer_name": "Erika Beispiel",
            "customer_email": "erika@example.org",
            # Null results are left out inside mapped lines too: no "product_id": null.
            "items": [
                {"p1_id": "0815", "name": "Tropfen", "quantity": 2, "price": 3.1},
                {"product_id": "SKU-1", "name": "Tee", "quantity": 1},
            ],
            "total_amount": 7.2,
            "notes": "bitte klingeln",
        },
    }
