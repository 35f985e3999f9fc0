"""Tests for gateway.pdf: the address/URL policy (pure) and the guarded fetch on loopback only.

Network rule: nothing here connects anywhere but 127.0.0.1, and no real name is resolved.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.config import PdfConfig
from gateway.errors import (
    PayloadTooLargeError,
    PrescriptionPdfBlockedError,
    PrescriptionPdfInvalidError,
    PrescriptionPdfUnreachableError,
)
from gateway.pdf import (
    GuardedResolver,
    PdfFetcher,
    check_address,
    check_inline_pdf,
    check_url,
)

PDF = b"%PDF-1.7\n" + b"0" * 2000 + b"\n%%EOF\n"
DEFAULT = PdfConfig()


def pdf_config(**values: Any) -> PdfConfig:
    return PdfConfig.model_validate(values)


# --- check_address: every address class, pure -------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "shared"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.0.1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("192.0.2.1", "non-public"),
    ("198.18.0.1", "non-public"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fc00::1", "private"),
    ("fd12::1", "private"),
    ("fd00:ec2::254", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "non-public"),
    ("::7f00:1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("2002:7f00:1::", "loopback"),
    ("2002:a9fe:a9fe::", "cloud metadata"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata"),
    ("64:ff9b::a00:1", "private"),
    ("not-an-ip", "invalid address"),
    ("127.1", "invalid address"),
]

ALLOWED = [
    "93.184.216.34",
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_non_public_address_is_refused_with_its_reason(address: str, reason: str) -> None:
    assert reason in (check_address(address, DEFAULT) or "")


@pytest.mark.parametrize("address", ALLOWED)
def test_public_address_is_allowed(address: str) -> None:
    assert check_address(address, DEFAULT) is None
    assert check_address(ipaddress.ip_address(address), DEFAULT) is None


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        (["127.0.0.0/8"], "127.0.0.1", True),
        (["127.0.0.0/8"], "127.200.0.9", True),
        (["127.0.0.0/8"], "::ffff:127.0.0.1", True),
        (["127.0.0.0/8"], "::1", False),
        (["127.0.0.0/8"], "10.0.0.1", False),
        (["127.0.0.1/32"], "127.0.0.2", False),
        (["10.20.0.0/16"], "10.20.3.4", True),
        (["10.20.0.0/16"], "10.21.0.1", False),
        (["fd00::/8"], "fd12::1", True),
        (["fd00::/8"], "fc00::1", False),
        (["fd00::/8"], "10.0.0.1", False),
        (["::1/128"], "::1", True),
        (["::1/128"], "127.0.0.1", False),
    ],
)
def test_allow_networks_exempt_exactly_their_addresses(
    networks: list[str], address: str, allowed: bool
) -> None:
    pdf = pdf_config(allow_networks=networks)
    assert (check_address(address, pdf) is None) is allowed
    assert (check_address(ipaddress.ip_address(address), pdf) is None) is allowed


# --- check_url: scheme, credentials, port, host, pure ------------------------------------------

URL_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("https://documents.example/rx.pdf", {}, None),
    ("https://documents.example:443/rx.pdf?sig=abc", {}, None),
    ("HTTPS://Documents.Example/rx.pdf", {}, None),
    ("https://documents.example./rx.pdf", {}, None),
    ("https://93.184.216.34/rx.pdf", {}, None),
    ("https://[2606:4700:4700::1111]/rx.pdf", {}, None),
    ("http://documents.example/rx.pdf", {}, "only https"),
    ("http://documents.example/rx.pdf", {"allow_http": True}, None),
    ("http://documents.example:80/rx.pdf", {"allow_http": True}, None),
    ("http://documents.example:443/rx.pdf", {"allow_http": True}, "port"),
    ("ftp://documents.example/rx.pdf", {"allow_http": True}, "http(s)"),
    ("file:///etc/passwd", {}, "absolute"),
    ("gopher://documents.example/", {}, "only https"),
    ("javascript:alert(1)", {}, "absolute"),
    ("/relative/rx.pdf", {}, "absolute"),
    ("rx.pdf", {}, "absolute"),
    ("https:///rx.pdf", {}, "absolute"),
    ("", {}, "absolute"),
    ("https://documents.example:99999/", {}, "valid URL"),
    ("https://user:pw@documents.example/x.pdf", {}, "credentials"),
    ("https://user@documents.example/", {}, "credentials"),
    ("https://:pw@documents.example/", {}, "credentials"),
    ("https://documents.example:22/rx.pdf", {}, "port"),
    ("https://documents.example:6379/rx.pdf", {}, "port"),
    ("https://documents.example:8443/rx.pdf", {}, "port"),
    ("https://documents.example:8443/rx.pdf", {"allow_ports": [8443]}, None),
    ("https://documents.example:0/rx.pdf", {}, "port"),
    ("https://127.1/rx.pdf", {}, "numeric host"),
    ("https://2130706433/rx.pdf", {}, "numeric host"),
    ("https://0x7f.1/rx.pdf", {}, "numeric host"),
    ("https://0x7f000001/rx.pdf", {}, "numeric host"),
    ("https://0177.0.0.1/rx.pdf", {}, "numeric host"),
    ("https://1.2.3.4.5/rx.pdf", {}, "numeric host"),
    ("https://127.0.0.1./rx.pdf", {}, "numeric host"),
    ("https://documents.123/rx.pdf", {}, "numeric host"),
    ("https://127.0.0.1/rx.pdf", {}, "loopback"),
    ("https://10.1.2.3/rx.pdf", {}, "private"),
    ("https://169.254.169.254/latest/meta-data/", {}, "cloud metadata"),
    ("https://[::1]/rx.pdf", {}, "loopback"),
    ("https://[::ffff:127.0.0.1]/rx.pdf", {}, "loopback"),
    ("https://[::ffff:a9fe:a9fe]/rx.pdf", {}, "cloud metadata"),
    ("https://[fe80::1%25eth0]/rx.pdf", {}, "scoped"),
    ("https://docu%2Dments.example/rx.pdf", {}, "host name"),
    ("https://127.0.0.1/rx.pdf", {"allow_networks": ["127.0.0.0/8"]}, None),
    ("https://documents.example/rx.pdf", {"allow_hosts": ["documents.example"]}, None),
    ("https://DOCUMENTS.example./rx.pdf", {"allow_hosts": ["documents.example."]}, None),
    ("https://höst.example/rx.pdf", {"allow_hosts": ["Höst.example"]}, None),
    ("https://other.example/rx.pdf", {"allow_hosts": ["documents.example"]}, "allowed hosts"),
    ("https://sub.documents.example/", {"allow_hosts": ["documents.example"]}, "allowed hosts"),
]


@pytest.mark.parametrize(("url", "values", "refusal"), URL_CASES)
def test_check_url_policy(url: str, values: dict[str, Any], refusal: str | None) -> None:
    pdf = pdf_config(**values)
    if refusal is None:
        assert check_url(url, pdf).is_absolute()
        return
    with pytest.raises(PrescriptionPdfBlockedError) as caught:
        check_url(url, pdf)
    assert refusal in caught.value.message


def test_check_url_drops_the_fragment_and_keeps_the_query() -> None:
    url = check_url("https://documents.example/rx.pdf?sig=abc#page=2", DEFAULT)
    assert str(url) == "https://documents.example/rx.pdf?sig=abc"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "https://0.0.0.0/rx.pdf",
            "The prescription PDF URL is refused: the host is an unspecified address.",
        ),
        (
            "https://169.254.169.254/latest/meta-data/",
            "The prescription PDF URL is refused: "
            "the host is a link-local address (cloud metadata).",
        ),
    ],
)
def test_refusal_message_says_why(url: str, message: str) -> None:
    with pytest.raises(PrescriptionPdfBlockedError) as caught:
        check_url(url, DEFAULT)
    assert caught.value.message == message


def test_refusal_message_is_one_sentence_without_credentials_or_query() -> None:
    with pytest.raises(PrescriptionPdfBlockedError) as caught:
        check_url("https://user:hunter2@documents.example/x.pdf?sig=SECRET", DEFAULT)
    message = caught.value.message
    assert "hunter2" not in message and "SECRET" not in message and "user" not in message
    assert message.endswith(".") and message.count(". ") == 0


# --- GuardedResolver with a fake inner resolver (no lookup, no connection) ----------------------


class FakeResolver(AbstractResolver):
    """Maps names to fixed addresses; every other name does not exist. Never touches DNS."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls: list[str] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        addresses = self.names.get(host.rstrip("."))
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_returns_the_checked_public_records() -> None:
    inner = FakeResolver({"documents.example": ["93.184.216.34", "2606:4700:4700::1111"]})
    records = await GuardedResolver(DEFAULT, inner).resolve("documents.example", 443, 0)
    assert [r["host"] for r in records] == ["93.184.216.34", "2606:4700:4700::1111"]
    assert all(r["port"] == 443 for r in records)


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["169.254.169.254"],
        ["93.184.216.34", "10.0.0.1"],
        ["2606:4700:4700::1111", "::ffff:127.0.0.1"],
        ["93.184.216.34", "fe80::1"],
        ["not-an-address"],
    ],
)
async def test_resolver_refuses_a_host_if_any_address_is_refused(addresses: list[str]) -> None:
    inner = FakeResolver({"rebind.example": addresses})
    with pytest.raises(PrescriptionPdfBlockedError) as caught:
        await GuardedResolver(DEFAULT, inner).resolve("rebind.example", 443, 0)
    assert "resolves to a" in caught.value.message


