"""The operator console through real HTTP: access, CSRF, actions, headers, escaping, and what the
page tells (Manager, tokens, the outbox, the partner requests of this process)."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import pytest
from aiohttp import web
from conftest import (
    ADMIN_TOKEN,
    KEYS,
    ConsoleHarness,
    FakeTime,
    MakeConsole,
    MakeGateway,
    assert_error,
    flat_order,
    post_order,
    read_reply,
)

from gateway.auth import hash_key
from gateway.console.access import SESSION_COOKIE
from gateway.observability import RECENT_REQUESTS
from gateway.outbox import OrderStatus
from gateway.sandbox import DEMO_ORG_KEY, Fault, SandboxState

CSRF_FIELD = re.compile(r'name="csrf" value="([0-9a-f]+)"')
ACTIONS = ("/console/outbox/retry", "/console/outbox/drop")


async def get_page(harness: ConsoleHarness) -> tuple[int, str, dict[str, str]]:
    async with harness.admin.get("/") as response:
        return response.status, await response.text(), dict(response.headers)


async def csrf_of(harness: ConsoleHarness) -> str:
    _, html, _ = await get_page(harness)
    found = CSRF_FIELD.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def queue_order(
    harness: ConsoleHarness, sandbox_state: SandboxState, reference: str, **fields: object
) -> None:
    """An order Manager cannot take now (503): stored and answered 202 queued."""
    sandbox_state.faults.append(Fault(503))
    reply = await post_order(harness.partner, flat_order(external_reference=reference, **fields))
    assert reply.status == 202, reply.body


async def fail_order(
    harness: ConsoleHarness, sandbox_state: SandboxState, fake_time: FakeTime, reference: str
) -> None:
    """An order given up by the deliverer (older than max_age_hours): status failed."""
    await queue_order(harness, sandbox_state, reference)
    fake_time.now += 2 * 3600
    await harness.deliver()
    assert harness.gateway.outbox is not None
    entry = await harness.gateway.outbox.store.get("acme", reference)
    assert entry is not None and entry.status is OrderStatus.FAILED
    assert entry.last_error == "upstream_unavailable"  # kept when the order is given up


async def post_action(
    harness: ConsoleHarness, path: str, reference: str, csrf: str | None, partner: str = "acme"
) -> web.StreamResponse:
    data = {"partner": partner, "external_reference": reference}
    if csrf is not None:
        data["csrf"] = csrf
    async with harness.admin.post(path, data=data, allow_redirects=False) as response:
        await response.read()
        return response


# --- access -------------------------------------------------------------------------------------


async def test_with_a_token_the_console_shows_only_a_login_form_before_login(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-HIDDEN")
    status, html, _ = await get_page(harness)
    assert status == 200
    assert 'action="/console/login"' in html and 'type="password"' in html
    assert "TM-HIDDEN" not in html and "acme" not in html and "pid" not in html


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(
    make_console: MakeConsole,
) -> None:
    harness = await make_console()
    async with harness.admin.post(
        "/console/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/"
        raw = response.headers["Set-Cookie"]
    cookie = SimpleCookie(raw)[SESSION_COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert ADMIN_TOKEN not in raw and hash_key(ADMIN_TOKEN) not in raw
    status, html, _ = await get_page(harness)
    assert status == 200 and "Failed orders" in html and 'action="/console/logout"' in html


async def test_a_wrong_token_is_refused_and_no_cookie_is_set(make_console: MakeConsole) -> None:
    harness = await make_console()
    async with harness.admin.post(
        "/console/login", data={"token": ADMIN_TOKEN + "x"}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/?notice=login_failed"
        assert "Set-Cookie" not in response.headers
    async with harness.admin.get("/?notice=login_failed") as page:
        html = await page.text()
    assert "That token was not accepted." in html and "Failed orders" not in html


async def test_a_forged_or_expired_session_cookie_shows_the_login_form(
    make_console: MakeConsole, fake_time: FakeTime
) -> None:
    harness = await make_console()
    harness.admin.session.cookie_jar.update_cookies({SESSION_COOKIE: "1700000000.abc.deadbeef"})
    _, html, _ = await get_page(harness)
    assert 'action="/console/login"' in html
    await harness.log_in()
    _, html, _ = await get_page(harness)
    assert "Failed orders" in html
    fake_time.now += 13 * 3600  # sessions last 12 hours
    _, html, _ = await get_page(harness)
    assert 'action="/console/login"' in html


async def test_logout_clears_the_session(make_console: MakeConsole) -> None:
    harness = await make_console()
    await harness.log_in()
    csrf = await csrf_of(harness)
    async with harness.admin.post(
        "/console/logout", data={"csrf": csrf}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/?notice=logged_out"
    async with harness.admin.get("/?notice=logged_out") as page:
        html = await page.text()
    assert 'action="/console/login"' in html and "Logged out." in html


@pytest.mark.parametrize("path", ACTIONS)
async def test_actions_without_a_session_are_forbidden(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime, path: str
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-1")
    async with harness.admin.post(
        path, data={"partner": "acme", "external_reference": "TM-1"}
    ) as response:
        assert_error(await read_reply(response), 403, "forbidden")
    assert harness.gateway.outbox is not None
    entry = await harness.gateway.outbox.store.get("acme", "TM-1")
    assert entry is not None and entry.status is OrderStatus.FAILED


@pytest.mark.parametrize("path", ACTIONS)
@pytest.mark.parametrize("csrf", [None, "", "0" * 64])
async def test_actions_without_the_sessions_csrf_token_are_forbidden(
    make_console: MakeConsole,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
    path: str,
    csrf: str | None,
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-1")
    await harness.log_in()
    response = await post_action(harness, path, "TM-1", csrf)
    assert response.status == 403
    assert harness.gateway.outbox is not None
    entry = await harness.gateway.outbox.store.get("acme", "TM-1")
    assert entry is not None and entry.status is OrderStatus.FAILED


async def test_a_csrf_token_of_another_session_is_forbidden(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-1")
    await harness.log_in()
    old_csrf = await csrf_of(harness)
    fake_time.now += 5  # a new login issues another session
    await harness.log_in()
    response = await post_action(harness, "/console/outbox/drop", "TM-1", old_csrf)
    assert response.status == 403


@pytest.mark.parametrize("path", [*ACTIONS, "/console/login", "/console/logout"])
async def test_without_a_token_the_console_is_read_only_and_actions_are_forbidden(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime, path: str
) -> None:
    harness = await make_console(token=False)
    await fail_order(harness, sandbox_state, fake_time, "TM-1")
    status, html, _ = await get_page(harness)
    assert status == 200 and "TM-1" in html and "Read-only" in html
    assert "<form" not in html
    async with harness.admin.post(
        path, data={"partner": "acme", "external_reference": "TM-1", "token": ADMIN_TOKEN}
    ) as response:
        assert_error(await read_reply(response), 403, "forbidden")


async def test_probes_and_metrics_stay_open_with_a_token(make_console: MakeConsole) -> None:
    harness = await make_console()
    for path in ("/healthz", "/readyz", "/metrics"):
        async with harness.admin.get(path) as response:
            assert response.status == 200, path


async def test_the_console_is_not_served_on_the_partner_port(make_gateway: MakeGateway) -> None:
    harness = await make_gateway(server={"admin_port": 0})
    async with harness.client.get("/") as response:
        assert_error(await read_reply(response), 404, "not_found")
    async with harness.client.get("/healthz") as response:
        assert response.status == 200


# --- actions ------------------------------------------------------------------------------------


async def test_retry_queues_a_failed_order_again_and_the_deliverer_delivers_it(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-RETRY")
    await harness.log_in()
    response = await post_action(
        harness, "/console/outbox/retry", "TM-RETRY", await csrf_of(harness)
    )
    assert response.status == 303 and response.headers["Location"] == "/?notice=retried"
    assert await harness.deliver() == 1
    _, html, _ = await get_page(harness)
    assert "The order is queued again" not in html  # a plain reload shows no old notice
    latest = html.split('id="latest"', 1)[1]
    assert re.search(r"TM-RETRY</td><td>acme</td><td>delivered</td>", latest)
    envelope = sandbox_state.received[-1]["envelope"]
    assert isinstance(envelope, dict) and envelope["external_reference"] == "TM-RETRY"


async def test_drop_deletes_a_failed_order(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-DROP")
    await harness.log_in()
    response = await post_action(harness, "/console/outbox/drop", "TM-DROP", await csrf_of(harness))
    assert response.status == 303 and response.headers["Location"] == "/?notice=dropped"
    assert harness.gateway.outbox is not None
    entry = await harness.gateway.outbox.store.get("acme", "TM-DROP")
    assert entry is not None and entry.status is OrderStatus.DROPPED


async def test_an_action_on_an_order_not_in_that_state_changes_nothing(
    make_console: MakeConsole, sandbox_state: SandboxState
) -> None:
    harness = await make_console()
    await queue_order(harness, sandbox_state, "TM-QUEUED")
    await harness.log_in()
    csrf = await csrf_of(harness)
    response = await post_action(harness, "/console/outbox/retry", "TM-QUEUED", csrf)
    assert response.headers["Location"] == "/?notice=unchanged"
    response = await post_action(harness, "/console/outbox/drop", "TM-NEVER", csrf)
    assert response.headers["Location"] == "/?notice=unchanged"
    async with harness.admin.get("/?notice=unchanged") as page:
        assert "Nothing changed" in await page.text()


async def test_actions_without_the_outbox_are_not_found(make_console: MakeConsole) -> None:
    harness = await make_console(outbox=False)
    await harness.log_in()
    _, html, _ = await get_page(harness)
    assert "off ([outbox] enabled = false)" in html
    response = await post_action(harness, "/console/outbox/retry", "TM-1", await csrf_of(harness))
    assert response.status == 404


# --- what the page tells ------------------------------------------------------------------------


async def test_console_pages_and_redirects_carry_the_security_headers(
    make_console: MakeConsole,
) -> None:
    harness = await make_console()
    _, _, login_headers = await get_page(harness)
    async with harness.admin.post(
        "/console/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
    ) as response:
        redirect_headers = dict(response.headers)
    _, _, page_headers = await get_page(harness)
    for headers in (login_headers, redirect_headers, page_headers):
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "form-action 'self'" in csp and "script-src" not in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert page_headers["Content-Type"].startswith("text/html")


async def test_everything_from_partners_is_escaped(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    evil = '<script>alert("x")</script>&'
    await fail_order(harness, sandbox_state, fake_time, evil)
    await harness.log_in()
    _, html, _ = await get_page(harness)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in html
    # and the escaped reference still names the order when posted back
    response = await post_action(harness, "/console/outbox/drop", evil, await csrf_of(harness))
    assert response.headers["Location"] == "/?notice=dropped"


async def test_no_customer_data_key_or_token_is_on_the_page(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    await fail_order(harness, sandbox_state, fake_time, "TM-PRIVATE")
    await queue_order(
        harness, sandbox_state, "TM-Q", customer_name="Erika Geheim", customer_email="e@geheim.test"
    )
    reply = await post_order(harness.partner, flat_order(external_reference="TM-OK"))
    assert reply.status == 200
    await harness.log_in()
    _, html, _ = await get_page(harness)
    assert "TM-PRIVATE" in html and "TM-Q" in html and "TM-OK" in html
    secrets = [
        "Erika", "Geheim", "e@geheim.test", "Ibuprofen", KEYS["acme"], hash_key(KEYS["acme"]),
        DEMO_ORG_KEY, ADMIN_TOKEN, hash_key(ADMIN_TOKEN),
    ]  # fmt: skip
    client = harness.gateway.manager
    token = client.tokens._tokens.get(next(iter(client.tokens._tokens)))
    assert token is not None
    secrets.append(token.value)
    leaked = [secret for secret in secrets if secret in html]
    assert not leaked


async def test_the_page_tells_manager_failures_tokens_and_the_outbox(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    harness = await make_console()
    await harness.log_in()
    _, html, _ = await get_page(harness)
    assert "none yet" in html and "no token cached" in html
    await queue_order(harness, sandbox_state, "TM-Q")
    fake_time.now += 60
    _, html, _ = await get_page(harness)
    assert "HTTP 503" in html and "1 min ago" in html
    assert "token cached, expires in 59 min" in html  # an hour's token, fetched a minute ago
    assert re.search(r"<dt>queued</dt><dd>1</dd>", html)
    assert re.search(r"<dt>oldest queued</dt><dd>1 min</dd>", html)
    assert "sqlite (the outbox&#39;s file): reachable" in html
    assert harness.config.digest[:16] in html


async def test_recent_requests_are_the_request_logs_fields_newest_first_at_most_50(
    make_console: MakeConsole,
) -> None:
    harness = await make_console()
    for number in range(RECENT_REQUESTS + 5):
        reply = await post_order(
            harness.partner,
            flat_order(external_reference=f"TM-{number:03}"),
            headers={"X-Request-ID": f"req-{number:03}"},
        )
        assert reply.status == 200
    unknown = await post_order(harness.partner, flat_order(), key="not-a-key")
    assert unknown.status == 401
    await harness.log_in()
    _, html, _ = await get_page(harness)
    table = html.split("Recent partner requests", 1)[1]
    rows = re.findall(r"<tr><td>\d\d:\d\d:\d\d</td>.*?</tr>", table)
    assert len(rows) == RECENT_REQUESTS
    assert "unauthorized" in rows[0] and "401" in rows[0]
    assert "TM-054" in rows[1] and "req-054" in rows[1] and ">200<" in rows[1]
    assert "TM-004" not in table  # pushed out of the ring buffer


async def test_the_console_reads_and_acts_on_an_outbox_kept_in_redis(
    make_console: MakeConsole, sandbox_state: SandboxState, fake_time: FakeTime, redis_url: str
) -> None:
    harness = await make_console(redis_url=redis_url)
    await fail_order(harness, sandbox_state, fake_time, "TM-REDIS")
    await harness.log_in()
    _, html, _ = await get_page(harness)
    assert "redis: reachable" in html
    failed = html.split('id="failed"', 1)[1].split('id="latest"', 1)[0]
    assert re.search(r"TM-REDIS</td><td>acme</td><td[^>]*>failed</td>", failed)
    response = await post_action(
        harness, "/console/outbox/retry", "TM-REDIS", await csrf_of(harness)
    )
    assert response.headers["Location"] == "/?notice=retried"
    await harness.deliver()
    _, html, _ = await get_page(harness)
    assert re.search(r"TM-REDIS</td><td>acme</td><td>delivered</td>", html)
