"""Shared fixtures for the end-to-end tests: the Manager sandbox, a test configuration, the gateway,
and a ``redis-server`` of the tests' own (per module that asks for it).

Everything listens on 127.0.0.1. Time is a fake clock shared by the sandbox and the gateway; the
gateway's sleep only records its delays.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import Seams, create_admin_app, create_app, create_gateway
from gateway.auth import hash_key
from gateway.config import Config, parse_config
from gateway.gateway import GATEWAY_KEY, Gateway
from gateway.observability import LOGGER_NAME, setup_logging
from gateway.outbox.sealing import new_key as new_outbox_key
from gateway.sandbox import (
    DEMO_ORG_ID,
    DEMO_ORG_KEY,
    DEMO_SHOP_ID,
    SANDBOX_KEY,
    SandboxOrg,
    SandboxState,
    create_sandbox_app,
)

Client = TestClient[web.Request, web.Application]
TomlValue = str | int | float | bool | Sequence[str]

REPO_ROOT = Path(__file__).resolve().parents[1]


def is_loopback_host(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str) or host == "localhost":
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The network rule, enforced: no test resolves a name that is not loopback.

    A refused look-up is recorded and fails the test at teardown, because the code under test
    may turn the error into an ordinary answer (prescription_pdf_unreachable, say).
    """
    real = socket.getaddrinfo
    refused: list[object] = []

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is None or is_loopback_host(host):
            return real(host, *args, **kwargs)
        refused.append(host)
        raise OSError(f"test network rule: {host!r} is not a loopback address")

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert not refused, f"a test tried to resolve non-loopback hosts: {refused}"


SAMPLES = REPO_ROOT / "samples"
ORDER_PATH = "/api/v1/external-order"
START = 1_700_000_000.0
SANDBOX_SECRET = b"telemed-gateway-e2e-sandbox-secret-0123456789"

OTHER_ORG_ID = "other-org"
OTHER_ORG_KEY = "other-org-key-for-tests"
READER_ORG_ID = "reader-org"
READER_SHOP_ID = "reader-shop"
READER_ORG_KEY = "reader-org-key-for-tests"
SANDBOX_ORGS = (
    SandboxOrg(DEMO_ORG_ID, frozenset({DEMO_SHOP_ID}), frozenset({DEMO_ORG_KEY})),
    SandboxOrg(OTHER_ORG_ID, frozenset({"other-shop"}), frozenset({OTHER_ORG_KEY})),
    # An org whose tokens lack order_requests.write.
    SandboxOrg(
        READER_ORG_ID,
        frozenset({READER_SHOP_ID}),
        frozenset({READER_ORG_KEY}),
        scopes=("orders.read",),
    ),
)

HOSTED_HOST = "shop.example.test"
ORG_KEYS_HOST = "orgkeys.example.test"
ENVIRON: Mapping[str, str] = {
    "TEST_ORG_KEY": DEMO_ORG_KEY,
    "TEST_OTHER_ORG_KEY": OTHER_ORG_KEY,
    "TEST_READER_ORG_KEY": READER_ORG_KEY,
}
# Partner name → its key. Each partner's shop is set in PARTNER_TABLES.
KEYS: Mapping[str, str] = {
    "acme": "acme-partner-key-0123456789",
    "fwd": "fwd-partner-key-0123456789",
    "legacy": "legacy-partner-key-0123456789",
    "hosted": "hosted-partner-key-0123456789",
    "strict": "strict-partner-key-0123456789",
    "drx": "drx-partner-key-0123456789",
    "mismatch": "mismatch-partner-key-0123456789",
    "reader": "reader-partner-key-0123456789",
}
SHOP_TABLES: Mapping[str, Mapping[str, TomlValue]] = {
    "main": {"org_id": DEMO_ORG_ID, "shop_id": DEMO_SHOP_ID, "manager_key_env": "TEST_ORG_KEY"},
    "legacy": {
        "org_id": DEMO_ORG_ID,
        "shop_id": DEMO_SHOP_ID,
        "manager_key_env": "TEST_ORG_KEY",
        "api": "v1",
    },
    "hosted": {
        "org_id": DEMO_ORG_ID,
        "shop_id": DEMO_SHOP_ID,
        "manager_key_env": "TEST_ORG_KEY",
        "hosts": [HOSTED_HOST],
    },
    "orgkeys": {
        "org_id": DEMO_ORG_ID,
        "shop_id": DEMO_SHOP_ID,
        "hosts": [ORG_KEYS_HOST],
        "accept_org_keys": True,
    },
    # The key of another org: Manager answers org_mismatch.
    "mismatch": {
        "org_id": DEMO_ORG_ID,
        "shop_id": DEMO_SHOP_ID,
        "manager_key_env": "TEST_OTHER_ORG_KEY",
    },
    "reader": {
        "org_id": READER_ORG_ID,
        "shop_id": READER_SHOP_ID,
        "manager_key_env": "TEST_READER_ORG_KEY",
    },
}
PARTNER_TABLES: Mapping[str, Mapping[str, TomlValue]] = {
    "acme": {"shop": "main"},
    "fwd": {"shop": "main", "pdf": "forward"},
    "legacy": {"shop": "legacy"},
    "hosted": {"shop": "hosted"},
    "strict": {"shop": "main", "require_reference": True},
    "drx": {"shop": "main", "profile": "drx", "pdf": "forward"},
    "mismatch": {"shop": "mismatch"},
    "reader": {"shop": "reader"},
}


