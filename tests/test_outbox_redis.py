"""The Redis outbox shared by several gateways: two apps in one loop, then two real processes.

In the loop, with a fake clock and the deliverers run by hand: an order queued through one app is
delivered by the other's deliverer, and one left leased by a process that died is delivered by
the other once the lease lapses. Then real processes: a ``gateway sandbox`` process stands in for
Manager and goes down (its outage switch); orders posted to two ``gateway serve`` processes
meanwhile are answered ``202 queued``; once Manager is back, every one arrives exactly once,
whichever process's deliverer took it, and its status says ``delivered``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import (
    ENVIRON,
    KEYS,
    ORDER_PATH,
    REPO_ROOT,
    Client,
    FakeTime,
    assert_error,
    base_url_of,
    flat_order,
    free_port,
    gateway_toml,
    post_order,
    toml_table,
)
from pytest_aiohttp import AiohttpClient
from test_workers import STOP_S, child_env, serving, status_of, wait_for

from gateway.app import Seams, create_app
from gateway.cli import main
from gateway.config import Config, parse_config
from gateway.gateway import GATEWAY_KEY, Gateway
from gateway.outbox import NewOrder, OrderStatus, Remember, Settlement
from gateway.outbox.redis import RedisOutbox
from gateway.outbox.sealing import new_key
from gateway.sandbox import Fault, SandboxState

ORDERS: Final = 12
DELIVERY_S: Final = 10.0  # retries every 0.2–0.5 s once Manager is back: far less than this
OUTBOX_KEY_ENV: Final = "TEST_OUTBOX_KEY"
OUTBOX_TOML: Final = "\n" + toml_table(
    "outbox",
    {"enabled": True, "key_env": OUTBOX_KEY_ENV, "retry_min_s": 0.2, "retry_max_s": 0.5},
)


# --- two apps in one loop ---------------------------------------------------------------------


def redis_outbox_toml(sandbox_url: str) -> str:
    """The test configuration with state and outbox in Redis (``$REDIS_URL``)."""
    text = gateway_toml(sandbox_url, server={"admin_port": 0}, manager={"retries": 0})
    return text + "\n" + toml_table("state", {"backend": "redis"}) + OUTBOX_TOML


def redis_outbox_config(sandbox_url: str, redis_url: str) -> Config:
    environ = {**ENVIRON, "REDIS_URL": redis_url, OUTBOX_KEY_ENV: new_key()}
    return parse_config(redis_outbox_toml(sandbox_url), environ=environ)


@dataclass
class App:
    client: Client
    gateway: Gateway

    async def deliver(self) -> int:
        """One round of this app's deliverer: how many orders it took."""
        outbox = self.gateway.outbox
        assert outbox is not None
        return await outbox.run_once(self.gateway.runtime.targets, self.gateway.manager)

    async def status(self, reference: str) -> Any:
        path = f"{ORDER_PATH}/{quote(reference, safe='')}"
        async with self.client.get(path, headers={"apikey": KEYS["acme"]}) as response:
            assert response.status == 200
            return await response.json()


@pytest.fixture
async def two_apps(
    aiohttp_client: AiohttpClient, sandbox: TestServer, fake_time: FakeTime, redis_url: str
) -> list[App]:
    config = redis_outbox_config(base_url_of(sandbox), redis_url)
    apps = []
    for _ in range(2):
        seams = Seams(clock=fake_time.clock, sleep=fake_time.sleep, deliverer_poll_s=None)
        client = await aiohttp_client(create_app(config, seams))
        apps.append(App(client, client.server.app[GATEWAY_KEY]))
    return apps


async def queue_during_outage(app: App, state: SandboxState, reference: str) -> None:
    state.outage = Fault(503)
    reply = await post_order(app.client, flat_order(external_reference=reference))
    assert reply.status == 202, reply.body
    state.outage = None


def test_the_redis_outbox_is_the_state_store_too(two_apps: list[App]) -> None:
    for app in two_apps:
        outbox = app.gateway.outbox
        assert outbox is not None and isinstance(outbox.store, RedisOutbox)
        assert app.gateway.state is outbox.store


