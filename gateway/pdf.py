"""Prescription PDFs: the address and URL policy (pure) and the guarded download (I/O).

The fetch must never become a way into the operator's network (contract, section 5).
"""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final, Literal

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.config import PdfConfig
from gateway.errors import (
    PayloadTooLargeError,
    PrescriptionPdfBlockedError,
    PrescriptionPdfInvalidError,
    PrescriptionPdfUnreachableError,
)

PdfResult = Literal["ok", "blocked", "unreachable", "invalid", "too_large"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PDF_MAGIC: Final = b"%PDF-"
MAX_REDIRECTS: Final = 3
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
USER_AGENT: Final = "telemed-gateway-pdf/1"
CHUNK_SIZE: Final = 65536
DEFAULT_POOL_LIMIT: Final = 32
DEFAULT_PORTS: Final = {"https": 443, "http": 80}

_net = ipaddress.ip_network
_LINK_LOCAL_V4: Final = _net("169.254.0.0/16")
_THIS_NETWORK: Final = _net("0.0.0.0/8")
_SHARED: Final = _net("100.64.0.0/10")
_PRIVATE: Final = (_net("10.0.0.0/8"), _net("172.16.0.0/12"), _net("192.168.0.0/16"))
_UNIQUE_LOCAL: Final = _net("fc00::/7")
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052 NAT64).
_NAT64: Final = (_net("64:ff9b::/96"), _net("64:ff9b:1::/48"))
_HOST_NAME: Final = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")
_NUMERIC_LABEL: Final = re.compile(r"^(\d+|0x[0-9a-f]*)$")


def _record_nothing(result: str) -> None:
    """The default ``record``: metrics are optional."""