def toml_value(value: TomlValue) -> str:
    """A Python value as TOML (strings, numbers, booleans, lists of strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(json.dumps(v) for v in value) + "]"


def toml_table(name: str, values: Mapping[str, TomlValue]) -> str:
    lines = [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def gateway_toml(
    base_url: str,
    *,
    server: Mapping[str, TomlValue] | None = None,
    manager: Mapping[str, TomlValue] | None = None,
    extra: Mapping[str, Mapping[str, TomlValue]] | None = None,
) -> str:
    """The test configuration's TOML for a Manager at ``base_url``; sections can be overridden,
    and ``extra`` tables (``{"outbox": {...}}``, ``{"shops.x": {...}}``) are appended."""
    server_table: dict[str, TomlValue] = {"host": "127.0.0.1", "port": 0, **(server or {})}
    manager_table: dict[str, TomlValue] = {
        "base_url": base_url,
        "api": "v2",
        "timeout_s": 5,
        "retries": 3,
        **(manager or {}),
    }
    parts = [toml_table("server", server_table), toml_table("manager", manager_table)]
    parts += [toml_table(f"shops.{name}", table) for name, table in SHOP_TABLES.items()]
    for name, table in PARTNER_TABLES.items():
        parts.append(toml_table(f"partners.{name}", {**table, "key_sha256": hash_key(KEYS[name])}))
    parts.append((SAMPLES / "nested-partner.profile.toml").read_text(encoding="utf-8"))
    parts += [toml_table(name, table) for name, table in (extra or {}).items()]
    return "\n".join(parts)


def load_test_config(
    base_url: str,
    *,
    environ: Mapping[str, str] | None = None,
    **sections: Mapping[str, Any] | None,
) -> Config:
    return parse_config(gateway_toml(base_url, **sections), environ={**ENVIRON, **(environ or {})})


def load_sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text(encoding="utf-8"))
    return data


def flat_order(**fields: object) -> dict[str, object]:
    """A small valid flat order; ``fields`` override or add top-level fields."""
    body: dict[str, object] = {
        "customer_name": "Erika Musterfrau",
        "items": [{"name": "Ibuprofen 400", "quantity": 2, "price": 4.5}],
    }
    body.update(fields)
    return body


@dataclass
class FakeTime:
    """A clock moved by hand and a sleep that records its delays (and may move the clock)."""

    now: float = START
    delays: list[float] = field(default_factory=list)
    advance_on_sleep: bool = False

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.advance_on_sleep:
            self.now += delay


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]


async def post_order(
    client: Client,
    body: object,
    *,
    key: str | None = KEYS["acme"],
    headers: Mapping[str, str] | None = None,
    path: str = ORDER_PATH,
) -> Reply:
    """POST ``body`` as JSON with the key in ``apikey`` (``key=None``: no key)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["apikey"] = key
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    # aiohttp warns about large raw bytes bodies; a BytesIO is sent with a Content-Length too.
    data: bytes | io.BytesIO = io.BytesIO(raw) if len(raw) > 65536 else raw
    async with client.post(path, data=data, headers=all_headers) as response:
        return await read_reply(response)


async def read_reply(response: Any) -> Reply:
    raw = await response.read()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return Reply(response.status, parsed, response.headers)


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The contract's JSON error: status, code, a request id equal to the X-Request-ID header."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.body
    assert isinstance(body, dict)
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert body["request_id"] and body["request_id"] == reply.headers["X-Request-ID"]
    assert set(body) <= {"error", "message", "request_id", "details"}
    return body


@dataclass
class GatewayHarness:
    client: Client
    gateway: Gateway
    config: Config


