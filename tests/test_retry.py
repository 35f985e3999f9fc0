"""Tests for gateway.retry: status classes, backoff with jitter, Retry-After in and out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from gateway.retry import (
    Outcome,
    backoff_delay,
    classify_status,
    parse_retry_after,
    to_retry_after_header,
)

NOW = datetime(2026, 11, 20, 9, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (201, Outcome.SUCCESS),
        (204, Outcome.SUCCESS),
        (400, Outcome.REJECTED),
        (401, Outcome.AUTH),
        (403, Outcome.AUTH),
        (404, Outcome.REJECTED),
        (405, Outcome.REJECTED),
        (409, Outcome.REJECTED),
        (413, Outcome.REJECTED),
        (422, Outcome.REJECTED),
        (429, Outcome.RETRY),
        (500, Outcome.FAILED),
        (501, Outcome.FAILED),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (505, Outcome.FAILED),
        (302, Outcome.FAILED),
        (304, Outcome.FAILED),
        (100, Outcome.FAILED),
    ],
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


# --- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.6), (4, 2.0), (5, 2.0), (10, 2.0)],
)
def test_backoff_upper_bound_doubles_and_is_capped(attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, lambda: 1.0) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [0, 1, 3, 10])
def test_backoff_with_zero_jitter_is_zero(attempt: int) -> None:
    assert backoff_delay(attempt, lambda: 0.0) == 0.0


def test_backoff_jitter_scales_the_bound() -> None:
    assert backoff_delay(2, lambda: 0.5) == pytest.approx(0.4)


def test_backoff_grows_with_the_attempt_until_the_cap() -> None:
    delays = [backoff_delay(a, lambda: 1.0) for a in range(8)]

    assert delays == sorted(delays)
    assert max(delays) == pytest.approx(2.0)
    assert delays[0] < delays[1] < delays[2] < delays[3]


def test_backoff_custom_base_and_cap() -> None:
    assert backoff_delay(0, lambda: 1.0, base_s=1.0, cap_s=5.0) == pytest.approx(1.0)
    assert backoff_delay(2, lambda: 1.0, base_s=1.0, cap_s=5.0) == pytest.approx(4.0)
    assert backoff_delay(3, lambda: 1.0, base_s=1.0, cap_s=5.0) == pytest.approx(5.0)


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.999, 1.0])
@pytest.mark.parametrize("attempt", [0, 1, 2, 6])
def test_backoff_stays_within_zero_and_the_bound(rand: float, attempt: int) -> None:
    delay = backoff_delay(attempt, lambda: rand)

    assert 0.0 <= delay <= min(2.0, 0.2 * 2**attempt) + 1e-12


# --- Retry-After in -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        (format_datetime(datetime(2026, 11, 20, 9, 0, 30, tzinfo=UTC), usegmt=True), 30.0),
        ("Fri, 20 Nov 2026 09:02:00 GMT", 120.0),
        ("Fri, 20 Nov 2026 08:59:00 GMT", 0.0),  # in the past: no wait
        ("Fri, 20 Nov 2026 10:00:00 +0100", 0.0),  # the same instant as NOW
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(expected)


def test_parse_retry_after_date_is_relative_to_the_given_now() -> None:
    value = "Fri, 20 Nov 2026 09:01:00 GMT"

    assert parse_retry_after(value, NOW) == pytest.approx(60.0)
    assert parse_retry_after(value, NOW + 45) == pytest.approx(15.0)


@pytest.fixture
def berlin_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's local time zone is not UTC (restored afterwards)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    assert time.localtime(NOW).tm_gmtoff == 3600
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("berlin_local_time")
@pytest.mark.parametrize(
    "value",
    [
        "Fri, 20 Nov 2026 09:01:00",
        "Fri, 20 Nov 2026 09:01:00 -0000",
        "Fri, 20 Nov 2026 09:01:00 GMT",
    ],
)
def test_retry_after_date_without_a_zone_is_gmt_not_local_time(value: str) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(60.0)


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "-5", "1.5", "5s", "Fri, 99 Nov 2026 09:00:00 GMT"]
)
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", ["²", "1²"])
def test_parse_retry_after_non_ascii_digits_are_garbage(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


# --- Retry-After out ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, 1),
        (0, 1),
        (0.0, 1),
        (-3, 1),
        (0.2, 1),
        (1, 1),
        (1.01, 2),
        (2.5, 3),
        (30, 30),
        (59.999, 60),
    ],
)
def test_to_retry_after_header_rounds_up_to_at_least_one(
    seconds: float | None, expected: int
) -> None:
    result = to_retry_after_header(seconds)

    assert result == expected
    assert isinstance(result, int)
