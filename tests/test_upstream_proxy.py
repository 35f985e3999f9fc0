"""The outbound proxy for Manager calls: the pure decisions, then the whole gateway through a
real proxy process (proxy.py) on loopback, with the sandbox as Manager.

Every process here listens on 127.0.0.1; the proxy is started by the test and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import REPO_ROOT
from test_cli import free_port, wait_for

from gateway.app import Seams, create_app
from gateway.auth import hash_key
from gateway.config import load_config, parse_config
from gateway.gateway import GATEWAY_KEY
from gateway.observability import Metrics
from gateway.sandbox import DEMO_ORG_ID, DEMO_ORG_KEY, DEMO_SHOP_ID, SANDBOX_KEY, create_sandbox_app
from gateway.server import reload_config
from gateway.upstream_proxy import (
    EnvProxy,
    ProxyUrlError,
    describe_proxy,
    is_proxy_bypassed,
    parse_proxy_url,
    select_env_proxy,
)

PARTNER_KEY = "proxied-partner-key-0123456789"
ORDER_PATH = "/api/v1/external-order"
PDF = b"%PDF-1.4\n" + b"0" * 1024 + b"\n%%EOF\n"
PROXY_USER, PROXY_PASSWORD = "gw", "proxy-secret-0123"

ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


# --- pure decisions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://proxy.example:3128", "https://proxy.example", "http://10.0.0.1:8080/", " http://p:1 "],
)
def test_proxy_url_with_scheme_host_and_port_is_accepted(url: str) -> None:
    assert parse_proxy_url(url, allow_credentials=False) == url.strip()


@pytest.mark.parametrize(
    "url",
    [
        "corp-proxy.internal:3128",
        "socks5://corp-proxy.internal:1080",
        "http://",
        "http://corp-proxy.internal:3128/path",
        "http://corp-proxy.internal:3128?x=1",
        "http://corp-proxy.internal:port",
    ],
)
def test_proxy_url_that_is_not_scheme_host_port_is_refused(url: str) -> None:
    with pytest.raises(ProxyUrlError) as info:
        parse_proxy_url(url, allow_credentials=True)
    assert "corp-proxy" not in str(info.value)


def test_proxy_credentials_are_refused_where_the_url_is_not_a_secret() -> None:
    url = "http://user:hunter2@proxy.example:3128"
    with pytest.raises(ProxyUrlError) as info:
        parse_proxy_url(url, allow_credentials=False)
    assert "hunter2" not in str(info.value) and "proxy_url_env" in str(info.value)
    assert parse_proxy_url(url, allow_credentials=True) == url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (None, "direct"),
        ("http://user:hunter2@proxy.example:3128", "via proxy http://proxy.example:3128"),
        ("https://proxy.example", "via proxy https://proxy.example"),
        ("http://[fd00::1]:8080", "via proxy http://[fd00::1]:8080"),
    ],
)
def test_proxy_description_never_shows_credentials(url: str | None, expected: str) -> None:
    assert describe_proxy(url) == expected


@pytest.mark.parametrize(
    ("target", "environ", "expected"),
    [
        ("https://m.example", {"HTTPS_PROXY": "http://p:1"}, EnvProxy("HTTPS_PROXY", "http://p:1")),
        ("https://m.example", {"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:1"},
         EnvProxy("https_proxy", "http://a:1")),
        ("http://m.example", {"HTTP_PROXY": "http://p:1"}, EnvProxy("HTTP_PROXY", "http://p:1")),
        # The scheme of the Manager URL picks the variable.
        ("https://m.example", {"HTTP_PROXY": "http://p:1"}, None),
        ("http://m.example", {"HTTPS_PROXY": "http://p:1"}, None),
        ("https://m.example", {"HTTPS_PROXY": "  "}, None),
        ("https://m.example", {}, None),
        ("https://m.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "m.example"}, None),
        ("https://m.example", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, None),
        ("https://m.example", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.example"},
         EnvProxy("HTTPS_PROXY", "http://p:1")),
    ],
)  # fmt: skip
def test_environment_proxy_is_chosen_by_scheme_and_no_proxy(
    target: str, environ: Mapping[str, str], expected: EnvProxy | None
) -> None:
    assert select_env_proxy(target, environ) == expected


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "bypassed"),
    [
        ("manager.example", 443, "manager.example", True),
        ("api.manager.example", 443, "manager.example", True),
        ("api.manager.example", 443, ".manager.example", True),
        ("api.manager.example", 443, "*.manager.example", True),
        ("badmanager.example", 443, "manager.example", False),
        ("Manager.Example.", 443, " other , MANAGER.example ", True),
        ("manager.example", 443, "manager.example:443", True),
        ("manager.example", 8443, "manager.example:443", False),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("10.1.2.3", 443, "10.1.2.3", True),
        ("11.1.2.3", 443, "10.0.0.0/8", False),
        ("fd00::5", 443, "fd00::/8", True),
        ("::1", 8080, "[::1]:8080", True),
        ("::1", 8080, "::1", True),
        ("manager.example", 443, "10.0.0.0/8,,", False),
        ("10.1.2.3", 443, "not-a-network/99", False),
        ("manager.example", 443, "", False),
        ("manager.example", 443, "*", True),
    ],
)
def test_no_proxy_matches_hosts_suffixes_ports_and_networks(
    host: str, port: int, no_proxy: str, bypassed: bool
) -> None:
    assert is_proxy_bypassed(host, port, no_proxy) is bypassed


# --- the whole gateway through a real proxy process ------------------------------------------


@dataclass
class LoopbackProxy:
    """A proxy.py process on 127.0.0.1 whose plugin writes every proxied request to ``log``."""

    process: asyncio.subprocess.Process
    port: int
    log: Path
    credentials: str | None

    @property
    def url(self) -> str:
        userinfo = f"{self.credentials}@" if self.credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines() if self.log.exists() else []

    async def stop(self) -> None:
        """SIGTERM to the proxy's own PID (it stops its workers), SIGKILL if it lingers."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