MakeGateway = Callable[..., Awaitable[GatewayHarness]]
StartSandbox = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def start_sandbox(aiohttp_server: AiohttpServer, fake_time: FakeTime) -> StartSandbox:
    """Starts a sandbox on loopback (default: the fake clock, tokens of one hour)."""

    async def start(
        *, token_ttl_s: int = 3600, clock: Callable[[], float] | None = None
    ) -> TestServer:
        app = create_sandbox_app(
            orgs=SANDBOX_ORGS,
            token_ttl_s=token_ttl_s,
            secret=SANDBOX_SECRET,
            clock=clock or fake_time.clock,
        )
        return await aiohttp_server(app, host="127.0.0.1")

    return start


@pytest.fixture
async def sandbox(start_sandbox: StartSandbox) -> TestServer:
    return await start_sandbox()


@pytest.fixture
def sandbox_state(sandbox: TestServer) -> SandboxState:
    return sandbox.app[SANDBOX_KEY]


def base_url_of(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def make_gateway(
    aiohttp_client: AiohttpClient, sandbox: TestServer, fake_time: FakeTime
) -> MakeGateway:
    """Builds the partner app (in front of the sandbox unless ``base_url`` says otherwise)."""

    async def make(
        *,
        base_url: str | None = None,
        server: Mapping[str, TomlValue] | None = None,
        manager: Mapping[str, TomlValue] | None = None,
        extra: Mapping[str, Mapping[str, TomlValue]] | None = None,
        environ: Mapping[str, str] | None = None,
        seams: Mapping[str, Any] | None = None,
    ) -> GatewayHarness:
        """``extra`` tables and ``environ`` variables go into the configuration; ``seams``
        overrides :class:`Seams` fields (``deliverer_poll_s``, ``outbox_max_pages``, …)."""
        config = load_test_config(
            base_url or base_url_of(sandbox),
            server=server or {},
            manager=manager or {},
            extra=extra,
            environ=environ,
        )
        seams = Seams(
            clock=fake_time.clock, sleep=fake_time.sleep, rand=lambda: 0.5, **(seams or {})
        )
        client = await aiohttp_client(create_app(config, seams))
        return GatewayHarness(client, client.server.app[GATEWAY_KEY], config)

    return make


@pytest.fixture
async def gateway_client(make_gateway: MakeGateway) -> Client:
    """The partner app in front of the sandbox, with the admin endpoints on the same port."""
    return (await make_gateway(server={"admin_port": 0})).client


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The gateway's JSON log (debug level) in a buffer; logging is restored afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    names = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client")
    levels = {name: logging.getLogger(name).level for name in names}
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream)
    try:
        yield stream
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class FakeManager:
    """A scripted Manager: answers order requests with ``statuses`` in turn, records each call."""

    statuses: list[int]
    calls: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    token_requests: int = 0

    async def order_request(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls.append((request.path, dict(request.headers), body))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            reference = json.loads(body).get("external_reference")
            return web.json_response(
                {"id": "fake-1", "external_reference": reference, "status": "pending"}
            )
        return web.json_response({"error": "scripted"}, status=status)

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        return web.json_response({"access_token": "fake-token", "expires_in": 3600})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/{api}/public/orgs/{org}/order-requests", self.order_request)
        app.router.add_post("/api/v2/public/orgs/{org}/auth/token", self.token)
        return app


StartFakeManager = Callable[[list[int]], Awaitable[tuple[FakeManager, str]]]


@pytest.fixture
def start_fake_manager(aiohttp_server: AiohttpServer) -> StartFakeManager:
    """Starts a :class:`FakeManager` on loopback; returns it and its base URL."""

    async def start(statuses: list[int]) -> tuple[FakeManager, str]:
        fake = FakeManager(list(statuses))
        server = await aiohttp_server(fake.app(), host="127.0.0.1")
        return fake, base_url_of(server)

    return start


SLOW_MANAGER_SECRET = b"fake-manager-signing-secret-32-bytes-long!"


class SlowManager:
    """A scripted Manager: tokens on demand; order requests wait for ``release`` before a 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.called = asyncio.Event()
        self.calls = 0
        self.token_calls = 0
        self.references: list[object] = []

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        now = int(time.time())
        claims = {"org_id": request.match_info["org_id"], "scopes": ["order_requests.write"]}
        token = jwt.encode({**claims, "iat": now, "exp": now + 3600}, SLOW_MANAGER_SECRET, "HS256")
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        )

    async def order_request(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.called.set()
        envelope = await request.json()
        self.references.append(envelope["external_reference"])
        await self.release.wait()
        return web.json_response(
            {
                "id": f"fake-{self.calls}",
                "external_reference": envelope["external_reference"],
                "message": "Order request received.",
                "status": "pending",
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        base = "/api/v2/public/orgs/{org_id}"
        app.router.add_post(f"{base}/auth/token", self.token)
        app.router.add_post(f"{base}/order-requests", self.order_request)
        return app


# --- a redis-server of the tests' own -----------------------------------------------------------

REDIS_START_S: Final = 5.0
REDIS_POLL_S: Final = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, without persistence; stopped and started on one port."""

    def __init__(self, executable: str, port: int) -> None:
        self.executable = executable
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running
        self.process = subprocess.Popen(
            [
                self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(int(REDIS_START_S / REDIS_POLL_S)):
            if self.command(b"PING") == b"+PONG":
                return
            try:  # waits (bounded) and notices a server that exited, e.g. on a taken port
                code = self.process.wait(timeout=REDIS_POLL_S)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"redis-server on port {self.port} exited with {code}")
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def command(self, name: bytes) -> bytes | None:
        """One inline command's first reply line (``PING``, ``FLUSHALL``); None if unreachable."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(name + b"\r\n")
                return sock.recv(256).split(b"\r\n", 1)[0]
        except OSError:
            return None


def run_redis_server() -> Iterator[RedisServer]:
    """Body of a module-scoped fixture: skip without ``redis-server`` (fail when ``$CI`` is set)."""
    executable = shutil.which("redis-server")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; CI must install it")
        pytest.skip("redis-server is not installed")
    server = RedisServer(executable, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A ``redis-server`` for each test module that asks for one (its tests share it)."""
    yield from run_redis_server()


def fresh_redis(server: RedisServer) -> str:
    """The URL of ``server``, running and empty (a previous test may have stopped it)."""
    if not server.running:
        server.start()
    assert server.command(b"FLUSHALL") == b"+OK"
    return server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The module's Redis, running and emptied for this test."""
    return fresh_redis(redis_server)


ADMIN_TOKEN = "operator-console-token-0123456789"
OUTBOX_KEY = new_outbox_key()


@dataclass
class ConsoleHarness:
    """The partner app and the admin app (with the console) over one gateway, outbox on."""

    partner: Client
    admin: Client
    gateway: Gateway
    config: Config

    async def deliver(self) -> int:
        """One round of the outbox's deliverer (the tests run it by hand)."""
        assert self.gateway.outbox is not None
        return await self.gateway.outbox.run_once(
            self.gateway.runtime.targets, self.gateway.manager
        )

    async def log_in(self, token: str = ADMIN_TOKEN) -> None:
        async with self.admin.post(
            "/console/login", data={"token": token}, allow_redirects=False
        ) as response:
            assert response.status == 303


MakeConsole = Callable[..., Awaitable[ConsoleHarness]]


@pytest.fixture
def make_console(
    aiohttp_client: AiohttpClient, sandbox: TestServer, fake_time: FakeTime, tmp_path: Path
) -> MakeConsole:
    """A gateway with the outbox (SQLite in ``tmp_path``) in front of the sandbox, its partner
    app and its admin app; ``token=False``: no operator token (read-only console)."""

    async def make(
        *,
        token: bool = True,
        outbox: bool = True,
        max_age_hours: float = 1,
        redis_url: str | None = None,
    ) -> ConsoleHarness:
        server: dict[str, TomlValue] = {"admin_port": 9091}
        if token:
            server["admin_token_env"] = "TEST_ADMIN_TOKEN"
        text = gateway_toml(base_url_of(sandbox), server=server, manager={"retries": 0})
        if redis_url is not None:  # the outbox (and all state) in Redis
            text += toml_table("state", {"backend": "redis", "redis_url_env": "TEST_REDIS_URL"})
        if outbox:
            text += toml_table(
                "outbox",
                {
                    "enabled": True,
                    "path": str(tmp_path / "outbox.db"),
                    "key_env": "TEST_OUTBOX_KEY",
                    "max_age_hours": max_age_hours,
                    "retry_min_s": 1,
                },
            )
        environ = {
            **ENVIRON,
            "TEST_ADMIN_TOKEN": ADMIN_TOKEN,
            "TEST_OUTBOX_KEY": OUTBOX_KEY,
            "TEST_REDIS_URL": redis_url or "",
        }
        config = parse_config(text, environ=environ)
        seams = Seams(
            clock=fake_time.clock, sleep=fake_time.sleep, rand=lambda: 0.5, deliverer_poll_s=None
        )
        gateway = create_gateway(config, seams)
        partner = await aiohttp_client(create_app(config, seams, gateway=gateway))
        admin = await aiohttp_client(create_admin_app(gateway))
        return ConsoleHarness(partner, admin, gateway, config)

    return make
