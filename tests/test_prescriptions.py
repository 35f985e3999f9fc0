"""Prescriptions through the whole gateway: fetched URLs, forwarded URLs, multipart uploads.

Every server here listens on 127.0.0.1: the sandbox as Manager, an aiohttp app as the PDF host.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse, FormData, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Seams, create_app
from gateway.auth import hash_key
from gateway.config import parse_config
from gateway.observability import Metrics
from gateway.sandbox import DEMO_ORG_ID, DEMO_ORG_KEY, DEMO_SHOP_ID, SANDBOX_KEY, create_sandbox_app

PDF = b"%PDF-1.4\n" + b"0" * 2048 + b"\n%%EOF\n"
FETCH_KEY = "fetching-partner-key"
FORWARD_KEY = "forwarding-partner-key"
ORDER_PATH = "/api/v1/external-order"

ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def build_config(manager_port: int, pdf_port: int, *, networks: str, max_mb: float = 1) -> str:
    return f"""
[server]
admin_port = 0
max_body_mb = 2

[manager]
base_url = "http://127.0.0.1:{manager_port}"
timeout_s = 5

[shops.demo]
org_id = "{DEMO_ORG_ID}"
shop_id = "{DEMO_SHOP_ID}"
manager_key_env = "ORG_KEY"

[partners.fetcher]
shop = "demo"
key_sha256 = "{hash_key(FETCH_KEY)}"
pdf = "fetch"

[partners.forwarder]
shop = "demo"
key_sha256 = "{hash_key(FORWARD_KEY)}"
pdf = "forward"