StartProxy = Callable[..., Awaitable[LoopbackProxy]]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    started: list[LoopbackProxy] = []

    async def start(*, basic_auth: bool = False) -> LoopbackProxy:
        index = len(started)
        port_file, log = tmp_path / f"proxy{index}.port", tmp_path / f"proxy{index}.requests"
        credentials = f"{PROXY_USER}:{PROXY_PASSWORD}" if basic_auth else None
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT / "tests"),  # proxy_plugin.py
            "GATEWAY_TEST_PROXY_LOG": str(log),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), "--num-workers", "1", "--num-acceptors", "1",
            "--plugins", "proxy_plugin.RequestLogPlugin",
            "--log-file", str(tmp_path / f"proxy{index}.log"),
            *(["--basic-auth", credentials] if credentials else []),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        proxy = LoopbackProxy(process, 0, log, credentials)
        started.append(proxy)

        async def listening() -> bool:
            assert process.returncode is None, "the proxy exited"
            text = port_file.read_text(encoding="ascii").strip() if port_file.exists() else ""
            if not text:
                return False
            proxy.port = int(text)
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.close()
                await writer.wait_closed()
                return True
            return False

        await wait_for(listening, "the proxy to listen", within_s=20)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


class PdfHost:
    def __init__(self) -> None:
        self.hits = 0
        self.app = web.Application()
        self.app.router.add_get("/rx.pdf", self.pdf)

    async def pdf(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=PDF, content_type="application/pdf")


def proxied_config(sandbox_port: int, pdf_port: int, manager_lines: str) -> str:
    return f"""
[server]
admin_port = 0

[manager]
base_url = "http://127.0.0.1:{sandbox_port}"
timeout_s = 5
{manager_lines}

[shops.demo]
org_id = "{DEMO_ORG_ID}"
shop_id = "{DEMO_SHOP_ID}"
manager_key_env = "ORG_KEY"

[partners.clinic]
shop = "demo"
key_sha256 = "{hash_key(PARTNER_KEY)}"
pdf = "fetch"

[pdf]
allow_http = true
allow_ports = [{pdf_port}]
allow_networks = ["127.0.0.0/8"]
timeout_s = 5
"""


@dataclass
class Scene:
    sandbox: TestServer
    pdf_server: TestServer
    pdf_host: PdfHost
    aiohttp_client: ClientFactory

    async def gateway(
        self, manager_lines: str, environ: Mapping[str, str] | None = None
    ) -> TestClient[Any, Any]:
        assert self.sandbox.port is not None and self.pdf_server.port is not None
        text = proxied_config(self.sandbox.port, self.pdf_server.port, manager_lines)
        config = parse_config(text, environ={"ORG_KEY": DEMO_ORG_KEY, **(environ or {})})
        return await self.aiohttp_client(create_app(config, Seams(metrics=Metrics())))

    def received(self) -> list[dict[str, Any]]:
        return [r["envelope"] for r in self.sandbox.app[SANDBOX_KEY].received]

    def to_manager(self, proxy: LoopbackProxy) -> list[str]:
        return [line for line in proxy.requests() if f"127.0.0.1:{self.sandbox.port} " in line]

    def to_pdf_host(self, proxy: LoopbackProxy) -> list[str]:
        return [line for line in proxy.requests() if f"127.0.0.1:{self.pdf_server.port} " in line]


