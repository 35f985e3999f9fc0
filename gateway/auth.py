"""Who is calling: a presented key (and the request's Host) → the partner and its shop.

Keys are stored as SHA-256 hex and compared in constant time. A shop with ``accept_org_keys`` also
takes unknown keys on its hosts as the org's own integration key; Manager's refusals of such keys
are remembered for a while so that guessing does not reach Manager.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from cachetools import TTLCache

from gateway.errors import UnauthorizedError, WrongHostError

REFUSAL_TTL_S: Final = 60.0
REFUSAL_CACHE_SIZE: Final = 10_000


@dataclass(frozen=True, slots=True)
class ShopRef:
    """A shop as authentication sees it (the config's shop, without what auth does not need)."""

    name: str
    org_id: str
    shop_id: str
    hosts: frozenset[str]
    accept_org_keys: bool


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller: a configured partner, or a holder of the org's own key."""

    name: str  # partner name, or the shop's local name for org-key callers
    shop: ShopRef
    org_key: str | None = None  # set only for org-key callers: used upstream as it is


def hash_key(key: str) -> str:
    """The ``key_sha256`` stored in the configuration for a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def host_name(host: str | None) -> str:
    """``Shop1.Example.org:8080`` → ``shop1.example.org`` (IPv6 literals keep their brackets)."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class KeyRegistry:
    """Resolves a presented key and Host to a :class:`Caller`."""

    def __init__(
        self,
        partners: Iterable[tuple[str, str, ShopRef]],
        org_key_shops: Iterable[ShopRef] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``partners`` holds ``(name, key_sha256, shop)``; ``org_key_shops`` accept org keys."""
        # Each partner's Caller is built once: the same frozen value serves every request.
        self._partners = [
            (bytes.fromhex(digest), Caller(name=name, shop=shop)) for name, digest, shop in partners
        ]
        self._org_key_hosts = {host: shop for shop in org_key_shops for host in shop.hosts}
        self._refused: TTLCache[bytes, bool] = TTLCache(
            maxsize=REFUSAL_CACHE_SIZE, ttl=REFUSAL_TTL_S, timer=clock
        )

    def resolve(self, key: str | None, host: str | None) -> Caller:
        """Authenticate before the body is read.

        Raises:
            UnauthorizedError: no key, or a key that is neither a partner's nor acceptable as an
                org key on this Host.
            WrongHostError: a partner's key on a Host its shop does not serve.
        """
        if not key:
            raise UnauthorizedError("An API key is required (header apikey or X-API-Key).")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Caller | None = None
        # Every entry is compared, match or not, so timing says nothing about which key is near.
        for stored, caller in self._partners:
            if hmac.compare_digest(stored, digest) and found is None:
                found = caller
        served_host = host_name(host)
        if found is not None:
            if found.shop.hosts and served_host not in found.shop.hosts:
                raise WrongHostError()
            return found
        org_shop = self._org_key_hosts.get(served_host)
        if org_shop is None or digest in self._refused:
            raise UnauthorizedError()
        return Caller(name=org_shop.name, shop=org_shop, org_key=key)

    def remember_refusal(self, key: str) -> None:
        """Manager refused this org key: refuse it locally for a minute."""
        self._refused[hashlib.sha256(key.encode("utf-8")).digest()] = True