[pdf]
allow_http = true
allow_ports = [{pdf_port}]
allow_networks = {networks}
max_mb = {max_mb}
timeout_s = 2
"""


class PdfHost:
    """A document host on loopback that counts what it serves."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.app = web.Application()
        self.app.router.add_get("/rx.pdf", self.pdf)
        self.app.router.add_get("/big.pdf", self.big)
        self.app.router.add_get("/page.html", self.html)

    async def pdf(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(body=PDF, content_type="application/pdf")

    async def big(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(body=b"%PDF-" + b"x" * 2_000_000, content_type="application/pdf")

    async def html(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(text="<html></html>", content_type="text/html")


@pytest.fixture
async def sandbox(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(create_sandbox_app(), host="127.0.0.1")


@pytest.fixture
async def pdf_host(aiohttp_server: ServerFactory) -> tuple[PdfHost, TestServer]:
    host = PdfHost()
    return host, await aiohttp_server(host.app, host="127.0.0.1")


async def start_gateway(
    aiohttp_client: ClientFactory,
    sandbox: TestServer,
    pdf_server: TestServer,
    *,
    networks: str = '["127.0.0.0/8"]',
    max_mb: float = 1,
) -> TestClient[Any, Any]:
    assert sandbox.port is not None and pdf_server.port is not None
    text = build_config(sandbox.port, pdf_server.port, networks=networks, max_mb=max_mb)
    config = parse_config(text, environ={"ORG_KEY": DEMO_ORG_KEY})
    return await aiohttp_client(create_app(config, Seams(metrics=Metrics())))


def received(sandbox: TestServer) -> list[dict[str, Any]]:
    return [r["envelope"] for r in sandbox.app[SANDBOX_KEY].received]


async def assert_refused(
    response: ClientResponse, sandbox: TestServer, status: int, code: str
) -> None:
    """The partner got the contract's error, and nothing reached Manager."""
    assert response.status == status
    assert (await response.json())["error"] == code
    assert received(sandbox) == []


async def test_fetched_pdf_reaches_manager_as_base64_instead_of_the_url(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    host, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    url = f"http://127.0.0.1:{server.port}/rx.pdf"
    body = {"external_reference": "RX-1", "customer_name": "A", "prescription_url": url}

    response = await client.post(ORDER_PATH, json=body, headers={"apikey": FETCH_KEY})

    assert response.status == 200, await response.text()
    payload = received(sandbox)[0]["payload"]
    assert base64.b64decode(payload["prescription_pdf_base64"]) == PDF
    assert "prescription_pdf_url" not in payload and "prescription_url" not in payload
    assert host.hits == ["/rx.pdf"]
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_pdf_fetches_total{result="ok"} 1.0' in metrics


async def test_forwarding_partner_passes_the_url_on_without_fetching(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    host, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    url = f"http://127.0.0.1:{server.port}/rx.pdf"

    response = await client.post(
        ORDER_PATH, json={"customer_name": "A", "prescription_url": url},
        headers={"apikey": FORWARD_KEY},
    )  # fmt: skip

    assert response.status == 200
    assert received(sandbox)[0]["payload"]["prescription_pdf_url"] == url
    assert host.hits == []


async def test_loopback_pdf_url_is_blocked_without_a_connection_when_not_allowed(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    host, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server, networks="[]")

    response = await client.post(
        ORDER_PATH,
        json={"customer_name": "A", "prescription_url": f"http://127.0.0.1:{server.port}/rx.pdf"},
        headers={"apikey": FETCH_KEY},
    )

    await assert_refused(response, sandbox, 422, "prescription_pdf_blocked")
    assert host.hits == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/page.html", 422, "prescription_pdf_invalid"),
        ("/missing.pdf", 422, "prescription_pdf_unreachable"),
        ("/big.pdf", 413, "payload_too_large"),
    ],
)
async def test_unusable_pdf_url_is_refused_and_nothing_is_forwarded(
    aiohttp_client: ClientFactory,
    sandbox: TestServer,
    pdf_host: tuple[PdfHost, TestServer],
    path: str,
    status: int,
    code: str,
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    url = f"http://127.0.0.1:{server.port}{path}"

    response = await client.post(
        ORDER_PATH, json={"customer_name": "A", "prescription_url": url},
        headers={"apikey": FETCH_KEY},
    )  # fmt: skip

    await assert_refused(response, sandbox, status, code)


async def test_invalid_order_never_triggers_a_download(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    host, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    url = f"http://127.0.0.1:{server.port}/rx.pdf"

    response = await client.post(
        ORDER_PATH, json={"prescription_url": url}, headers={"apikey": FETCH_KEY}
    )

    await assert_refused(response, sandbox, 422, "validation_failed")
    assert host.hits == []


def multipart(order: object, pdf: bytes | None, *, pdf_type: str = "application/pdf") -> FormData:
    form = FormData()
    form.add_field("order", json.dumps(order), content_type="application/json")
    if pdf is not None:
        # A stream, as a partner's file upload would be (large bytes objects make aiohttp warn).
        form.add_field("prescription", io.BytesIO(pdf), filename="rx.pdf", content_type=pdf_type)
    return form


async def test_multipart_upload_becomes_the_same_envelope_with_base64(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    order = {"external_reference": "MP-1", "customer_email": "max@example.com"}

    response = await client.post(
        ORDER_PATH, data=multipart(order, PDF), headers={"apikey": FORWARD_KEY}
    )

    assert response.status == 200, await response.text()
    envelope = received(sandbox)[0]
    assert envelope["external_reference"] == "MP-1"
    assert envelope["payload"]["shop_id"] == DEMO_SHOP_ID
    assert base64.b64decode(envelope["payload"]["prescription_pdf_base64"]) == PDF


@pytest.mark.parametrize(
    ("order", "pdf", "status", "code"),
    [
        ({"customer_name": "A"}, b"GIF89a not a pdf", 422, "prescription_pdf_invalid"),
        ({"customer_name": "A"}, b"%PDF-" + b"x" * 1_100_000, 413, "payload_too_large"),
        (
            {"customer_name": "A", "prescription_pdf_url": "https://x.example/a.pdf"},
            PDF,
            422,
            "validation_failed",
        ),
        ([1, 2], PDF, 400, "invalid_json"),
    ],
)
async def test_bad_multipart_upload_is_refused(
    aiohttp_client: ClientFactory,
    sandbox: TestServer,
    pdf_host: tuple[PdfHost, TestServer],
    order: object,
    pdf: bytes,
    status: int,
    code: str,
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)

    response = await client.post(
        ORDER_PATH, data=multipart(order, pdf), headers={"apikey": FORWARD_KEY}
    )

    await assert_refused(response, sandbox, status, code)


async def test_multipart_without_order_part_names_the_missing_part(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    form = FormData()
    form.add_field("prescription", PDF, filename="rx.pdf", content_type="application/pdf")

    response = await client.post(ORDER_PATH, data=form, headers={"apikey": FORWARD_KEY})

    assert response.status == 422
    body = await response.json()
    assert body["details"] == [
        {"field": "order", "message": "a multipart order needs a part 'order'"}
    ]


async def test_multipart_body_over_the_limit_is_cut_when_streamed(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server, max_mb=5)
    boundary = "gatewayboundary"

    async def chunks() -> Any:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="order"\r\n\r\n'.encode()
        yield b'{"customer_name": "A"}\r\n'
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="prescription"; '.encode()
        yield b'filename="rx.pdf"\r\nContent-Type: application/pdf\r\n\r\n%PDF-'
        for _ in range(40):  # 2.5 MiB, over server.max_body_mb = 2, with no Content-Length
            yield b"x" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = await client.post(
        ORDER_PATH,
        data=chunks(),
        headers={
            "apikey": FORWARD_KEY,
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )

    await assert_refused(response, sandbox, 413, "payload_too_large")


async def test_inline_base64_pdf_is_checked_before_forwarding(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server)
    good = base64.b64encode(PDF).decode()

    ok = await client.post(
        ORDER_PATH, json={"customer_name": "A", "prescription_pdf_base64": good},
        headers={"apikey": FORWARD_KEY},
    )  # fmt: skip
    bad = await client.post(
        ORDER_PATH, json={"customer_name": "A", "prescription_pdf_base64": "not base64!"},
        headers={"apikey": FORWARD_KEY},
    )  # fmt: skip

    assert ok.status == 200
    assert received(sandbox)[0]["payload"]["prescription_pdf_base64"] == good
    assert bad.status == 422
    assert (await bad.json())["error"] == "prescription_pdf_invalid"
    assert len(received(sandbox)) == 1


async def test_large_fetched_pdf_is_streamed_to_manager_intact(
    aiohttp_client: ClientFactory, sandbox: TestServer, pdf_host: tuple[PdfHost, TestServer]
) -> None:
    _, server = pdf_host
    client = await start_gateway(aiohttp_client, sandbox, server, max_mb=5)
    url = f"http://127.0.0.1:{server.port}/big.pdf"

    response = await client.post(
        ORDER_PATH, json={"customer_name": "A", "prescription_url": url},
        headers={"apikey": FETCH_KEY},
    )  # fmt: skip

    assert response.status == 200, await response.text()
    pdf = base64.b64decode(received(sandbox)[0]["payload"]["prescription_pdf_base64"])
    assert pdf == b"%PDF-" + b"x" * 2_000_000
