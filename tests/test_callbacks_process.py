"""A callback survives ``kill -9``: real ``python -m gateway serve`` processes on loopback.

The gateway accepts a Manager webhook (answered only once it is committed), starts sending the
partner's ``order.updated`` to a receiver that answers 500, and is killed. The restarted gateway
sends the same message, with the same ``webhook-id``, and the receiver verifies it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Final

import aiohttp
from conftest import REPO_ROOT, flat_order, free_port
from pytest_aiohttp import AiohttpServer
from standardwebhooks import Webhook
from test_workers import status_of, wait_for
from webhook_kit import (
    ALPHA_WHSEC,
    ENVIRON,
    KEYS,
    ORDER_PATH,
    WEBHOOK_PATH,
    Receiver,
    manager_event,
    sign,
    webhooks_toml,
)

from gateway.sandbox import create_sandbox_app

START_S: Final = 15.0
STOP_S: Final = 10.0


def read_log(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


async def start_gateway(config: Path, log: Path, admin_port: int) -> asyncio.subprocess.Process:
    env = {**os.environ, **ENVIRON}
    env.pop("GATEWAY_CONFIG", None)
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config),
            cwd=REPO_ROOT, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            assert process.returncode is None, read_log(log)
            return await status_of(session, f"http://127.0.0.1:{admin_port}/readyz") == 200

        await wait_for(ready, "the gateway's /readyz", START_S)
    return process


async def test_callback_queued_before_kill_9_goes_out_after_restart_with_the_same_id(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    sandbox = await aiohttp_server(create_sandbox_app(), host="127.0.0.1")
    receiver = Receiver(statuses=[500] * 1000)
    served = await aiohttp_server(receiver.app(), host="127.0.0.1")
    port, admin_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        webhooks_toml(
            f"http://127.0.0.1:{sandbox.port}",
            tmp_path / "outbox.db",
            f"http://127.0.0.1:{served.port}/callbacks",
            server={"port": port, "admin_port": admin_port},
            outbox={"retry_min_s": 0.2, "retry_max_s": 0.4},
        ),
        encoding="utf-8",
    )
    log = tmp_path / "gateway.log"
    base = f"http://127.0.0.1:{port}"
    processes: list[asyncio.subprocess.Process] = []
    try:
        processes.append(await start_gateway(config, log, admin_port))
        async with aiohttp.ClientSession() as session:
            async with session.post(
                base + ORDER_PATH, json=flat_order(external_reference="K-1"),
                headers={"apikey": KEYS["alpha"]},
            ) as response:  # fmt: skip
                assert response.status == 200
                order_request_id = (await response.json())["id"]
            raw = json.dumps(
                manager_event(metadata={"order_request_id": order_request_id,
                                        "new_status": "approved"})
            ).encode()  # fmt: skip
            headers = {"X-PharmaOne-Signature": sign(raw), "X-PharmaOne-Delivery-Id": "k-1"}
            async with session.post(base + WEBHOOK_PATH, data=raw, headers=headers) as response:
                assert (response.status, await response.json()) == (200, {"status": "accepted"})

            await wait_for(lambda: _more(receiver, 0), "a first callback attempt", 10)
            first_id = receiver.received[0][0]["webhook-id"]
            processes[0].send_signal(signal.SIGKILL)  # no shutdown, no lease settled
            await processes[0].wait()
            attempts_before = len(receiver.received)
            receiver.statuses.clear()  # the partner is back: 204 from now on

            processes.append(await start_gateway(config, log, admin_port))
            await wait_for(
                lambda: _more(receiver, attempts_before), "the callback after restart", 10
            )
            headers_after, body_after = receiver.received[-1]
            assert headers_after["webhook-id"] == first_id
            message = Webhook(ALPHA_WHSEC).verify(body_after, headers_after)
            assert message["type"] == "order.updated"
            assert message["data"]["manager_status"] == "approved"
            assert {h["webhook-id"] for h, _ in receiver.received} == {first_id}

            # Manager's retry of the same delivery changes nothing after the restart either.
            async with session.post(base + WEBHOOK_PATH, data=raw, headers=headers) as response:
                assert (await response.json()) == {"status": "duplicate"}
        processes[1].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(processes[1].wait(), STOP_S) == 0, read_log(log)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _more(receiver: Receiver, count: int) -> bool:
    return len(receiver.received) > count
