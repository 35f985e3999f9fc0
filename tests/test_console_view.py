"""The console's view model and its access decisions, as plain functions (no loop, no socket)."""

from __future__ import annotations

import pytest

from gateway.console.access import (
    SESSION_MAX_AGE_S,
    build_csrf,
    build_session,
    is_operator_token,
    is_valid_csrf,
    is_valid_session,
)
from gateway.console.page import PageRenderer, build_csp
from gateway.console.view import (
    ConsoleFacts,
    OutboxFacts,
    TokenFact,
    build_manager_items,
    build_page,
    build_token_item,
    to_duration_text,
    to_notice,
)
from gateway.observability import RequestLog, RequestRecord, UpstreamHealth, log_context
from gateway.outbox import LedgerEntry, OrderStatus, OutboxStats

NOW = 1_800_000_000.0
TOKEN = "operator-console-token-0123456789"


def facts(**changes: object) -> ConsoleFacts:
    base: dict[str, object] = {
        "version": "0.1.0",
        "config_digest": "abcdef0123456789",
        "created_at": NOW - 3725,
        "pid": 4242,
        "worker": False,
        "backend": "memory",
        "state_ok": True,
        "upstream": UpstreamHealth(),
        "tokens": (),
        "outbox_enabled": False,
        "outbox": None,
        "requests": (),
    }
    base.update(changes)
    return ConsoleFacts(**base)  # type: ignore[arg-type]


def entry(reference: str, status: OrderStatus, **changes: object) -> LedgerEntry:
    base: dict[str, object] = {
        "partner": "acme",
        "reference": reference,
        "org_id": "org",
        "status": status,
        "attempts": 3,
        "created_at": NOW - 7200,
        "updated_at": NOW - 60,
        "last_error": "upstream_unavailable",
    }
    base.update(changes)
    return LedgerEntry(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-5, "0 s"), (0, "0 s"), (59.9, "59 s"), (60, "1 min"), (3599, "59 min"),
     (3600, "1 h 0 min"), (3725, "1 h 2 min"), (86400 + 7200, "1 d 2 h")],
)  # fmt: skip
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert to_duration_text(seconds) == text


def test_the_process_section_tells_version_digest_uptime_pid_and_state() -> None:
    page = build_page(facts(state_ok=False, backend="redis"), NOW)
    values = {item.label: (item.value, item.tone) for item in page.process}
    assert values["version"] == ("0.1.0", "")
    assert values["configuration"] == ("abcdef0123456789", "")
    assert values["uptime"] == ("1 h 2 min", "")
    assert values["process"] == ("pid 4242", "")
    assert values["state backend"] == ("redis: unreachable", "bad")
    assert page.answered_by == "pid 4242"


def test_a_worker_says_which_worker_answered() -> None:
    page = build_page(facts(worker=True), NOW)
    assert page.answered_by == "worker pid 4242"
    assert "one of several workers" in dict((i.label, i.value) for i in page.process)["process"]


def test_manager_with_no_calls_yet() -> None:
    success, failure = build_manager_items(UpstreamHealth(), NOW)
    assert (success.value, failure.value) == ("none yet", "none")


def test_a_failure_after_the_last_success_is_flagged() -> None:
    health = UpstreamHealth(NOW - 120, NOW - 30, "503")
    success, failure = build_manager_items(health, NOW)
    assert success.tone == "warn" and "(2 min ago)" in success.value
    assert failure.tone == "bad" and failure.value.endswith("(30 s ago): HTTP 503")


@pytest.mark.parametrize(
    ("status", "text"),
    [("error", "no answer (connection error)"), ("timeout", "no answer in time (timeout)")],
)
def test_failures_without_an_answer_are_named(status: str, text: str) -> None:
    _, failure = build_manager_items(UpstreamHealth(NOW - 300, NOW - 400, status), NOW)
    assert failure.value.endswith(text) and failure.tone == ""  # a success came since


@pytest.mark.parametrize(
    ("status", "success", "failure"),
    [("200", True, False), ("201", True, False), ("503", False, True), ("500", False, True),
     ("429", False, True), ("401", False, True), ("error", False, True), ("timeout", False, True),
     ("422", False, False), ("409", False, False), ("400", False, False)],
)  # fmt: skip
def test_upstream_health_counts_only_managers_own_trouble_as_failure(
    status: str, success: bool, failure: bool
) -> None:
    health = UpstreamHealth()
    health.record(status, NOW)
    assert (health.last_success_at == NOW) is success
    assert (health.last_failure_at == NOW) is failure
    assert health.last_failure == (status if failure else None)


@pytest.mark.parametrize(
    ("token", "text", "tone"),
    [
        (TokenFact("org", ("main",), "v1", None), "v1: the org key on every call, no token", ""),
        (TokenFact("org", ("main",), "v2", None), "no token cached", ""),
        (TokenFact("org", ("a", "b"), "v2", NOW + 1800), "token cached, expires in 30 min", "ok"),
        (TokenFact("org", ("main",), "v2", NOW - 1), "cached token expired", "warn"),
    ],
)
def test_each_orgs_token_is_told_by_its_expiry(token: TokenFact, text: str, tone: str) -> None:
    item = build_token_item(token, NOW)
    assert text in item.value and item.tone == tone
    assert item.label.startswith("org (")