async def test_an_order_queued_through_one_app_is_delivered_by_the_others_deliverer(
    two_apps: list[App], sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    first, second = two_apps
    await queue_during_outage(first, sandbox_state, "SHARED-1")
    fake_time.now += 1  # past the retry time (retry_min_s 0.2, at most 0.5)

    assert await second.deliver() == 1
    assert await first.deliver() == 0

    assert [r["envelope"]["external_reference"] for r in sandbox_state.received] == ["SHARED-1"]
    status = await first.status("SHARED-1")
    # One request reached order-requests: in the outage, the token endpoint was down too.
    assert (status["status"], status["attempts"]) == ("delivered", 1)


async def test_an_order_left_leased_by_a_dead_process_is_sent_once_its_lease_lapses(
    two_apps: list[App], sandbox_state: SandboxState, fake_time: FakeTime
) -> None:
    first, second = two_apps
    await queue_during_outage(first, sandbox_state, "ORPHAN-1")
    fake_time.now += 1
    lease_s = first.gateway.manager.timeout_s + 30  # the deliverer's lease
    outbox = first.gateway.outbox
    assert outbox is not None
    # The first process's deliverer takes the order, then is killed before it sends it.
    assert len(await outbox.store.take_due(fake_time.now, lease_s, 16)) == 1

    fake_time.now += lease_s - 1
    assert await second.deliver() == 0
    fake_time.now += 1
    assert await second.deliver() == 1

    assert len(sandbox_state.received) == 1
    assert (await second.status("ORPHAN-1"))["status"] == "delivered"


async def test_an_app_with_other_keys_than_the_fleets_is_not_ready_and_stores_nothing(
    aiohttp_client: AiohttpClient, sandbox: TestServer, fake_time: FakeTime, redis_url: str
) -> None:
    clients = []
    for _ in range(2):  # each with a key of its own: the second one is wrong
        config = redis_outbox_config(base_url_of(sandbox), redis_url)
        seams = Seams(clock=fake_time.clock, sleep=fake_time.sleep, deliverer_poll_s=None)
        clients.append(await aiohttp_client(create_app(config, seams)))
    first, wrong = clients

    for client, expected in ((first, 200), (wrong, 503)):
        async with client.get("/readyz") as response:
            assert response.status == expected
    reply = await post_order(wrong, flat_order(external_reference="WRONG-KEY-1"))
    assert_error(reply, 503, "state_unavailable")
    assert (await post_order(first, flat_order(external_reference="RIGHT-KEY-1"))).status == 200


async def test_the_outbox_commands_read_and_change_the_redis_outbox(
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(redis_outbox_toml("http://127.0.0.1:9"), encoding="utf-8")
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    environ = {**ENVIRON, "REDIS_URL": redis_url, OUTBOX_KEY_ENV: new_key()}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    store = RedisOutbox(redis_url)
    now = time.time()
    for reference in ("Q-1", "F-1"):
        order = NewOrder("acme", reference, "demo-org", b"sealed", now - 60, now, now + 3600)
        await store.put(order, Remember(f"key-{reference}", "fp", None, 0))
    await store.settle("acme", "F-1", Settlement(OrderStatus.FAILED, now, calls=0))

    async def run(*argv: str) -> int:
        return await asyncio.to_thread(main, ["outbox", *argv, "--config", str(path)])

    try:
        assert await run("list", "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert {(d["external_reference"], d["status"]) for d in listed} == {
            ("Q-1", "queued"),
            ("F-1", "failed"),
        }
        assert await run("retry", "--partner", "acme", "F-1") == 0
        assert await run("drop", "--partner", "acme", "Q-1") == 0
        assert await run("drop", "--partner", "acme", "Q-1") == 1  # nothing left to drop

        retried, dropped = await store.get("acme", "F-1"), await store.get("acme", "Q-1")
        assert retried is not None and retried.status is OrderStatus.QUEUED
        assert dropped is not None and dropped.status is OrderStatus.DROPPED
    finally:
        await store.close()


# --- real processes ---------------------------------------------------------------------------


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
            assert document["attempts"] >= 1  # at least the request that Manager took
