"""Live configuration reload (SIGHUP): a valid file is swapped in, a broken one is refused.

In-process tests drive ``reload_config`` against the real app over loopback HTTP; one test runs
``python -m gateway serve`` as a subprocess and sends it real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import SlowManager
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import Seams, create_app, create_gateway
from gateway.auth import hash_key
from gateway.config import load_config
from gateway.gateway import Gateway
from gateway.observability import LOGGER_NAME, setup_logging
from gateway.outbox.sealing import new_key
from gateway.sandbox import DEMO_ORG_KEY, SANDBOX_KEY, SandboxState, create_sandbox_app
from gateway.server import reload_config

Client = TestClient[web.Request, web.Application]

REPO_ROOT = Path(__file__).resolve().parents[1]
ORDER_PATH = "/api/v1/external-order"
KEY_ENV = "RELOAD_TEST_ORG_KEY"
KEY_A = "reload-alpha-key-0123456789abcdef"
KEY_B = "reload-beta-key-fedcba9876543210"
PARTNERS = {"alpha": KEY_A, "beta": KEY_B}
AIOHTTP_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client")


def config_text(
    base_url: str,
    partners: tuple[str, ...] = ("alpha",),
    *,
    server: str = "admin_port = 0",
    ttl_hours: float = 24,
    extra: str = "",
) -> str:
    blocks = [
        f'[partners.{name}]\nshop = "demo"\nkey_sha256 = "{hash_key(PARTNERS[name])}"\n'
        for name in partners
    ]
    return (
        f"[server]\n{server}\n\n"
        f'[manager]\nbase_url = "{base_url}"\napi = "v2"\ntimeout_s = 5\nretries = 0\n\n'
        f'[shops.demo]\norg_id = "demo-org"\nshop_id = "demo-shop"\n'
        f'manager_key_env = "{KEY_ENV}"\n\n'
        + "\n".join(blocks)
        + f'\n[idempotency]\nttl_hours = {ttl_hours}\n\n[logging]\nlevel = "info"\n'
        + extra
    )


def write(path: Path, text: str) -> None:
    """Replace the configuration file (a sync helper: tiny local writes, no loop to block)."""
    path.write_text(text)


def read(path: Path) -> str:
    return path.read_text()


def remove(path: Path) -> None:
    path.unlink()


def order(reference: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "external_reference": reference,
        "customer_name": "Max Mustermann",
        "items": [{"name": "Ibuprofen 400", "quantity": 1}],
    }
    body.update(changes)
    return body


async def post(client: Client, key: str, reference: str) -> tuple[int, dict[str, Any]]:
    async with client.post(ORDER_PATH, json=order(reference), headers={"apikey": key}) as resp:
        return resp.status, await resp.json()


async def config_digest_metric(client: Client) -> str:
    async with client.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    found = re.findall(r'^gateway_config_info\{digest="([0-9a-f]+)"\} 1\.0$', text, re.M)
    assert len(found) == 1, text
    return found[0]


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The gateway's JSON log into a buffer; the logging setup is restored afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    saved_levels = {name: logging.getLogger(name).level for name in AIOHTTP_LOGGERS}
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream)
    try:
        yield stream
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture(autouse=True)
def org_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # reload_config reads the process environment, like SIGHUP in production.
    monkeypatch.setenv(KEY_ENV, DEMO_ORG_KEY)


@pytest.fixture
async def sandbox(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(create_sandbox_app())


@pytest.fixture
def manager(sandbox: TestServer) -> SandboxState:
    return sandbox.app[SANDBOX_KEY]


@pytest.fixture
def base_url(sandbox: TestServer) -> str:
    return f"http://127.0.0.1:{sandbox.port}"


@pytest.fixture
def config_path(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "gateway.toml"
    write(path, config_text(base_url))
    return path


@pytest.fixture
def gateway(config_path: Path) -> Gateway:
    return create_gateway(load_config(config_path))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, gateway: Gateway) -> Client:
    return await aiohttp_client(create_app(gateway.runtime.config, gateway=gateway))


# (a) a valid file is swapped in


async def test_reload_adds_a_partner(
    client: Client,
    gateway: Gateway,
    config_path: Path,
    base_url: str,
    manager: SandboxState,
    log_stream: io.StringIO,
) -> None:
    old_digest = gateway.runtime.config.digest
    assert await config_digest_metric(client) == old_digest[:16]
    assert (await post(client, KEY_A, "A-1"))[0] == 200
    status, body = await post(client, KEY_B, "B-1")
    assert (status, body["error"]) == (401, "unauthorized")
    assert manager.token_requests == 1

    write(config_path, config_text(base_url, ("alpha", "beta")))
    assert reload_config(gateway, config_path) is True

    new_digest = gateway.runtime.config.digest
    assert new_digest != old_digest
    assert "beta" in gateway.runtime.config.partners
    assert (await post(client, KEY_B, "B-1"))[0] == 200
    assert (await post(client, KEY_A, "A-2"))[0] == 200
    assert await config_digest_metric(client) == new_digest[:16]
    # manager settings unchanged: the token cache (and its token) survived the reload
    assert manager.token_requests == 1
    assert len(manager.received) == 3
    reloaded = [e for e in log_events(log_stream) if e["event"] == "config_reloaded"]
    assert [e["config"] for e in reloaded] == [new_digest[:16]]


async def test_reload_keeps_idempotency_records(
    client: Client, gateway: Gateway, config_path: Path, base_url: str, manager: SandboxState
) -> None:
    async with client.post(ORDER_PATH, json=order("A-1"), headers={"apikey": KEY_A}) as resp:
        first = await resp.read()
    write(config_path, config_text(base_url, ("alpha", "beta")))
    assert reload_config(gateway, config_path)
    async with client.post(ORDER_PATH, json=order("A-1"), headers={"apikey": KEY_A}) as resp:
        assert resp.status == 200
        assert resp.headers.get("Idempotent-Replayed") == "true"
        assert await resp.read() == first
    assert len(manager.received) == 1


async def test_reload_can_remove_a_partner(
    client: Client, gateway: Gateway, config_path: Path, base_url: str
) -> None:
    write(config_path, config_text(base_url, ("alpha", "beta")))
    assert reload_config(gateway, config_path)
    assert (await post(client, KEY_B, "B-1"))[0] == 200
    write(config_path, config_text(base_url, ("alpha",)))
    assert reload_config(gateway, config_path)
    assert (await post(client, KEY_B, "B-2"))[0] == 401
    assert (await post(client, KEY_A, "A-1"))[0] == 200


async def test_reload_of_the_same_file_keeps_the_digest(
    client: Client, gateway: Gateway, config_path: Path
) -> None:
    before = gateway.runtime.config.digest
    assert reload_config(gateway, config_path) is True
    assert gateway.runtime.config.digest == before
    assert await config_digest_metric(client) == before[:16]


# (b) a broken file is refused and the old configuration stays


BROKEN = {
    "unknown-key": lambda base_url: config_text(base_url, ("alpha", "beta"), extra="bogus = 1\n"),
    "bad-toml": lambda base_url: config_text(base_url, ("alpha", "beta")) + "[manager\n",
    "unknown-shop": lambda base_url: config_text(base_url, ("alpha", "beta")).replace(
        'shop = "demo"', 'shop = "nowhere"'
    ),
    "missing-secret": lambda base_url: config_text(base_url, ("alpha", "beta")).replace(
        KEY_ENV, "RELOAD_TEST_UNSET_VARIABLE"
    ),
    "bad-url": lambda base_url: config_text("ftp://manager.example/path", ("alpha", "beta")),
}


@pytest.mark.parametrize("kind", list(BROKEN))
async def test_broken_file_is_refused(
    kind: str,
    client: Client,
    gateway: Gateway,
    config_path: Path,
    base_url: str,
    manager: SandboxState,
    log_stream: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RELOAD_TEST_UNSET_VARIABLE", raising=False)
    old_runtime = gateway.runtime
    old_digest = gateway.runtime.config.digest
    write(config_path, BROKEN[kind](base_url))

    assert reload_config(gateway, config_path) is False

    assert gateway.runtime is old_runtime
    assert gateway.runtime.config.digest == old_digest
    assert await config_digest_metric(client) == old_digest[:16]
    assert (await post(client, KEY_A, "A-1"))[0] == 200
    assert (await post(client, KEY_B, "B-1"))[0] == 401  # the refused file's partner is not in
    assert len(manager.received) == 1
    events = log_events(log_stream)
    refused = [e for e in events if e["event"] == "config_reload_refused"]
    assert len(refused) == 1
    assert refused[0]["level"] == "error"
    assert refused[0]["config"] == old_digest[:16]
    assert refused[0]["reason"]
    assert not any(e["event"] == "config_reloaded" for e in events)
    assert DEMO_ORG_KEY not in log_stream.getvalue()


async def test_unknown_key_refusal_names_the_key(
    gateway: Gateway, config_path: Path, base_url: str, log_stream: io.StringIO
) -> None:
    write(config_path, config_text(base_url, server="admin_port = 0\nbogus_key = 1"))
    assert reload_config(gateway, config_path) is False
    (refused,) = [e for e in log_events(log_stream) if e["event"] == "config_reload_refused"]
    assert "server.bogus_key" in refused["reason"]
    assert "unknown key" in refused["reason"]


async def test_missing_file_is_refused(
    client: Client, gateway: Gateway, config_path: Path, log_stream: io.StringIO
) -> None:
    remove(config_path)
    assert reload_config(gateway, config_path) is False
    assert (await post(client, KEY_A, "A-1"))[0] == 200
    assert any(e["event"] == "config_reload_refused" for e in log_events(log_stream))


async def test_valid_file_after_a_refused_one_is_taken(
    client: Client, gateway: Gateway, config_path: Path, base_url: str
) -> None:
    write(config_path, "[manager\n")
    assert reload_config(gateway, config_path) is False
    write(config_path, config_text(base_url, ("alpha", "beta")))
    assert reload_config(gateway, config_path) is True
    assert (await post(client, KEY_B, "B-1"))[0] == 200


# (c) a request in flight finishes on the configuration it started with


async def test_request_in_flight_finishes_on_the_old_config(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    fake = SlowManager()
    upstream = await aiohttp_server(fake.app())
    url = f"http://127.0.0.1:{upstream.port}"
    path = tmp_path / "gateway.toml"
    write(path, config_text(url, ("alpha", "beta")))
    gateway = create_gateway(load_config(path))
    client = await aiohttp_client(create_app(gateway.runtime.config, gateway=gateway))

    in_flight = asyncio.create_task(post(client, KEY_B, "B-1"))
    try:
        await asyncio.wait_for(fake.called.wait(), 5)
        write(path, config_text(url, ("alpha",)))  # beta removed while its request waits
        assert reload_config(gateway, path) is True
        assert "beta" not in gateway.runtime.config.partners
        assert (await post(client, KEY_B, "B-2"))[0] == 401
        assert not in_flight.done()
    finally:
        fake.release.set()
    status, body = await in_flight
    assert (status, body["id"], body["external_reference"]) == (200, "fake-1", "B-1")
    assert fake.calls == 1


# Bugs found while writing these tests


async def test_reload_to_another_manager_fetches_tokens_there(
    aiohttp_server: AiohttpServer,
    client: Client,
    gateway: Gateway,
    config_path: Path,
    manager: SandboxState,
) -> None:
    assert (await post(client, KEY_A, "A-1"))[0] == 200
    other = await aiohttp_server(create_sandbox_app())  # same org and key, its own signing secret
    other_state = other.app[SANDBOX_KEY]
    write(config_path, config_text(f"http://127.0.0.1:{other.port}"))
    assert reload_config(gateway, config_path)
    status, body = await post(client, KEY_A, "A-2")
    assert status == 200, body
    assert len(other_state.received) == 1
    assert other_state.token_requests == 1
    assert len(manager.received) == 1


class MonotonicClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_reload_that_raises_ttl_keeps_records_longer(
    aiohttp_client: AiohttpClient, tmp_path: Path, base_url: str, manager: SandboxState
) -> None:
    clock = MonotonicClock()
    path = tmp_path / "gateway.toml"
    write(path, config_text(base_url, ttl_hours=1))
    config = load_config(path)
    seams = Seams(monotonic=clock)
    gateway = create_gateway(config, seams)
    client = await aiohttp_client(create_app(config, seams, gateway=gateway))
    write(path, config_text(base_url, ttl_hours=2))
    assert reload_config(gateway, path)
    assert (await post(client, KEY_A, "A-1"))[0] == 200
    clock.now += 1.5 * 3600  # within the new ttl of 2 h
    async with client.post(ORDER_PATH, json=order("A-1"), headers={"apikey": KEY_A}) as resp:
        assert resp.status == 200
        assert resp.headers.get("Idempotent-Replayed") == "true"
    assert len(manager.received) == 1


# (d) the real process: SIGHUP reloads, a broken file is refused, SIGTERM exits 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def poll(check: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Call the async ``check`` until it returns something truthy, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    for _ in range(int(timeout_s / interval_s) + 1):
        with contextlib.suppress(aiohttp.ClientError):
            last = await check()
            if last:
                return last
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s (last: {last!r})")


async def test_serve_process_reloads_on_sighup_and_exits_0_on_sigterm(
    sandbox: TestServer, manager: SandboxState, base_url: str, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    path = tmp_path / "gateway.toml"
    server = f'host = "127.0.0.1"\nport = {port}\nadmin_port = {admin_port}'
    write(path, config_text(base_url, server=server))
    out_path = tmp_path / "gateway.out"
    env = {**os.environ, KEY_ENV: DEMO_ORG_KEY}
    env.pop("GATEWAY_CONFIG", None)
    gateway_url = f"http://127.0.0.1:{port}"
    admin_url = f"http://127.0.0.1:{admin_port}"
    references = iter(f"P-{i}" for i in range(1000))

    async with aiohttp.ClientSession() as http:

        async def order_status(key: str) -> int:
            async with http.post(
                gateway_url + ORDER_PATH, json=order(next(references)), headers={"apikey": key}
            ) as resp:
                return resp.status

        async def readyz() -> dict[str, Any] | None:
            async with http.get(admin_url + "/readyz") as resp:
                return await resp.json() if resp.status == 200 else None

        with out_path.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", str(path),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=env, cwd=REPO_ROOT,
            )  # fmt: skip
        try:
            first = await poll(readyz)
            assert first["status"] == "ready"
            assert await order_status(KEY_A) == 200
            assert await order_status(KEY_B) == 401

            write(path, config_text(base_url, ("alpha", "beta"), server=server))
            proc.send_signal(signal.SIGHUP)
            await poll(lambda: _equals(order_status(KEY_B), 200))
            second = await readyz()
            assert second is not None
            assert second["config"] != first["config"]

            write(path, "[server]\nbogus = 1\n")
            proc.send_signal(signal.SIGHUP)
            await poll(_contains(out_path, "config_reload_refused"))
            assert proc.returncode is None
            assert await order_status(KEY_A) == 200
            assert await order_status(KEY_B) == 200
            assert await readyz() == second

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    log = read(out_path)
    assert "config_reloaded" in log
    assert DEMO_ORG_KEY not in log
    assert KEY_A not in log and KEY_B not in log
    assert len(manager.received) == 4


async def _equals(awaitable: Any, expected: object) -> bool:
    return bool(await awaitable == expected)


def _contains(path: Path, text: str) -> Any:
    async def check() -> bool:
        return text in read(path)

    return check


async def test_reload_that_changes_the_state_backend_is_refused(
    client: Client,
    gateway: Gateway,
    config_path: Path,
    base_url: str,
    log_stream: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELOAD_REDIS_URL", "redis://127.0.0.1:1/0")  # never connected to
    before = gateway.runtime
    write(
        config_path,
        config_text(
            base_url, extra='\n[state]\nbackend = "redis"\nredis_url_env = "RELOAD_REDIS_URL"\n'
        ),
    )

    assert reload_config(gateway, config_path) is False

    assert gateway.runtime is before
    [refusal] = [e for e in log_events(log_stream) if e["event"] == "config_reload_refused"]
    assert "state" in refusal["reason"] and "restart" in refusal["reason"]
    assert (await post(client, KEY_A, "AFTER-STATE"))[0] == 200


async def test_reload_that_turns_the_outbox_on_is_refused(
    client: Client,
    gateway: Gateway,
    config_path: Path,
    base_url: str,
    log_stream: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("RELOAD_OUTBOX_KEY", new_key())
    before = gateway.runtime
    extra = (
        f'\n[outbox]\nenabled = true\npath = "{tmp_path / "outbox.db"}"\n'
        'key_env = "RELOAD_OUTBOX_KEY"\n'
    )
    write(config_path, config_text(base_url, extra=extra))

    assert reload_config(gateway, config_path) is False

    assert gateway.runtime is before and gateway.outbox is None
    [refusal] = [e for e in log_events(log_stream) if e["event"] == "config_reload_refused"]
    assert "outbox" in refusal["reason"] and "restart" in refusal["reason"]
    assert not (tmp_path / "outbox.db").exists()


async def test_reload_applies_a_new_log_level(
    client: Client, gateway: Gateway, config_path: Path, base_url: str, log_stream: io.StringIO
) -> None:
    write(config_path, config_text(base_url).replace('level = "info"', 'level = "warning"'))

    assert reload_config(gateway, config_path) is True

    assert logging.getLogger(LOGGER_NAME).level == logging.WARNING


async def test_reload_applies_the_body_deadline_and_says_the_headers_one_needs_a_restart(
    gateway: Gateway, config_path: Path, base_url: str, log_stream: io.StringIO
) -> None:
    write(config_path, config_text(base_url, server="admin_port = 0\nread_timeout_s = 7"))

    assert reload_config(gateway, config_path) is True

    assert gateway.runtime.config.server.read_timeout_s == 7
    events = [e for e in log_events(log_stream) if e["event"] == "config_change_needs_restart"]
    assert [e["reason"] for e in events] == ["server ports, read_timeout_s or max_entries"]
