"""Where the gateway may connect on a partner's behalf: the URL and address policy (pure) and the
guarded resolver that applies it to every connection (contract sections 5 and 11).

One policy, two configurations: prescription PDF fetches (``[pdf]``) and partner callbacks
(``[webhooks] callback_allow_*``). A URL a partner names must never become a way into the
operator's network.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.config import IPNetwork, PdfConfig, WebhooksConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
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


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """What one kind of outgoing request may reach (built from ``[pdf]`` or ``[webhooks]``)."""

    allow_http: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()  # exempt from the non-public address block
    allow_hosts: tuple[str, ...] = ()  # when non-empty, the only hosts
    allow_ports: tuple[int, ...] = ()  # besides the scheme's default port


def pdf_policy(pdf: PdfConfig) -> EgressPolicy:
    """The policy of prescription PDF fetches."""
    return EgressPolicy(pdf.allow_http, pdf.allow_networks, pdf.allow_hosts, pdf.allow_ports)


def callback_policy(webhooks: WebhooksConfig) -> EgressPolicy:
    """The policy of partner callbacks (any host; the same address classes refused)."""
    return EgressPolicy(
        allow_http=webhooks.callback_allow_http,
        allow_networks=webhooks.callback_allow_networks,
        allow_ports=webhooks.callback_allow_ports,
    )


class EgressRefusedError(Exception):
    """The URL or an address it resolves to is one the gateway must not connect to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "the host resolves to a loopback address": no URL, no secret


class EgressUnresolvedError(Exception):
    """The host name of a URL resolves to no address (or not at all)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


def _is_allowed_by_network(ip: IPAddress, policy: EgressPolicy) -> bool:
    return any(ip.version == net.version and ip in net for net in policy.allow_networks)


def _refusal(ip: IPAddress) -> str | None:  # noqa: C901 - one flat table of address classes
    """Why this single address must not be connected to, or None."""
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


def check_address(address: str | IPAddress, policy: EgressPolicy) -> str | None:
    """Return None if the gateway may connect to ``address``, else the reason it may not.

    An address inside ``policy.allow_networks`` (as written, or the IPv4 address embedded in an
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
    if any(_is_allowed_by_network(candidate, policy) for candidate in (ip, *embedded)):
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


def with_article(reason: str) -> str:
    return f"an {reason}" if reason[0] in "aeiou" else f"a {reason}"


def _check_host(host: str | None, policy: EgressPolicy) -> None:
    if not host:
        raise EgressRefusedError("it has no host")
    if ":" in host:  # yarl keeps an IPv6 literal without its brackets
        if "%" in host:
            raise EgressRefusedError("a scoped IPv6 address is not allowed")
        reason = check_address(host, policy)  # aiohttp does not resolve IP literals
        if reason is not None:
            raise EgressRefusedError(f"the host is {with_article(reason)}")
        return
    if not _HOST_NAME.match(host):
        raise EgressRefusedError("the host name is not valid")
    bare = host.rstrip(".")
    if _NUMERIC_LABEL.match(bare.rsplit(".", 1)[-1]):
        # 127.1, 2130706433, 0x7f.1, 0177.0.0.1: the C resolver reads these as addresses.
        if host != bare or not _is_canonical_ipv4(bare):
            raise EgressRefusedError("the numeric host is not a plain dotted-quad IPv4 address")
        reason = check_address(bare, policy)
        if reason is not None:
            raise EgressRefusedError(f"the host is {with_article(reason)}")


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


def check_url(url: str, policy: EgressPolicy) -> URL:
    """Parse a URL and apply the scheme, credential, port and host policy.

    Host names are not resolved here: :class:`GuardedResolver` checks what they resolve to.

    Raises:
        EgressRefusedError: the URL is not one the gateway may connect to (``reason`` says why).
    """
    try:
        parsed = URL(url)
        port = parsed.port
    except (ValueError, TypeError):
        raise EgressRefusedError("it is not a valid URL") from None
    if not parsed.absolute:
        raise EgressRefusedError("it is not an absolute URL")
    schemes = ("https", "http") if policy.allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise EgressRefusedError(
            "only https URLs are allowed" if not policy.allow_http else "not an http(s) URL"
        )
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise EgressRefusedError("it must not contain credentials")
    if port != DEFAULT_PORTS[parsed.scheme] and port not in policy.allow_ports:
        raise EgressRefusedError("its port is not allowed")
    host = parsed.raw_host
    _check_host(host, policy)
    if policy.allow_hosts:
        names = {(host or "").rstrip("."), (parsed.host or "").rstrip(".")}
        if not names & set(policy.allow_hosts):
            raise EgressRefusedError("the host is not in the allowed hosts")
    return parsed.with_fragment(None)


RefusedFactory = Callable[[str], Exception]
E = TypeVar("E", bound=BaseException)


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a host if any of its addresses is refused by the policy.

    aiohttp connects to exactly the records returned here, so the checked address is the one
    connected to (no second lookup, no DNS-rebinding gap). ``refused`` and ``unresolved`` turn a
    reason into the exception its user reports (the PDF fetcher's own error codes, say).
    """

    def __init__(
        self,
        policy: EgressPolicy,
        inner: AbstractResolver | None = None,
        *,
        refused: RefusedFactory = EgressRefusedError,
        unresolved: RefusedFactory = EgressUnresolvedError,
    ) -> None:
        self._policy = policy
        self._inner = inner
        self._refused = refused
        self._unresolved = unresolved

    def reconfigure_policy(self, policy: EgressPolicy) -> None:
        """Check every later lookup against ``policy``."""
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        try:
            records = await self._inner.resolve(host, port, family)
        except OSError as exc:
            raise self._unresolved("could not be resolved") from exc
        if not records:
            raise self._unresolved("resolves to no address")
        checked = [record.copy() for record in records]
        for record in checked:
            reason = check_address(record["host"], self._policy)
            if reason is not None:
                raise self._refused(f"the host resolves to {with_article(reason)}")
        return checked

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def find_cause(exc: BaseException, kind: type[E]) -> E | None:
    """An exception of ``kind`` (raised by the resolver) that aiohttp may have wrapped."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short, bounded walk down the cause chain
        if seen is None:
            break
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