@pytest.fixture
async def scene(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> Scene:
    pdf_host = PdfHost()
    return Scene(
        await aiohttp_server(create_sandbox_app(), host="127.0.0.1"),
        await aiohttp_server(pdf_host.app, host="127.0.0.1"),
        pdf_host,
        aiohttp_client,
    )


async def post(client: TestClient[Any, Any], reference: str, **fields: object) -> Any:
    body = {
        "external_reference": reference,
        "customer_name": "Erika Musterfrau",
        "items": [{"name": "Ibuprofen 400", "quantity": 1}],
        **fields,
    }
    async with client.post(ORDER_PATH, json=body, headers={"apikey": PARTNER_KEY}) as response:
        return response.status, await response.json()


async def test_manager_calls_go_through_the_configured_proxy_with_its_credentials(
    scene: Scene, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(basic_auth=True)
    client = await scene.gateway('proxy_url_env = "MANAGER_PROXY"', {"MANAGER_PROXY": proxy.url})

    status, body = await post(client, "PX-1")

    assert status == 200, body
    assert [e["external_reference"] for e in scene.received()] == ["PX-1"]
    paths = scene.to_manager(proxy)
    # Both the token exchange and the order request went through the proxy.
    assert any(line.startswith("POST") and "/auth/token" in line for line in paths), paths
    assert any(line.startswith("POST") and "/order-requests" in line for line in paths), paths

    # Without the proxy, Manager cannot be reached: nothing goes around it.
    await proxy.stop()
    status, body = await post(client, "PX-2")
    assert status == 502 and body["error"] == "upstream_unavailable"
    assert [e["external_reference"] for e in scene.received()] == ["PX-1"]


async def test_a_proxy_that_wants_credentials_refuses_a_gateway_without_them(
    scene: Scene, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(basic_auth=True)
    client = await scene.gateway(f'proxy_url = "http://127.0.0.1:{proxy.port}"')

    status, body = await post(client, "PX-3")

    assert status >= 500 and body["error"].startswith("upstream_"), body
    assert scene.received() == []


async def test_trust_env_takes_the_proxy_from_the_environment_and_honours_no_proxy(
    scene: Scene, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy()
    proxied = await scene.gateway("trust_env = true", {"HTTP_PROXY": proxy.url})
    status, _ = await post(proxied, "ENV-1")
    assert status == 200
    through_proxy = scene.to_manager(proxy)
    assert through_proxy

    direct = await scene.gateway(
        "trust_env = true", {"HTTP_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"}
    )
    status, _ = await post(direct, "ENV-2")
    assert status == 200
    assert [e["external_reference"] for e in scene.received()] == ["ENV-1", "ENV-2"]
    assert scene.to_manager(proxy) == through_proxy  # ENV-2 went direct


async def test_pdf_fetches_never_use_the_proxy_even_when_configured_and_in_the_environment(
    scene: Scene, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await start_proxy()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = await scene.gateway(f'proxy_url = "{proxy.url}"')
    pdf_url = f"http://127.0.0.1:{scene.pdf_server.port}/rx.pdf"

    status, body = await post(client, "RX-1", prescription_pdf_url=pdf_url)

    assert status == 200, body
    assert scene.pdf_host.hits == 1
    assert scene.received()[0]["payload"]["prescription_pdf_base64"]
    assert scene.to_manager(proxy), "the Manager call should have used the proxy"
    assert scene.to_pdf_host(proxy) == []  # the PDF host was reached by the gateway itself


async def test_a_reload_that_adds_a_proxy_sends_later_manager_calls_through_it(
    scene: Scene, start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await start_proxy()
    assert scene.sandbox.port is not None and scene.pdf_server.port is not None
    ports = (scene.sandbox.port, scene.pdf_server.port)
    monkeypatch.setenv("ORG_KEY", DEMO_ORG_KEY)
    path = tmp_path / "gateway.toml"
    path.write_text(proxied_config(*ports, ""), encoding="utf-8")
    client = await scene.aiohttp_client(create_app(load_config(path), Seams(metrics=Metrics())))
    status, _ = await post(client, "RL-1")
    assert status == 200 and scene.to_manager(proxy) == []

    path.write_text(proxied_config(*ports, f'proxy_url = "{proxy.url}"'), encoding="utf-8")
    assert reload_config(client.server.app[GATEWAY_KEY], path)
    status, _ = await post(client, "RL-2")

    assert status == 200
    assert any("/order-requests" in line for line in scene.to_manager(proxy))
    assert [e["external_reference"] for e in scene.received()] == ["RL-1", "RL-2"]


async def test_check_config_names_the_proxy_without_its_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cli import main

    port = free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(proxied_config(port, port, 'proxy_url_env = "MANAGER_PROXY"'), "utf-8")
    monkeypatch.setenv("ORG_KEY", DEMO_ORG_KEY)
    monkeypatch.setenv("MANAGER_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@proxy.corp:3128")

    assert main(["check-config", "--config", str(path)]) == 0

    out = capsys.readouterr().out
    assert "via proxy http://proxy.corp:3128" in out
    assert PROXY_PASSWORD not in out and PROXY_USER + ":" not in out
