"""The operator console in a real browser: Debian's Chromium driven by Playwright, on loopback.

No browser is downloaded: Playwright drives ``/usr/bin/chromium`` (``apt-get install chromium``;
CI's ``.ci/run`` installs it). Without it the test is skipped locally and fails in CI.
Set ``CONSOLE_SCREENSHOT=docs/console.png`` to refresh the README's screenshot.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import (
    ADMIN_TOKEN,
    KEYS,
    ConsoleHarness,
    FakeTime,
    MakeConsole,
    flat_order,
    post_order,
)

from gateway.auth import hash_key
from gateway.outbox import OrderStatus
from gateway.sandbox import DEMO_ORG_KEY, Fault, SandboxState

CHROMIUM = Path("/usr/bin/chromium")
# Nothing but loopback: no background traffic, no component updates, no name resolution at all.
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium's sandbox needs a non-root user; CI runs as root
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
CUSTOMERS = [("Erika Musterfrau", "erika@example.test"), ("Max Geheim", "max@geheim.test")]
PHONE = {"width": 390, "height": 844}

try:
    from playwright.async_api import BrowserContext, Page, async_playwright
except ImportError:  # pragma: no cover - playwright is in the test extras
    async_playwright = None  # type: ignore[assignment]


def require_chromium() -> None:
    """Skip without Chromium (or Playwright) on a developer's machine; fail in CI."""
    if async_playwright is None or not CHROMIUM.exists():
        missing = "playwright" if async_playwright is None else str(CHROMIUM)
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing; .ci/run installs it (apt-get install chromium)")
        pytest.skip(f"{missing} is missing (apt-get install chromium)")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    require_chromium()
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile for every run
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            yield context
        finally:
            await context.close()


async def place_orders(
    harness: ConsoleHarness, sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    """One delivered, two failed (given up after max_age_hours), one queued; a refused one."""
    assert (await post_order(harness.partner, order("TM-1001", 0))).status == 200
    for reference in ("TM-1002", "TM-1003"):
        sandbox_state.faults.append(Fault(503))
        assert (await post_order(harness.partner, order(reference, 1))).status == 202
    fake_time.now += 2 * 3600  # past max_age_hours = 1
    await harness.deliver()
    sandbox_state.faults.append(Fault(503))
    assert (await post_order(harness.partner, order("TM-1004", 0))).status == 202
    refused = await post_order(harness.partner, {"external_reference": "TM-1005", "items": []})
    assert refused.status == 422
    fake_time.now += 90


def order(reference: str, customer: int) -> dict[str, object]:
    name, email = CUSTOMERS[customer]
    return flat_order(external_reference=reference, customer_name=name, customer_email=email)


def row(page: Page, table: str, reference: str) -> object:
    return page.locator(f"h3#{table} + div tr", has_text=reference)


async def test_operator_logs_in_sees_orders_retries_and_drops_in_a_real_browser(
    make_console: MakeConsole,
    sandbox_state: SandboxState,
    fake_time: FakeTime,
    browser: BrowserContext,
    tmp_path: Path,
) -> None:
    fake_time.now = time.time()  # real dates on the screenshot
    harness = await make_console()
    await place_orders(harness, sandbox_state, fake_time)
    base = str(harness.admin.make_url("/")).rstrip("/")
    page = await browser.new_page()
    requested: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    # Errors and warnings only (a CSP violation is one); Chromium's verbose hints are not.
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if message.type in ("error", "warning") else None
        ),
    )

    await page.goto(base + "/")
    assert await page.locator("input[name=token]").count() == 1
    assert "TM-1002" not in await page.content()
    await page.fill("input[name=token]", ADMIN_TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(base + "/")

    failed = page.locator("h3#failed + div")
    latest = page.locator("h3#latest + div")
    assert await failed.locator("tr", has_text="TM-1002").count() == 1
    assert await failed.locator("tr", has_text="TM-1003").count() == 1
    assert "upstream_unavailable" in await failed.locator("tr", has_text="TM-1003").inner_text()
    assert "queued" in await latest.locator("tr", has_text="TM-1004").inner_text()
    assert "HTTP 503" in await page.inner_text("body")
    assert "validation_failed" in await page.inner_text("body")
    # The stylesheet is applied: the CSP's hash matches, Chromium reported no violation.
    max_width = await page.evaluate("getComputedStyle(document.body).maxWidth")
    assert max_width == "1152px"
    shot = Path(os.environ.get("CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    assert len(await page.screenshot(path=str(shot), full_page=True)) > 10_000

    html, text = await page.content(), await page.inner_text("body")
    client = harness.gateway.manager
    tokens = [client.tokens._tokens[slot].value for slot in client.tokens._tokens]
    secrets = [
        *(part for customer in CUSTOMERS for part in customer), "Ibuprofen",
        KEYS["acme"], hash_key(KEYS["acme"]), DEMO_ORG_KEY, ADMIN_TOKEN, *tokens,
    ]  # fmt: skip
    assert tokens
    assert [secret for secret in secrets if secret in html or secret in text] == []

    await page.get_by_role("button", name="Retry TM-1002").click()
    await page.wait_for_url(base + "/?notice=retried")
    assert "queued again" in await page.inner_text("body")
    await harness.deliver()  # TM-1002 again, and TM-1004 whose next attempt is due
    await page.goto(base + "/")
    assert "delivered" in await latest.locator("tr", has_text="TM-1002").inner_text()
    assert await failed.locator("tr", has_text="TM-1002").count() == 0

    await page.get_by_role("button", name="Drop TM-1003").click()
    await page.wait_for_url(base + "/?notice=dropped")
    assert "dropped" in await latest.locator("tr", has_text="TM-1003").inner_text()
    assert await failed.locator("tr", has_text="TM-1003").count() == 0
    assert harness.gateway.outbox is not None
    entry = await harness.gateway.outbox.store.get("acme", "TM-1003")
    assert entry is not None and entry.status is OrderStatus.DROPPED

    # A phone: nothing wider than the screen (wide tables scroll inside their own box).
    await page.set_viewport_size(PHONE)
    await page.reload()
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(base + "/?notice=logged_out")
    assert await page.locator("input[name=token]").count() == 1

    assert problems == []
    assert all(url.startswith(base + "/") for url in requested), requested


def test_without_chromium_ci_fails_and_a_developers_machine_skips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="installs it"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_chromium()
