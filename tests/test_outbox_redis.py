"""The Redis outbox across real processes: two ``gateway serve`` sharing one Redis and one queue.

A ``gateway sandbox`` process stands in for Manager and goes down (its outage switch); orders
posted to both gateways meanwhile are answered ``202 queued``; once Manager is back, every one
arrives exactly once, whichever process's deliverer took it, and its status says ``delivered``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import pytest
from conftest import KEYS, REPO_ROOT, flat_order, free_port, toml_table
from test_workers import STOP_S, child_env, serving, status_of, wait_for

from gateway.outbox.sealing import new_key

ORDERS: Final = 12
DELIVERY_S: Final = 10.0  # retries every 0.2–0.5 s once Manager is back: far less than this
OUTBOX_KEY_ENV: Final = "TEST_OUTBOX_KEY"
OUTBOX_TOML: Final = "\n" + toml_table(
    "outbox",
    {"enabled": True, "key_env": OUTBOX_KEY_ENV, "retry_min_s": 0.2, "retry_max_s": 0.5},
)


@pytest.fixture
async def sandbox_url(tmp_path: Path) -> AsyncIterator[str]:
    """A ``gateway sandbox`` process on a free port, ready; stopped by its PID afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "sandbox.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "sandbox", "--host", "127.0.0.1", "--port", str(port),
            cwd=REPO_ROOT, env=child_env(None), stdout=out, stderr=out,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                assert process.returncode is None, log.read_text()
                return await status_of(session, f"{url}/_sandbox/order-requests") == 200

            await wait_for(ready, "the sandbox process", STOP_S)
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=STOP_S)
            except TimeoutError:
                process.kill()
        await process.wait()


async def arrived(session: aiohttp.ClientSession, sandbox_url: str) -> list[str]:
    """The references of the order requests the sandbox accepted, in order of arrival."""
    async with session.get(f"{sandbox_url}/_sandbox/order-requests") as response:
        data: Any = await response.json()
    return [request["envelope"]["external_reference"] for request in data["order_requests"]]


async def order_status(session: aiohttp.ClientSession, order_url: str, reference: str) -> Any:
    url = f"{order_url}/{quote(reference, safe='')}"
    async with session.get(url, headers={"apikey": KEYS["acme"]}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


@pytest.mark.timeout(60)
async def test_two_processes_share_one_queue_and_deliver_each_order_once(
    tmp_path: Path, sandbox_url: str, redis_url: str
) -> None:
    environ = {OUTBOX_KEY_ENV: new_key()}
    references = [f"FLEET-{i}" for i in range(ORDERS)]
    async with (
        aiohttp.ClientSession() as session,
        serving(
            tmp_path, sandbox_url, redis_url, count=2, extra_toml=OUTBOX_TOML, extra_env=environ
        ) as gateways,
    ):
        urls = [served.order_url for served in gateways]
        async with session.post(f"{sandbox_url}/_sandbox/outage", json={"status": 503}) as down:
            assert down.status == 201

        answers = []
        for i, reference in enumerate(references):
            body = flat_order(external_reference=reference)
            async with session.post(
                urls[i % 2], json=body, headers={"apikey": KEYS["acme"]}
            ) as response:
                answers.append((response.status, await response.json(), response.headers))
        # The same order again, through the other process: the stored 202, not a second copy.
        body = flat_order(external_reference=references[0])
        async with session.post(urls[1], json=body, headers={"apikey": KEYS["acme"]}) as again:
            assert again.status == 202
            assert again.headers["Idempotent-Replayed"] == "true"

        for (status, document, headers), reference in zip(answers, references, strict=True):
            assert status == 202, document
            assert document["status"] == "queued"
            assert headers["Location"] == f"/api/v1/external-order/{reference}"
        assert await arrived(session, sandbox_url) == []
        queued = await order_status(session, urls[1], references[0])
        assert queued["status"] == "queued"
        assert queued["last_error"] == "upstream_unavailable"

        async with session.delete(f"{sandbox_url}/_sandbox/outage") as up:
            assert up.status == 204

        async def all_delivered() -> bool:
            for i, reference in enumerate(references):
                document = await order_status(session, urls[i % 2], reference)
                if document["status"] != "delivered":
                    return False
            return True

        await wait_for(all_delivered, "every order delivered", DELIVERY_S)

        # Nothing is queued any more, so nothing else can arrive: each reference exactly once.
        counts = Counter(await arrived(session, sandbox_url))
        assert counts == Counter(references)
        for i, reference in enumerate(references):
            document = await order_status(session, urls[(i + 1) % 2], reference)
            assert document["status"] == "delivered"
            assert document["order_request_id"]
            assert document["attempts"] >= 2  # the inline attempt in the outage, then the one