@pytest.mark.parametrize("names", [{}, {"empty.example": []}])
async def test_resolver_failure_is_unreachable(names: dict[str, list[str]]) -> None:
    with pytest.raises(PrescriptionPdfUnreachableError):
        await GuardedResolver(DEFAULT, FakeResolver(names)).resolve("empty.example", 443, 0)


async def test_resolver_close_closes_the_inner_resolver() -> None:
    inner = FakeResolver({})
    await GuardedResolver(DEFAULT, inner).close()
    assert inner.closed


# --- the fetch, end to end on 127.0.0.1 ---------------------------------------------------------


REDIRECT_CODES = (302, 301, 303, 307, 308)


@dataclass
class PdfServer:
    """A scripted document server on 127.0.0.1 that counts hits per Host and path."""

    hits: Counter[str] = field(default_factory=Counter)
    headers: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.count])
        for path, handler in [
            ("/rx.pdf", self.rx),
            ("/html", self.html),
            ("/short", self.short),
            ("/big", self.big),
            ("/big-chunked", self.big_chunked),
            ("/r/{left}", self.hop),
            ("/redirect", self.redirect),
            ("/no-location", self.no_location),
            ("/slow", self.slow),
            ("/stall-body", self.stall_body),
            ("/lying-length", self.lying_length),
            ("/slow-hop/{left}", self.slow_hop),
        ]:
            app.router.add_get(path, handler)
        return app

    @web.middleware
    async def count(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.hits[f"{request.host}{request.path}"] += 1
        self.headers.append(dict(request.headers))
        return await handler(request)

    async def rx(self, request: web.Request) -> web.Response:
        return web.Response(
            body=PDF, content_type="application/pdf", headers={"Set-Cookie": "track=1; Path=/"}
        )

    async def html(self, request: web.Request) -> web.Response:
        return web.Response(text="<html>not a pdf</html>", content_type="text/html")

    async def short(self, request: web.Request) -> web.Response:
        return web.Response(body=b"%PD")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=PDF + b"x" * 40_000, content_type="application/pdf")

    async def big_chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(b"%PDF-1.7\n")
            for _ in range(10):
                await resp.write(b"x" * 4096)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def hop(self, request: web.Request) -> web.Response:
        left = int(request.match_info["left"])
        if left == 0:
            return await self.rx(request)
        location = f"/r/{left - 1}"  # relative: resolved against the current URL
        return web.Response(status=REDIRECT_CODES[left % 5], headers={"Location": location})

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def no_location(self, request: web.Request) -> web.Response:
        return web.Response(status=302)

    async def slow(self, request: web.Request) -> web.Response:
        async with asyncio.timeout(0.5):
            await self.release.wait()
        return await self.rx(request)

    async def stall_body(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(b"%PDF-1.7\n")
            async with asyncio.timeout(0.5):
                await self.release.wait()
            await resp.write_eof()
        except (ConnectionError, TimeoutError):
            pass
        return resp

    async def lying_length(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 50_000  # announced, never sent: only the header can refuse it
        await resp.prepare(request)
        try:
            await resp.write(b"%PDF-1.7\n")
            async with asyncio.timeout(0.5):
                await self.release.wait()
        except (ConnectionError, TimeoutError):
            pass
        return resp

    async def slow_hop(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        left = int(request.match_info["left"])
        if left == 0:
            return await self.rx(request)
        return web.Response(status=302, headers={"Location": f"/slow-hop/{left - 1}"})


@pytest.fixture
async def pdf_server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> AsyncIterator[PdfServer]:
    origin = PdfServer()
    origin.server = await aiohttp_server(origin.app())
    assert origin.server.host == "127.0.0.1"
    yield origin
    origin.release.set()  # let stalled handlers end before the server closes


@pytest.fixture
async def make_fetcher() -> AsyncIterator[Callable[..., tuple[PdfFetcher, list[str]]]]:
    fetchers: list[PdfFetcher] = []

    def make(pdf: PdfConfig, **kwargs: Any) -> tuple[PdfFetcher, list[str]]:
        results: list[str] = []
        fetcher = PdfFetcher(pdf, record=results.append, **kwargs)
        fetchers.append(fetcher)
        return fetcher, results

    yield make
    for fetcher in fetchers:
        await fetcher.close()


def loopback(
    server: PdfServer, networks: tuple[str, ...] = ("127.0.0.0/8",), **values: Any
) -> PdfConfig:
    """The test server's origin is allowed: http, its port, and (by default) 127.0.0.0/8."""
    return pdf_config(
        allow_http=True, allow_ports=[server.port], allow_networks=list(networks), **values
    )


def redirect_to(server: PdfServer, target: str) -> str:
    return str(URL(server.url("/redirect")).with_query(to=target))


MakeFetcher = Callable[..., tuple[PdfFetcher, list[str]]]


async def test_pdf_is_fetched(pdf_server: PdfServer, make_fetcher: MakeFetcher) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    assert await fetcher.fetch_pdf(pdf_server.url("/rx.pdf")) == PDF
    assert results == ["ok"]


async def test_fetch_sends_fixed_agent_no_cookies_and_no_credentials(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    # A host name, not an IP literal: aiohttp's default jar would keep cookies for it.
    inner = FakeResolver({"pdf.test": ["127.0.0.1"]})
    fetcher, results = make_fetcher(loopback(pdf_server), resolver_inner=inner)
    await fetcher.fetch_pdf(pdf_server.url("/rx.pdf", host="pdf.test"))
    await fetcher.fetch_pdf(pdf_server.url("/rx.pdf", host="pdf.test"))
    assert results == ["ok", "ok"]
    for headers in pdf_server.headers:
        assert headers["User-Agent"] == "telemed-gateway-pdf/1"
        assert "Cookie" not in headers and "Authorization" not in headers


async def test_fetcher_works_as_async_context_manager(pdf_server: PdfServer) -> None:
    async with PdfFetcher(loopback(pdf_server)) as fetcher:
        assert await fetcher.fetch_pdf(pdf_server.url("/rx.pdf")) == PDF


@pytest.mark.parametrize("path", ["/html", "/short"])
async def test_content_that_is_not_a_pdf_is_invalid(
    pdf_server: PdfServer, make_fetcher: MakeFetcher, path: str
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    with pytest.raises(PrescriptionPdfInvalidError):
        await fetcher.fetch_pdf(pdf_server.url(path))
    assert results == ["invalid"]


async def test_not_found_is_unreachable_with_the_status(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    with pytest.raises(PrescriptionPdfUnreachableError, match="HTTP 404"):
        await fetcher.fetch_pdf(pdf_server.url("/missing.pdf?sig=SECRET"))
    assert results == ["unreachable"]


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_body_over_the_limit_is_too_large(
    pdf_server: PdfServer, make_fetcher: MakeFetcher, path: str
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server, max_mb=0.01))
    with pytest.raises(PayloadTooLargeError, match=r"larger than 0\.01 MB\.$"):
        await fetcher.fetch_pdf(pdf_server.url(path))
    assert results == ["too_large"]


async def test_announced_length_over_the_limit_is_refused_before_reading(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server, max_mb=0.01, timeout_s=2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PayloadTooLargeError):
        await fetcher.fetch_pdf(pdf_server.url("/lying-length"))
    assert loop.time() - started < 0.4  # did not wait for the body that never comes
    assert results == ["too_large"]


async def test_three_redirects_are_followed(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    assert await fetcher.fetch_pdf(pdf_server.url("/r/3")) == PDF
    assert results == ["ok"]
    assert pdf_server.hits[f"127.0.0.1:{pdf_server.port}/r/0"] == 1


async def test_fourth_redirect_is_unreachable(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    with pytest.raises(PrescriptionPdfUnreachableError, match="redirects more than 3"):
        await fetcher.fetch_pdf(pdf_server.url("/r/4"))
    assert results == ["unreachable"]
    assert pdf_server.hits[f"127.0.0.1:{pdf_server.port}/r/0"] == 0


async def test_redirect_without_location_is_unreachable(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    with pytest.raises(PrescriptionPdfUnreachableError, match="HTTP 302"):
        await fetcher.fetch_pdf(pdf_server.url("/no-location"))
    assert results == ["unreachable"]


async def test_redirect_to_a_refused_address_is_blocked_before_connecting(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server, networks=("127.0.0.1/32",)))
    target = pdf_server.url("/rx.pdf", host="127.0.0.2")
    with pytest.raises(PrescriptionPdfBlockedError, match="loopback"):
        await fetcher.fetch_pdf(redirect_to(pdf_server, target))
    assert results == ["blocked"]
    assert sum(n for key, n in pdf_server.hits.items() if key.endswith("/rx.pdf")) == 0


@pytest.mark.parametrize(
    "target",
    [
        "https://169.254.169.254/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]:{port}/",
        "http://user:pw@127.0.0.1:{port}/rx.pdf",
        "http://127.0.0.1:6379/",
        "gopher://127.0.0.1:{port}/",
        "http://2130706433:{port}/rx.pdf",
        "http://0x7f.1:{port}/rx.pdf",
    ],
)
async def test_every_redirect_hop_passes_the_url_policy(
    pdf_server: PdfServer, make_fetcher: MakeFetcher, target: str
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server))
    with pytest.raises(PrescriptionPdfBlockedError):
        await fetcher.fetch_pdf(redirect_to(pdf_server, target.format(port=pdf_server.port)))
    assert results == ["blocked"]
    assert sum(n for key, n in pdf_server.hits.items() if key.endswith("/rx.pdf")) == 0


async def test_redirect_to_a_name_resolving_to_a_refused_address_is_blocked(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    inner = FakeResolver({"evil.test": ["127.0.0.2"]})
    fetcher, results = make_fetcher(
        loopback(pdf_server, networks=("127.0.0.1/32",)), resolver_inner=inner
    )
    target = pdf_server.url("/rx.pdf", host="evil.test")
    with pytest.raises(PrescriptionPdfBlockedError, match="resolves to a loopback"):
        await fetcher.fetch_pdf(redirect_to(pdf_server, target))
    assert results == ["blocked"]
    assert inner.calls == ["evil.test"]
    assert sum(n for key, n in pdf_server.hits.items() if key.endswith("/rx.pdf")) == 0


async def test_name_resolving_to_loopback_is_blocked_and_never_connected(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    inner = FakeResolver({"pdf.test": ["127.0.0.1"]})
    fetcher, results = make_fetcher(loopback(pdf_server, networks=()), resolver_inner=inner)
    with pytest.raises(PrescriptionPdfBlockedError, match="resolves to a loopback address"):
        await fetcher.fetch_pdf(pdf_server.url("/rx.pdf", host="pdf.test"))
    assert results == ["blocked"]
    assert inner.calls == ["pdf.test"]
    assert sum(pdf_server.hits.values()) == 0


async def test_connection_goes_to_the_resolved_and_checked_address(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    inner = FakeResolver({"pdf.test": ["127.0.0.1"]})
    fetcher, results = make_fetcher(loopback(pdf_server), resolver_inner=inner)
    assert await fetcher.fetch_pdf(pdf_server.url("/rx.pdf", host="pdf.test")) == PDF
    assert results == ["ok"]
    assert pdf_server.hits[f"pdf.test:{pdf_server.port}/rx.pdf"] == 1


async def test_reconfigure_applies_to_the_next_fetch_without_reusing_a_connection(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    inner = FakeResolver({"pdf.test": ["127.0.0.1"]})
    fetcher, results = make_fetcher(loopback(pdf_server), resolver_inner=inner)
    url = pdf_server.url("/rx.pdf", host="pdf.test")
    assert await fetcher.fetch_pdf(url) == PDF
    fetcher.reconfigure(loopback(pdf_server, networks=()))
    with pytest.raises(PrescriptionPdfBlockedError):
        await fetcher.fetch_pdf(url)
    fetcher.reconfigure(loopback(pdf_server, max_mb=0.001))
    with pytest.raises(PayloadTooLargeError):
        await fetcher.fetch_pdf(url)
    assert results == ["ok", "blocked", "too_large"]
    assert inner.calls == ["pdf.test"] * 3
    assert pdf_server.hits[f"pdf.test:{pdf_server.port}/rx.pdf"] == 2


async def test_unknown_name_is_unreachable(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server), resolver_inner=FakeResolver({}))
    with pytest.raises(PrescriptionPdfUnreachableError, match="resolved"):
        await fetcher.fetch_pdf(pdf_server.url("/rx.pdf", host="nowhere.test"))
    assert results == ["unreachable"]


async def test_refused_connection_is_unreachable(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    # A loopback port nobody listens on: take one from the OS, then close it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetcher, results = make_fetcher(
        pdf_config(allow_http=True, allow_ports=[port], allow_networks=["127.0.0.0/8"])
    )
    with pytest.raises(PrescriptionPdfUnreachableError):
        await fetcher.fetch_pdf(f"http://127.0.0.1:{port}/rx.pdf")
    assert results == ["unreachable"]


async def test_url_refused_by_policy_is_recorded_as_blocked(make_fetcher: MakeFetcher) -> None:
    fetcher, results = make_fetcher(DEFAULT)
    with pytest.raises(PrescriptionPdfBlockedError):
        await fetcher.fetch_pdf("https://169.254.169.254/latest/meta-data/")
    assert results == ["blocked"]


@pytest.mark.parametrize("path", ["/slow", "/stall-body"])
async def test_fetch_ends_at_the_deadline(
    pdf_server: PdfServer, make_fetcher: MakeFetcher, path: str
) -> None:
    fetcher, results = make_fetcher(loopback(pdf_server, timeout_s=0.2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PrescriptionPdfUnreachableError, match="within 0.2 s"):
        await fetcher.fetch_pdf(pdf_server.url(path))
    assert loop.time() - started < 0.45
    assert results == ["unreachable"]


async def test_deadline_covers_all_redirect_hops_together(
    pdf_server: PdfServer, make_fetcher: MakeFetcher
) -> None:
    # Each hop answers in 0.1 s, well inside the deadline; the four requests together do not.
    fetcher, results = make_fetcher(loopback(pdf_server, timeout_s=0.25))
    with pytest.raises(PrescriptionPdfUnreachableError, match="within 0.25 s"):
        await fetcher.fetch_pdf(pdf_server.url("/slow-hop/3"))
    assert results == ["unreachable"]


# --- check_inline_pdf ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("value", [b64(PDF), f"  {b64(PDF)}\n", b64(b"%PDF-")])
def test_inline_pdf_is_accepted(value: str) -> None:
    assert check_inline_pdf(value, 10_000).startswith(b"%PDF-")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("not base64 at all!", PrescriptionPdfInvalidError),
        (b64(PDF)[:-1], PrescriptionPdfInvalidError),
        (b64(PDF)[:40] + "\n" + b64(PDF)[40:], PrescriptionPdfInvalidError),
        (b64(b"\xfb\xff" + PDF), PrescriptionPdfInvalidError),
        (base64.urlsafe_b64encode(b"%PDF-\xfb\xff").decode(), PrescriptionPdfInvalidError),
        ("JVBERi0=é", PrescriptionPdfInvalidError),
        (b64(b"<html></html>"), PrescriptionPdfInvalidError),
        (b64(b"%PD"), PrescriptionPdfInvalidError),
        ("", PrescriptionPdfInvalidError),
        ("   ", PrescriptionPdfInvalidError),
        (None, PrescriptionPdfInvalidError),
        (42, PrescriptionPdfInvalidError),
        (PDF, PrescriptionPdfInvalidError),
        (["JVBERi0="], PrescriptionPdfInvalidError),
        (b64(PDF + b"x" * 10_000), PayloadTooLargeError),
        ("!" * 20_000, PayloadTooLargeError),
    ],
)
def test_inline_pdf_is_refused(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_inline_pdf(value, 10_000)


def test_inline_pdf_at_exactly_the_limit_is_accepted() -> None:
    data = PDF + b"x" * (10_000 - len(PDF))
    assert check_inline_pdf(b64(data), 10_000) == data
    with pytest.raises(PayloadTooLargeError, match="larger than"):
        check_inline_pdf(b64(data + b"x"), 10_000)
