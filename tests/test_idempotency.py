"""Tests of the pure idempotency decisions: store keys, body fingerprints, claim → replay."""

from __future__ import annotations

import json
import re

import pytest

from gateway.errors import IdempotencyConflictError, RequestInProgressError
from gateway.idempotency import KEY_PREFIX, build_fingerprint, build_key, to_replay
from gateway.state import Claim, ClaimStatus, StoredReply

REPLY = StoredReply(200, b'{"id": "r-1", "status": "pending"}', "application/json")


def envelope(**payload: object) -> dict[str, object]:
    base: dict[str, object] = {
        "shop_id": "demo-shop",
        "customer_name": "Max Mustermann",
        "items": [{"name": "Ibuprofen 400", "quantity": 2, "price": 4.5}],
    }
    base.update(payload)
    return {"external_reference": "POS-123", "source": "drx", "payload": base}


# build_key


def test_build_key_is_deterministic() -> None:
    assert build_key("drx", "POS-123") == build_key("drx", "POS-123")


def test_build_key_is_scoped_by_partner() -> None:
    assert build_key("drx", "POS-123") != build_key("telemed-one", "POS-123")


def test_build_key_differs_by_reference() -> None:
    assert build_key("drx", "POS-123") != build_key("drx", "POS-124")


def test_build_key_names_the_partner_and_hashes_the_reference() -> None:
    key = build_key("drx", "POS-123")
    prefix, partner, digest = key.split(":")
    assert (prefix, partner) == (KEY_PREFIX, "drx")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


@pytest.mark.parametrize(
    "reference",
    ["POS-123", "max.mustermann@example.com", "Müller Berlin 10115", "a:b:c", "x" * 500],
)
def test_build_key_does_not_contain_the_raw_reference(reference: str) -> None:
    key = build_key("drx", reference)
    assert reference not in key
    assert len(key) == len(f"{KEY_PREFIX}:drx:") + 64  # bounded, whatever the reference's size


def test_build_key_partner_and_reference_do_not_run_together() -> None:
    # ("ab", "c") and ("a", "bc") would collide if the two were simply concatenated.
    assert build_key("ab", "c").split(":")[2] != build_key("a", "bc").split(":")[2]


# build_fingerprint


def test_fingerprint_is_sha256_hex() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", build_fingerprint(envelope()))


def test_fingerprint_ignores_key_insertion_order() -> None:
    first = {"external_reference": "R", "source": "s", "payload": {"a": 1, "b": {"x": 1, "y": 2}}}
    second = {"payload": {"b": {"y": 2, "x": 1}, "a": 1}, "source": "s", "external_reference": "R"}
    assert list(first) != list(second)
    assert build_fingerprint(first) == build_fingerprint(second)


def test_fingerprint_ignores_json_whitespace() -> None:
    compact = json.loads('{"external_reference":"R","payload":{"items":[{"quantity":1}]}}')
    spaced = json.loads(
        '{\n  "payload" : { "items" : [ { "quantity" : 1 } ] },\n  "external_reference" : "R"\n}'
    )
    assert build_fingerprint(compact) == build_fingerprint(spaced)


@pytest.mark.parametrize(
    "changed",
    [
        envelope(customer_name="Erika Mustermann"),
        envelope(items=[{"name": "Ibuprofen 400", "quantity": 3, "price": 4.5}]),
        envelope(note="ring twice"),
        envelope(prescription_pdf_url="https://docs.example/rx-1.pdf"),
        {**envelope(), "source": "other"},
        {**envelope(), "external_reference": "POS-124"},
    ],
    ids=["value", "nested-value", "added-field", "added-url", "source", "reference"],
)
def test_fingerprint_changes_with_the_body(changed: dict[str, object]) -> None:
    assert build_fingerprint(changed) != build_fingerprint(envelope())


def test_fingerprint_counts_the_pdf_url_not_its_bytes() -> None:
    one = envelope(prescription_pdf_url="https://docs.example/rx-1.pdf")
    other = envelope(prescription_pdf_url="https://docs.example/rx-2.pdf")
    assert build_fingerprint(one) == build_fingerprint(
        envelope(prescription_pdf_url="https://docs.example/rx-1.pdf")
    )
    assert build_fingerprint(one) != build_fingerprint(other)


def test_fingerprint_keeps_list_order() -> None:
    a = {"name": "A", "quantity": 1}
    b = {"name": "B", "quantity": 1}
    assert build_fingerprint(envelope(items=[a, b])) != build_fingerprint(envelope(items=[b, a]))


def test_fingerprint_handles_non_ascii() -> None:
    assert build_fingerprint(envelope(customer_name="Jürgen Müßig")) != build_fingerprint(
        envelope(customer_name="Jurgen Mussig")
    )


# to_replay


def test_to_replay_new_means_the_caller_owns_the_order() -> None:
    assert to_replay(Claim(ClaimStatus.NEW)) is None


def test_to_replay_replay_returns_the_stored_reply() -> None:
    assert to_replay(Claim(ClaimStatus.REPLAY, REPLY)) is REPLY


def test_to_replay_conflict_raises_409_idempotency_conflict() -> None:
    with pytest.raises(IdempotencyConflictError) as caught:
        to_replay(Claim(ClaimStatus.CONFLICT))
    assert (caught.value.http_status, caught.value.code) == (409, "idempotency_conflict")


def test_to_replay_in_progress_raises_409_request_in_progress() -> None:
    with pytest.raises(RequestInProgressError) as caught:
        to_replay(Claim(ClaimStatus.IN_PROGRESS))
    assert (caught.value.http_status, caught.value.code) == (409, "request_in_progress")


def test_to_replay_covers_every_status() -> None:
    outcomes: dict[ClaimStatus, object] = {}
    for status in ClaimStatus:
        try:
            outcomes[status] = to_replay(
                Claim(status, REPLY if status is ClaimStatus.REPLAY else None)
            )
        except (IdempotencyConflictError, RequestInProgressError) as exc:
            outcomes[status] = type(exc)
    assert outcomes == {
        ClaimStatus.NEW: None,
        ClaimStatus.IN_PROGRESS: RequestInProgressError,
        ClaimStatus.REPLAY: REPLY,
        ClaimStatus.CONFLICT: IdempotencyConflictError,
    }
