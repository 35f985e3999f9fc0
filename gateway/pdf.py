"""Prescription PDFs: inline checks (pure) and the guarded download (I/O).

The fetch must never become a way into the operator's network (contract, section 5): the URL and
address policy is :mod:`gateway.egress` under the ``[pdf]`` configuration.
"""

from __future__ import annotations

import asyncio
import binascii
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from gateway import egress
from gateway.config import PdfConfig
from gateway.egress import EgressRefusedError, IPAddress, find_cause, pdf_policy
from gateway.errors import (
    PayloadTooLargeError,
    PrescriptionPdfBlockedError,
    PrescriptionPdfInvalidError,
    PrescriptionPdfUnreachableError,
)

PdfResult = Literal["ok", "blocked", "unreachable", "invalid", "too_large"]

PDF_MAGIC: Final = b"%PDF-"
MAX_REDIRECTS: Final = 3
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
USER_AGENT: Final = "telemed-gateway-pdf/1"
CHUNK_SIZE: Final = 65536
DEFAULT_POOL_LIMIT: Final = 32


def _record_nothing(result: str) -> None:
    """The default ``record``: metrics are optional."""


def check_address(address: str | IPAddress, pdf: PdfConfig) -> str | None:
    """Return None if a PDF may be fetched from ``address``, else the reason it may not
    (:func:`gateway.egress.check_address` under the ``[pdf]`` policy)."""
    return egress.check_address(address, pdf_policy(pdf))


def _blocked(why: str) -> PrescriptionPdfBlockedError:
    return PrescriptionPdfBlockedError(f"The prescription PDF URL is refused: {why}.")


def _unresolved(why: str) -> PrescriptionPdfUnreachableError:
    return PrescriptionPdfUnreachableError(f"The prescription PDF host name {why}.")


def check_url(url: str, pdf: PdfConfig) -> URL:
    """Parse a prescription URL and apply the scheme, credential, port and host policy.

    Host names are not resolved here: :class:`GuardedResolver` checks what they resolve to.

    Raises:
        PrescriptionPdfBlockedError: the URL is not one the gateway may fetch.
    """
    try:
        return egress.check_url(url, pdf_policy(pdf))
    except EgressRefusedError as exc:
        raise _blocked(exc.reason) from None


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


class GuardedResolver(egress.GuardedResolver):
    """The egress resolver under the ``[pdf]`` policy, refusing with the PDF error codes."""

    def __init__(self, pdf: PdfConfig, inner: AbstractResolver | None = None) -> None:
        super().__init__(pdf_policy(pdf), inner, refused=_blocked, unresolved=_unresolved)

    def reconfigure(self, pdf: PdfConfig) -> None:
        """Check every later lookup against ``pdf``."""
        self.reconfigure_policy(pdf_policy(pdf))


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
                refusal = find_cause(exc, PrescriptionPdfBlockedError)
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