def _embedded_ipv4(ip: IPAddress) -> Iterator[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches: v4-mapped, 6to4, NAT64 and Teredo."""
    if isinstance(ip, ipaddress.IPv4Address):
        return
    if ip.ipv4_mapped is not None:
        yield ip.ipv4_mapped
    if ip.sixtofour is not None:
        yield ip.sixtofour
    if ip.teredo is not None:
        yield ip.teredo[1]
    if any(ip in net for net in _NAT64):
        yield ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _is_allowed_by_network(ip: IPAddress, pdf: PdfConfig) -> bool:
    return any(ip.version == net.version and ip in net for net in pdf.allow_networks)


def _refusal(ip: IPAddress) -> str | None:  # noqa: C901 - one flat table of address classes
    """Why this single address must not be fetched from, or None."""
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _LINK_LOCAL_V4:
            return "link-local address (cloud metadata)"
        if ip in _THIS_NETWORK:
            return "'this network' address"
        if ip in _SHARED:
            return "shared (carrier-grade NAT) address"
        if any(ip in net for net in _PRIVATE):
            return "private address"
        if ip == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast address"
    else:
        if ip.is_link_local:
            return "link-local address"
        if ip in _UNIQUE_LOCAL:
            return "private address"
        if ip.is_site_local:
            return "site-local address"
    # Python's ipaddress calls 224.0.0.0/4 global in some versions: check multicast first.
    if ip.is_multicast:
        return "multicast address"
    if ip.is_reserved:
        return "reserved address"
    if ip.is_private or not ip.is_global:
        return "non-public address"
    return None


def check_address(address: str | IPAddress, pdf: PdfConfig) -> str | None:
    """Return None if the gateway may connect to ``address``, else the reason it may not.

    An address inside ``pdf.allow_networks`` (as written, or the IPv4 address embedded in an
    IPv6 one) is allowed; otherwise loopback, private, shared, link-local, unspecified,
    multicast, reserved, broadcast and other non-global addresses are refused.
    """
    if isinstance(address, str):
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return "invalid address"
    else:
        ip = address
    embedded = list(_embedded_ipv4(ip))
    if any(_is_allowed_by_network(candidate, pdf) for candidate in (ip, *embedded)):
        return None
    # A v4-mapped or NAT64 address is only a way of writing the IPv4 address: judge that one.
    translated = isinstance(ip, ipaddress.IPv6Address) and (
        ip.ipv4_mapped is not None or any(ip in net for net in _NAT64)
    )
    for inner in embedded:
        reason = _refusal(inner)
        if reason is not None:
            return f"{reason} embedded in an IPv6 address"
    return None if translated else _refusal(ip)


def _with_article(reason: str) -> str:
    return f"an {reason}" if reason[0] in "aeiou" else f"a {reason}"


def _blocked(why: str) -> PrescriptionPdfBlockedError:
    return PrescriptionPdfBlockedError(f"The prescription PDF URL is refused: {why}.")


def _check_host(host: str | None, pdf: PdfConfig) -> None:
    if not host:
        raise _blocked("it has no host")
    if ":" in host:  # yarl keeps an IPv6 literal without its brackets
        if "%" in host:
            raise _blocked("a scoped IPv6 address is not allowed")
        reason = check_address(host, pdf)  # aiohttp does not resolve IP literals
        if reason is not None:
            raise _blocked(f"the host is {_with_article(reason)}")
        return
    if not _HOST_NAME.match(host):
        raise _blocked("the host name is not valid")
    bare = host.rstrip(".")
    if _NUMERIC_LABEL.match(bare.rsplit(".", 1)[-1]):
        # 127.1, 2130706433, 0x7f.1, 0177.0.0.1: the C resolver reads these as addresses.
        if host != bare or not _is_canonical_ipv4(bare):
            raise _blocked("the numeric host is not a plain dotted-quad IPv4 address")
        reason = check_address(bare, pdf)
        if reason is not None:
            raise _blocked(f"the host is {_with_article(reason)}")


def _is_canonical_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(
        part.isascii()
        and part.isdigit()
        and len(part) <= 3
        and (part == "0" or not part.startswith("0"))
        and int(part) <= 255
        for part in parts
    )


def check_url(url: str, pdf: PdfConfig) -> URL:
    """Parse a prescription URL and apply the scheme, credential, port and host policy.

    Host names are not resolved here: :class:`GuardedResolver` checks what they resolve to.

    Raises:
        PrescriptionPdfBlockedError: the URL is not one the gateway may fetch.
    """
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError):
        raise _blocked("it is not a valid URL") from None
    if not parsed.absolute:
        raise _blocked("it is not an absolute URL")
    schemes = ("https", "http") if pdf.allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise _blocked(
            "only https URLs are fetched" if not pdf.allow_http else "not an http(s) URL"
        )
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise _blocked("it must not contain credentials")
    if port != DEFAULT_PORTS[parsed.scheme] and port not in pdf.allow_ports:
        raise _blocked("its port is not allowed")
    host = parsed.raw_host
    _check_host(host, pdf)
    if pdf.allow_hosts:
        names = {(host or "").rstrip("."), (parsed.host or "").rstrip(".")}
        if not names & set(pdf.allow_hosts):
            raise _blocked("the host is not in the allowed hosts")
    return parsed.with_fragment(None)


def is_pdf(data: bytes | bytearray) -> bool:
    """Whether content starts like a PDF file."""
    return bytes(data[: len(PDF_MAGIC)]) == PDF_MAGIC


def _megabytes(max_bytes: int) -> str:
    mb = round(max_bytes / (1024 * 1024), 2)
    return f"{mb:g} MB" if mb > 0 else f"{max_bytes} bytes"


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The prescription PDF is larger than {_megabytes(max_bytes)}.")


def check_inline_pdf(value: object, max_bytes: int) -> bytes:
    """Decode an inline ``prescription_pdf_base64`` and check its size and ``%PDF-`` start.

    Standard base64 alphabet with padding; surrounding whitespace is ignored, inner whitespace
    (line breaks) and the URL-safe alphabet are refused.

    Raises:
        PrescriptionPdfInvalidError: not a non-empty string, not base64, or not a PDF.
        PayloadTooLargeError: the decoded PDF is over ``max_bytes``.
    """
    if not isinstance(value, str) or not value.strip():
        raise PrescriptionPdfInvalidError("The prescription PDF must be a non-empty base64 string.")
    text = value.strip()
    if len(text) * 3 // 4 - text[-2:].count("=") > max_bytes:
        raise _too_large(max_bytes)
    try:
        data = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise PrescriptionPdfInvalidError(
            "The prescription PDF is not valid base64 (standard alphabet, padded, no line breaks)."
        ) from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    if not is_pdf(data):
        raise PrescriptionPdfInvalidError("The prescription content is not a PDF.")
    return data


def check_content_length(length: int | None, max_bytes: int) -> None:
    """Refuse a response whose announced size is already over the limit."""
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes)


def parse_redirect(current: URL, location: str | None, status: int) -> str:
    """The absolute URL a redirect response points to, resolved against ``current``."""
    if not location:
        raise PrescriptionPdfUnreachableError(
            f"The prescription PDF server answered HTTP {status} without a Location."
        )
    try:
        return str(current.join(URL(location)))
    except (ValueError, TypeError):
        raise PrescriptionPdfUnreachableError(
            "The prescription PDF server redirected to an invalid location."
        ) from None


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a host if any of its addresses is refused by the PDF policy.

    aiohttp connects to exactly the records returned here, so the checked address is the one
    connected to (no second lookup, no DNS-rebinding gap).
    """

    def __init__(self, pdf: PdfConfig, inner: AbstractResolver | None = None) -> None:
        self._pdf = pdf
        self._inner = inner

    def reconfigure(self, pdf: PdfConfig) -> None:
        """Check every later lookup against ``pdf``."""
        self._pdf = pdf

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        try:
            records = await self._inner.resolve(host, port, family)
        except OSError as exc:
            raise PrescriptionPdfUnreachableError(
                "The prescription PDF host name could not be resolved."
            ) from exc
        if not records:
            raise PrescriptionPdfUnreachableError(
                "The prescription PDF host name resolves to no address."
            )
        checked = [record.copy() for record in records]
        for record in checked:
            reason = check_address(record["host"], self._pdf)
            if reason is not None:
                raise PrescriptionPdfBlockedError(
                    "The prescription PDF URL is refused: the host resolves to "
                    f"{_with_article(reason)}."
                )
        return checked

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def _policy_error(exc: BaseException) -> PrescriptionPdfBlockedError | None:
    """A refusal raised by :class:`GuardedResolver` that aiohttp may have wrapped."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short, bounded walk down the cause chain
        if seen is None:
            break
        if isinstance(seen, PrescriptionPdfBlockedError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_RESULTS: Final[tuple[tuple[type[Exception], PdfResult], ...]] = (
    (PrescriptionPdfBlockedError, "blocked"),
    (PrescriptionPdfUnreachableError, "unreachable"),
    (PrescriptionPdfInvalidError, "invalid"),
    (PayloadTooLargeError, "too_large"),
)


def _result_of(exc: Exception) -> PdfResult | None:
    return next((result for kind, result in _RESULTS if isinstance(exc, kind)), None)


class PdfFetcher:
    """Downloads prescription PDFs over its own session, through :class:`GuardedResolver`.

    ``record`` is told the outcome of every fetch: ok, blocked, unreachable, invalid, too_large.
    """

    def __init__(
        self,
        pdf: PdfConfig,
        *,
        resolver_inner: AbstractResolver | None = None,
        record: Callable[[str], None] = _record_nothing,
    ) -> None:
        self._pdf = pdf
        self._resolver_inner = resolver_inner
        self._record = record
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None

    async def start(self) -> None:
        """Create the session (inside the running loop); fetching starts it when needed."""
        if self._session is not None:
            return
        self._resolver = GuardedResolver(self._pdf, self._resolver_inner)
        # No keep-alive pool: every request resolves and checks under the current policy, so a
        # reload that narrows allow_networks cannot be bypassed by an idle pooled connection.
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            use_dns_cache=False,
            force_close=True,
            limit=DEFAULT_POOL_LIMIT,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            # Identity only: the size limit applies to the bytes on the wire, no zip bombs.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            auto_decompress=False,
            trust_env=False,  # no proxy or .netrc credentials from the environment
        )

    def reconfigure(self, pdf: PdfConfig) -> None:
        """Apply a reloaded ``[pdf]`` table to later fetches (fetches in flight keep theirs).

        The resolver switches at once, so a connection opened after the reload is checked
        against the new networks.
        """
        self._pdf = pdf
        if self._resolver is not None:
            self._resolver.reconfigure(pdf)

    async def close(self) -> None:
        """Close the session and the resolver."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def __aenter__(self) -> PdfFetcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def fetch_pdf(self, url: str) -> bytearray:
        """Download the PDF at ``url`` under the contract's policy and return its bytes.

        Raises:
            PrescriptionPdfBlockedError, PrescriptionPdfUnreachableError,
            PrescriptionPdfInvalidError, PayloadTooLargeError.
        """
        try:
            data = await self._fetch_within_deadline(url, self._pdf)
        except Exception as exc:
            result = _result_of(exc)
            if result is not None:  # anything else is a bug: it propagates unrecorded
                self._record(result)
            raise
        self._record("ok")
        return data

    async def _fetch_within_deadline(self, url: str, pdf: PdfConfig) -> bytearray:
        try:
            async with asyncio.timeout(pdf.timeout_s):
                return await self._fetch_following_redirects(url, pdf)
        except TimeoutError as exc:
            raise PrescriptionPdfUnreachableError(
                f"The prescription PDF was not fetched within {pdf.timeout_s:g} s."
            ) from exc

    async def _fetch_following_redirects(self, url: str, pdf: PdfConfig) -> bytearray:
        await self.start()
        assert self._session is not None
        target = check_url(url, pdf)
        for hop in range(MAX_REDIRECTS + 1):
            try:
                async with self._session.get(target, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUSES:
                        if hop == MAX_REDIRECTS:
                            raise PrescriptionPdfUnreachableError(
                                f"The prescription PDF URL redirects more than {MAX_REDIRECTS} "
                                "times."
                            )
                        location = resp.headers.get("Location")
                        target = check_url(parse_redirect(target, location, resp.status), pdf)
                        continue
                    if resp.status != 200:
                        raise PrescriptionPdfUnreachableError(
                            f"The prescription PDF server answered HTTP {resp.status}."
                        )
                    return await _fetch_body(resp, pdf.max_bytes)
            except TimeoutError:
                raise  # aiohttp's own timeout: reported by the deadline handler
            except (aiohttp.ClientError, OSError) as exc:
                refusal = _policy_error(exc)
                if refusal is not None:
                    raise refusal from exc
                raise PrescriptionPdfUnreachableError(
                    "The prescription PDF server could not be reached or broke off the download."
                ) from exc
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


async def _fetch_body(resp: aiohttp.ClientResponse, max_bytes: int) -> bytearray:
    """Stream the body into memory, cut at ``max_bytes``, refusing early what is not a PDF."""
    check_content_length(resp.content_length, max_bytes)
    body = bytearray()
    checked_magic = False
    async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
        if not checked_magic and len(body) >= len(PDF_MAGIC):
            if not is_pdf(body):
                raise PrescriptionPdfInvalidError("The prescription URL did not return a PDF.")
            checked_magic = True
    if not is_pdf(body):
        raise PrescriptionPdfInvalidError("The prescription URL did not return a PDF.")
    return body  # no copy: a 10 MB PDF should be in memory once
