"""The outbound HTTP(S) proxy for Manager calls (corporate networks), decided in pure code.

Which proxy a Manager URL goes through: the file's ``manager.proxy_url``, a secret holding the URL
(it may carry credentials), or the environment's ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``.
PDF fetches never use any of these (see ``pdf.py``). No message here ever quotes a proxy URL.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, urlsplit

PROXY_SCHEMES: Final = ("http", "https")


class ProxyUrlError(ValueError):
    """A proxy URL that cannot be used; the message never contains the URL (credentials)."""


@dataclass(frozen=True, slots=True)
class EnvProxy:
    """The proxy the environment names for a URL, and the variable it came from."""

    variable: str
    url: str


def parse_proxy_url(value: str, *, allow_credentials: bool) -> str:
    """``value`` stripped, if it is an ``http(s)://host[:port]`` URL.

    Raises:
        ProxyUrlError: not such a URL, or it holds credentials where they are not allowed.
    """
    text = value.strip()
    parts = _split(text)
    if parts.scheme not in PROXY_SCHEMES or not parts.hostname:
        raise ProxyUrlError("must be an http:// or https:// URL, e.g. http://proxy.example:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyUrlError("must be scheme, host and port only (no path, query or fragment)")
    if not allow_credentials and (parts.username is not None or parts.password is not None):
        raise ProxyUrlError(
            "holds credentials, which are a secret: name the URL with proxy_url_env or "
            "proxy_url_file instead"
        )
    return text


def describe_proxy(url: str | None) -> str:
    """``direct``, or ``via proxy SCHEME://HOST:PORT`` without any credentials (for summaries)."""
    if url is None:
        return "direct"
    parts = _split(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"via proxy {parts.scheme}://{host}{port}"


def select_env_proxy(target_url: str, environ: Mapping[str, str]) -> EnvProxy | None:
    """The proxy that ``environ`` names for ``target_url``, or None (none set, or NO_PROXY).

    ``https_proxy`` for https URLs and ``http_proxy`` for http ones, the lowercase name before
    the uppercase one (as curl and Python's urllib read them); ``no_proxy`` / ``NO_PROXY`` lists
    hosts, domain suffixes (``example.org`` and ``.example.org`` both cover subdomains),
    ``host:port``, IP addresses, CIDR networks, or ``*``.
    """
    target = _split(target_url)
    name = f"{target.scheme}_proxy"
    for variable in (name, name.upper()):
        value = environ.get(variable, "").strip()
        if value:
            break
    else:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if target.hostname and is_proxy_bypassed(target.hostname, target.port, no_proxy):
        return None
    return EnvProxy(variable, value)


def is_proxy_bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether a ``NO_PROXY`` value exempts ``host`` (and ``port``) from the proxy."""
    host = host.lower().rstrip(".")
    address = _address(host)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_host, entry_port = _entry_host_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None and "/" in entry_host:
            try:
                if address in ipaddress.ip_network(entry_host, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry_host = entry_host.removeprefix("*").lstrip(".").rstrip(".")
        if entry_host and (host == entry_host or host.endswith("." + entry_host)):
            return True
    return False


def _entry_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None  # a name, an IPv4 address or network, or a bare IPv6 address


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise ProxyUrlError("is not a valid URL") from None
    return parts
