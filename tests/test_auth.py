"""Tests for gateway.auth: presented key + Host → Caller, org keys, remembered refusals."""

from __future__ import annotations

import hashlib

import pytest

from gateway.auth import REFUSAL_TTL_S, Caller, KeyRegistry, ShopRef, hash_key, host_name
from gateway.errors import UnauthorizedError, WrongHostError

ANYWHERE = ShopRef(
    name="anywhere", org_id="org0", shop_id="shop0", hosts=frozenset(), accept_org_keys=False
)
BERLIN = ShopRef(
    name="berlin",
    org_id="org1",
    shop_id="shop1",
    hosts=frozenset({"shop1.example.org", "apotheke-berlin.example"}),
    accept_org_keys=False,
)
MUNICH = ShopRef(
    name="munich",
    org_id="org2",
    shop_id="shop2",
    hosts=frozenset({"shop2.example.org"}),
    accept_org_keys=True,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_registry(clock: FakeClock | None = None) -> KeyRegistry:
    return KeyRegistry(
        [
            ("open", hash_key("open-key"), ANYWHERE),
            ("drx", hash_key("drx-key"), BERLIN),
            ("munich-partner", hash_key("munich-partner-key"), MUNICH),
        ],
        [MUNICH],
        clock=clock or FakeClock(),
    )


# --- hash_key / host_name -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["drx-key", "", "ä-ünïcode-🔑", "x" * 1000])
def test_hash_key_is_the_sha256_hex_of_the_utf8_key(key: str) -> None:
    assert hash_key(key) == hashlib.sha256(key.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, ""),
        ("", ""),
        ("shop1.example.org", "shop1.example.org"),
        ("Shop1.Example.ORG", "shop1.example.org"),
        ("shop1.example.org:8080", "shop1.example.org"),
        ("SHOP1.example.org:443", "shop1.example.org"),
        ("  shop1.example.org  ", "shop1.example.org"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("2001:db8::1", "2001:db8::1"),
        ("localhost:", "localhost"),
    ],
)
def test_host_name(host: str | None, expected: str) -> None:
    assert host_name(host) == expected


# --- partner keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, ""])
def test_missing_key_is_unauthorized(key: str | None) -> None:
    with pytest.raises(UnauthorizedError):
        make_registry().resolve(key, "shop1.example.org")


@pytest.mark.parametrize("host", ["shop1.example.org", None, "other.example"])
def test_unknown_key_is_unauthorized_where_no_shop_takes_org_keys(host: str | None) -> None:
    with pytest.raises(UnauthorizedError):
        make_registry().resolve("nobody-key", host)


@pytest.mark.parametrize("key", ["DRX-KEY", "drx-key ", "drx-ke", hash_key("drx-key")])
def test_near_miss_keys_are_unauthorized(key: str) -> None:
    with pytest.raises(UnauthorizedError):
        make_registry().resolve(key, "shop1.example.org")


@pytest.mark.parametrize("host", [None, "", "anything.example", "shop1.example.org:8080"])
def test_partner_key_of_a_shop_without_hosts_is_accepted_on_any_host(host: str | None) -> None:
    caller = make_registry().resolve("open-key", host)

    assert caller == Caller(name="open", shop=ANYWHERE)
    assert caller.org_key is None


@pytest.mark.parametrize(
    "host",
    [
        "shop1.example.org",
        "SHOP1.Example.Org",
        "shop1.example.org:8443",
        "apotheke-berlin.example",
        "Apotheke-Berlin.example:80",
    ],
)
def test_partner_key_is_accepted_on_its_shops_hosts(host: str) -> None:
    caller = make_registry().resolve("drx-key", host)

    assert caller.name == "drx"
    assert caller.shop is BERLIN
    assert caller.org_key is None


@pytest.mark.parametrize(
    "host",
    [None, "", "shop2.example.org", "evil.example", "shop1.example.org.evil.example", "shop1"],
)
def test_partner_key_on_a_host_its_shop_does_not_serve_is_wrong_host(host: str | None) -> None:
    with pytest.raises(WrongHostError) as caught:
        make_registry().resolve("drx-key", host)

    assert caught.value.http_status == 403


def test_partner_key_on_an_org_key_shop_stays_a_partner() -> None:
    caller = make_registry().resolve("munich-partner-key", "shop2.example.org")

    assert caller.name == "munich-partner"
    assert caller.org_key is None


# --- org keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["shop2.example.org", "Shop2.Example.Org:8080"])
def test_unknown_key_on_an_org_key_shops_host_is_the_orgs_key(host: str) -> None:
    caller = make_registry().resolve("org2-integration-key", host)

    assert caller == Caller(name="munich", shop=MUNICH, org_key="org2-integration-key")
    assert caller.org_key is not None


@pytest.mark.parametrize("host", ["shop1.example.org", "other.example", None, ""])
def test_unknown_key_on_another_host_is_unauthorized(host: str | None) -> None:
    with pytest.raises(UnauthorizedError):
        make_registry().resolve("org2-integration-key", host)


def test_org_key_shop_without_hosts_takes_no_org_keys() -> None:
    registry = KeyRegistry([], [ANYWHERE], clock=FakeClock())

    with pytest.raises(UnauthorizedError):
        registry.resolve("org-key", "anything.example")


def test_refused_org_key_is_refused_locally_for_a_minute_then_accepted_again() -> None:
    clock = FakeClock(1000.0)
    registry = make_registry(clock)
    registry.remember_refusal("guess-1")

    with pytest.raises(UnauthorizedError):
        registry.resolve("guess-1", "shop2.example.org")
    clock.now = 1000.0 + REFUSAL_TTL_S - 0.5
    with pytest.raises(UnauthorizedError):
        registry.resolve("guess-1", "shop2.example.org")
    clock.now = 1000.0 + REFUSAL_TTL_S + 0.5
    assert registry.resolve("guess-1", "shop2.example.org").org_key == "guess-1"


def test_refusal_ttl_is_one_minute() -> None:
    clock = FakeClock(0.0)
    registry = make_registry(clock)
    registry.remember_refusal("guess-1")

    clock.now = 59.0
    with pytest.raises(UnauthorizedError):
        registry.resolve("guess-1", "shop2.example.org")
    clock.now = 61.0
    assert registry.resolve("guess-1", "shop2.example.org").org_key == "guess-1"


def test_refusal_of_one_key_does_not_affect_another() -> None:
    registry = make_registry()
    registry.remember_refusal("guess-1")

    assert registry.resolve("guess-2", "shop2.example.org").org_key == "guess-2"
    assert registry.resolve("munich-partner-key", "shop2.example.org").name == "munich-partner"


def test_refusal_is_renewed_when_remembered_again() -> None:
    clock = FakeClock(0.0)
    registry = make_registry(clock)
    registry.remember_refusal("guess-1")
    clock.now = 50.0
    registry.remember_refusal("guess-1")

    clock.now = 100.0
    with pytest.raises(UnauthorizedError):
        registry.resolve("guess-1", "shop2.example.org")
    clock.now = 111.0
    assert registry.resolve("guess-1", "shop2.example.org").org_key == "guess-1"


def test_remembered_refusal_does_not_block_a_partner_key() -> None:
    registry = make_registry()
    registry.remember_refusal("munich-partner-key")

    assert registry.resolve("munich-partner-key", "shop2.example.org").name == "munich-partner"