def test_the_outbox_section_counts_every_status_and_the_oldest_age() -> None:
    stats = OutboxStats(
        queued=2, failed=1, oldest_queued_at=NOW - 600,
        by_status={"queued": 2, "failed": 1, "delivered": 7},
    )  # fmt: skip
    outbox = OutboxFacts(
        stats,
        failed=[entry("TM-F", OrderStatus.FAILED)],
        latest=[entry("TM-D", OrderStatus.DELIVERED, last_error=None)],
    )
    page = build_page(facts(outbox_enabled=True, outbox=outbox), NOW)
    values = {item.label: (item.value, item.tone) for item in page.outbox}
    assert values == {
        "queued": ("2", ""), "delivered": ("7", ""), "rejected": ("0", ""),
        "failed": ("1", "bad"), "dropped": ("0", ""), "oldest queued": ("10 min", ""),
    }  # fmt: skip
    (failed,) = page.failed
    assert (failed.reference, failed.partner, failed.status) == ("TM-F", "acme", "failed")
    assert (failed.attempts, failed.last_error, failed.age) == (
        3,
        "upstream_unavailable",
        "2 h 0 min",
    )
    assert page.latest[0].last_error == ""


def test_an_outbox_that_cannot_be_read_or_is_off_says_so() -> None:
    unreadable = build_page(facts(outbox_enabled=True, outbox=None), NOW)
    assert unreadable.outbox[0].tone == "bad" and unreadable.failed == ()
    off = build_page(facts(), NOW)
    assert "off" in off.outbox[0].value


def test_request_rows_carry_the_log_fields() -> None:
    record = RequestRecord(
        at=NOW, method="POST", path="/api/v1/external-order", status=502, duration_ms=12.345,
        partner="acme", code="upstream_unavailable", reference="TM-1", request_id="rid",
    )  # fmt: skip
    (row,) = build_page(facts(requests=[record]), NOW).requests
    assert (row.time, row.partner, row.status, row.tone) == ("08:00:00", "acme", 502, "bad")
    assert (row.code, row.duration, row.reference, row.request_id) == (
        "upstream_unavailable", "12.3 ms", "TM-1", "rid",
    )  # fmt: skip


def test_notices_are_a_fixed_set_nothing_is_echoed() -> None:
    assert to_notice("retried") is not None
    assert to_notice("<b>hello</b>") is None
    assert to_notice(None) is None


def test_the_request_log_keeps_the_last_requests_with_the_bound_fields() -> None:
    log = RequestLog(size=3, clock=lambda: NOW)
    for number in range(5):
        with log_context(request_id=f"r{number}", partner="acme", external_reference=f"T{number}"):
            log.write(method="POST", path="/p", status=200, duration_ms=1.0)
    with log_context(request_id="r5", code="unauthorized"):
        log.write(method="POST", path="/p", status=401, duration_ms=0.5)
    recent = log.recent()
    assert [r.request_id for r in recent] == ["r5", "r4", "r3"]
    assert (recent[0].partner, recent[0].code, recent[0].reference) == (None, "unauthorized", None)
    assert (recent[1].partner, recent[1].reference, recent[1].at) == ("acme", "T4", NOW)


# --- access -------------------------------------------------------------------------------------


def test_a_session_is_valid_for_its_token_until_it_expires() -> None:
    session = build_session(TOKEN, NOW, "ab12")
    assert TOKEN not in session
    assert is_valid_session(session, TOKEN, NOW)
    assert is_valid_session(session, TOKEN, NOW + SESSION_MAX_AGE_S - 1)
    assert not is_valid_session(session, TOKEN, NOW + SESSION_MAX_AGE_S)
    assert not is_valid_session(session, TOKEN, NOW - 3600)  # issued in the future
    assert not is_valid_session(session, TOKEN + "-rotated", NOW)


@pytest.mark.parametrize(
    "value", [None, "", "x", "1.2", "a.b.c", "1800000000.ab12.", "1800000000.ab-12.00", "1.é.ff"]
)
def test_malformed_sessions_are_refused(value: str | None) -> None:
    assert not is_valid_session(value, TOKEN, NOW)


def test_a_tampered_session_is_refused() -> None:
    issued, nonce, mac = build_session(TOKEN, NOW, "ab12").split(".")
    assert not is_valid_session(f"{int(issued) + 1}.{nonce}.{mac}", TOKEN, NOW)
    assert not is_valid_session(f"{issued}.ab13.{mac}", TOKEN, NOW)


def test_csrf_tokens_are_bound_to_the_session() -> None:
    one, two = build_session(TOKEN, NOW, "aa"), build_session(TOKEN, NOW, "bb")
    csrf = build_csrf(TOKEN, one)
    assert is_valid_csrf(csrf, TOKEN, one)
    assert not is_valid_csrf(csrf, TOKEN, two)
    assert not is_valid_csrf(None, TOKEN, one)
    assert not is_valid_csrf("é", TOKEN, one)


def test_the_operator_token_is_compared_whole() -> None:
    assert is_operator_token(f" {TOKEN}\n", TOKEN)
    assert not is_operator_token(TOKEN[:-1], TOKEN)
    assert not is_operator_token("", TOKEN)


def test_the_csp_allows_exactly_the_pages_own_stylesheet() -> None:
    renderer = PageRenderer()
    csp = renderer.headers["Content-Security-Policy"]
    html = renderer.render_login(notice=None)
    css = html.split("<style>", 1)[1].split("</style>", 1)[0]
    assert csp == build_csp(css)
    assert build_csp(css + " ") != csp
